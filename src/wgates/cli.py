"""The `wgates` command line: one subcommand per pipeline step.

Each subcommand is a pair: `add_<name>(subparsers)` declares its arguments and sets
`func` to the function that runs it. Errors meant for the user are `WgatesError`s:
printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from wgates.errors import WgatesError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgates",
        description="Prune a trained CNN to a latency budget measured on your hardware.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# Filled below, in pipeline order; each entry adds one subcommand.
SUBCOMMANDS: list = []


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise WgatesError(f"--input-shape {text!r} is not a shape: give e.g. 1,3,32,32")
    return shape


def add_profile(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure sampled pruned variants on this hardware into a latency file",
        description="Measure latency (relative to the dense model, interleaved) of sampled "
        "width configurations. Resumable: re-run to continue; a larger --samples adds more.",
    )
    p.add_argument("--model", required=True, help="model spec, e.g. resnet20 or net.py:Net")
    p.add_argument("--input-shape", type=_shape, help="N,C,H,W (default: 1 x the model's)")
    p.add_argument("--backend", default="torch-cpu", help="torch-cpu, onnxruntime-cpu, torch-cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--samples", type=int, default=500, help="total samples wanted in the file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat-every", type=int, default=10,
                   help="re-measure a probe configuration every N samples (noise floor)")
    p.add_argument("--out", default="latency.sqlite", help="SQLite file (created or extended)")

    def run(args) -> int:
        from wgates.latency import profile
        from wgates.models import create_model, default_input_shape

        shape = args.input_shape or (1, *default_input_shape(args.model))
        done = profile(
            create_model(args.model), shape, args.out, samples=args.samples,
            backend=args.backend, threads=args.threads, seed=args.seed,
            model_spec=args.model, repeat_every=args.repeat_every,
        )
        print(f"{args.out}: run {done.key} has {done.n_samples} samples")
        return 0

    p.set_defaults(func=run)


def add_fit_latency(sub) -> None:
    p = sub.add_parser(
        "fit-latency",
        help="fit LPNet on a latency file and compare it with FLOPs and lookup-table predictors",
    )
    p.add_argument("latency", help="SQLite file written by `wgates profile`")
    p.add_argument("--out", default="lpnet.pt", help="where to save the predictor")
    p.add_argument("--run", help="run key (prefix) when the file holds several fingerprints")
    p.add_argument("--plot", help="scatter plot PNG (default: --out with .png)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object of metrics")

    def run(args) -> int:
        import json
        from pathlib import Path

        from wgates.latency import LatencyStore
        from wgates.predictor import fit_and_compare, plot_comparison

        store = LatencyStore(args.latency, create=False)
        try:
            chosen = store.select_run(args.run)
            result = fit_and_compare(
                chosen, store.samples(chosen.id), store.repeats(chosen.id),
                store.lut(chosen.id), holdout=args.holdout, seed=args.seed,
            )
        finally:
            store.close()
        result.predictor.save(args.out)
        plot = args.plot or str(Path(args.out).with_suffix(".png"))
        plot_comparison(result, plot)
        m = result.metrics
        if args.json:
            print(json.dumps(m))
            return 0
        print(f"run {chosen.key}: {chosen.fingerprint['model']} on {chosen.fingerprint['backend']}"
              f", {m['n_train']} train / {m['n_test']} held-out samples")
        print(f"{'predictor':<24}{'MAPE':>8}{'max err':>9}{'Spearman':>10}")
        labels = {"lpnet": "LPNet", "flops": "FLOPs (a + b*x)", "lut": "lookup table (a + b*x)"}
        for name, s in m["predictors"].items():
            print(f"{labels[name]:<24}{s['mape']:>8.2%}{s['max_error']:>9.2%}{s['spearman']:>10.4f}")
        print(f"noise floor: CV {m['noise_cv']:.2%} over {m['n_repeats']} repeats, "
              f"median per-sample spread {m['median_spread']:.2%}")
        print(f"saved {args.out}, plot {plot}")
        return 0

    p.set_defaults(func=run)


SUBCOMMANDS.extend([add_profile, add_fit_latency])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WgatesError as err:
        print(f"wgates: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wgates: interrupted", file=sys.stderr)
        return 130
