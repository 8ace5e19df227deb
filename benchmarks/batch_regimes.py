"""At which batch does a CIFAR net's CPU latency follow its compute?

At batch 1 a CIFAR ResNet is overhead-bound: halving every width gives far less than half
the latency. This measures, for uniform width fractions, the latency ratio to the dense model
(torch-cpu, one thread, interleaved protocol) at growing batches, next to the MACs ratio. The
compute-bound batch used by `benchmarks/cifar10.py --regime` is the smallest batch whose
ratios are within `--within` of the largest batch's (where the ratio stops falling).

    python benchmarks/batch_regimes.py --model resnet20 --batches 1 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from wgates.baselines import extract_at, l1_ranked
from wgates.latency import Meter, Protocol, get_backend
from wgates.latency.backends import cpu_model
from wgates.models import create_model, default_input_shape
from wgates.predictor import count

HERE = Path(__file__).resolve().parent


def sweep(model_spec: str, batches: list[int], fractions: list[float], threads: int,
          rounds: int) -> list[dict]:
    dense = create_model(model_spec).eval()
    shape = default_input_shape(model_spec)
    backend = get_backend("torch-cpu", threads)
    rows = []
    for batch in batches:
        inputs = (torch.randn(batch, *shape),)
        gated = l1_ranked(dense, inputs)
        meter = Meter(backend, backend.prepare(dense, inputs), Protocol(rounds=rounds))
        dense_macs = count(dense, inputs)[0]
        for fraction in fractions:
            small = extract_at(gated, dict.fromkeys(gated.widths(), fraction))
            m = meter.measure(backend.prepare(small, inputs))
            rows.append({"batch": batch, "fraction": fraction, "ratio": m.ratio,
                         "spread": m.spread, "dense_ms": m.dense_ms,
                         "macs_ratio": count(small, inputs)[0] / dense_macs})
            print(rows[-1], flush=True)
    return rows


def compute_bound_batch(rows: list[dict], within: float) -> int:
    """The smallest batch whose every ratio is within `within` (relative) of the largest
    batch's ratio at the same width fraction."""
    largest = max(r["batch"] for r in rows)
    final = {r["fraction"]: r["ratio"] for r in rows if r["batch"] == largest}
    for batch in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == batch]
        if all(abs(r["ratio"] / final[r["fraction"]] - 1) <= within for r in at):
            return batch
    return largest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--within", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batch_regimes.md")
    args = parser.parse_args(argv)
    rows = sweep(args.model, args.batches, args.fractions, args.threads, args.rounds)
    chosen = compute_bound_batch(rows, args.within)
    lines = [f"| {r['batch']} | {r['fraction']:.2f} | {r['ratio']:.3f} | {r['spread']:.3f} | "
             f"{r['macs_ratio']:.3f} | {r['dense_ms']:.2f} |" for r in rows]
    text = (f"# {args.model}: latency ratio against batch (torch-cpu, {args.threads} thread)\n\n"
            f"Command: `python {shlex.join(sys.argv)}`  \nCPU: {cpu_model()}\n\n"
            "Uniform width fraction (L1 choice), latency ratio to the dense model measured "
            "interleaved (25th-percentile per-call CPU time), MACs ratio, dense ms per batch.\n\n"
            "| batch | width fraction | latency ratio | spread | MACs ratio | dense ms |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines)
            + f"\n\nCompute-bound from batch **{chosen}**: every ratio within "
            f"{args.within:.0%} of batch {max(args.batches)}'s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
