"""Latency benchmark (issue #4): profiling speed, noise floor and predictor errors.

For each model and backend (batch 1): profile `--samples` configurations into a latency file
(resuming if it exists), fit LPNet, and score it and the FLOPs and lookup-table baselines on
the held-out split. Writes a markdown table (default benchmarks/results/latency.md).

    python benchmarks/latency.py --samples 500
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
from lanes import Lanes

from wgates.gated import gate
from wgates.latency import LatencyStore, profile
from wgates.macs import MacsModel
from wgates.models import create_model, default_input_shape
from wgates.predictor import fit_and_compare

MODELS = ("resnet20", "mobilenetv2_cifar")
BACKENDS = ("torch-cpu", "onnxruntime-cpu")


def bench(model: str, backend: str, samples: int, workdir: Path, threads: int) -> dict:
    path = workdir / f"{model}_{backend}.sqlite"
    shape = (1, *default_input_shape(model))
    run = profile(
        create_model(model), shape, path, samples=samples, backend=backend,
        threads=threads, model_spec=model,
    )
    store = LatencyStore(path)
    started, first, last = store.db.execute(
        "SELECT r.created, MIN(s.created), MAX(s.created) FROM runs r "
        "JOIN samples s ON s.run_id = r.id WHERE r.id = ?",
        (run.id,),
    ).fetchone()
    gated = gate(create_model(model), (torch.randn(shape),))
    result = fit_and_compare(store, run, macs=MacsModel.of(gated))
    store.close()
    return {
        "model": model,
        "backend": backend,
        "samples": run.n_samples,
        "wall_min": (last - started) / 60,
        "per_min": 60 * (run.n_samples - 1) / max(last - first, 1e-9),
        "dense_ms": result.metrics["dense_ms"],
        **result.metrics,
    }


def table(results: list[dict]) -> str:
    head = (
        "| model | backend | samples | samples/min | wall (min) | dense ms | noise CV | "
        "median spread | LPNet MAPE | LPNet max err | Spearman | FLOPs MAPE | LUT MAPE |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['model']} | {r['backend']} | {r['samples']} | {r['per_min']:.0f} | "
        f"{r['wall_min']:.1f} | {r['dense_ms']:.2f} | {r['noise_cv']:.1%} | "
        f"{r['median_spread']:.1%} | {r['mape']:.1%} | {r['max_error']:.1%} | "
        f"{r['spearman']:.3f} | {r['flops_mape']:.1%} | {r['lut_mape']:.1%} |\n"
        for r in results
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wgates-latency-bench"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.md"))
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="one of several benchmark processes sharing DIR: each profile "
                        "pauses the other lanes (benchmarks/lanes.py) while it measures")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    results = []
    for m in args.models:
        for b in args.backends:
            with alone():
                results.append(bench(m, b, args.samples, args.workdir, args.threads))
    from wgates.latency.backends import cpu_model

    text = (
        "# Latency benchmark\n\n"
        f"Command: `python {shlex.join(sys.argv)}`  \n"
        f"Date: {date.today()}; CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, shared; "
        f"{args.threads} used); torch {torch.__version__}.\n\n"
        "Latency is measured relative to the dense model timed interleaved with each candidate,"
        " by the inference thread's CPU time (one thread: robust to other processes on a "
        "shared machine; `dense ms` is that CPU time, batch 1)."
        " Errors are on a held-out 20% split, as fractions of the measured ratio. Noise CV: "
        "coefficient of variation of repeated measurements of fixed probe configurations (the "
        "error floor of any predictor). FLOPs and LUT baselines: `ratio = a + b*x` fitted on "
        "the training split. samples/min: building and measuring variants; wall: from the "
        "start of profiling (gating, per-layer table) to the last sample, from the latency "
        "file's timestamps (a file that was already complete is reused as is).\n\n"
        + table(results)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
