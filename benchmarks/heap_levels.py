"""Why one kept model read 0.490 in its run and 0.462 alone (torch-cpu, batch 1, one thread;
docs/design.md, "Two levels at batch 1").

Starts `--processes` measuring processes (`IsolatedMeter` with one process each, all alive
at once) and reads the same pruned model in each in turn, `--rounds` times, so that a
process's own level and the host's drift over time can be told apart: a column that stays
put is the process, a row that moves together is the host. Each cell is one `Meter`
reading (ratio to the dense model timed beside it) and the dense model's time in ms.

    python benchmarks/heap_levels.py --model benchmarks/cache/models/cifar10_b1e_depth/\\
        resnet20_torch-cpu@1_0.5_wgates_0 --processes 12 --rounds 4 \
        > benchmarks/results/heap_levels_b1.txt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from wgates.extract import load_pruned
from wgates.latency import Protocol
from wgates.latency.worker import IsolatedMeter
from wgates.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a pruned model kept by save_pruned")
    parser.add_argument("--spec", default="resnet20")
    parser.add_argument("--dense-weights",
                        default="benchmarks/weights/resnet20_cifar10.safetensors")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--processes", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    dense = create_model(args.spec, 10, args.dense_weights).eval()
    small = load_pruned(create_model(args.spec, 10), args.model).eval()
    inputs = (torch.randn(args.batch, 3, 32, 32),)
    one = replace(Protocol(), processes=1)
    meters = [IsolatedMeter("torch-cpu", 1, dense, inputs, one) for _ in range(args.processes)]
    ratios = np.zeros((args.rounds, args.processes))
    for r in range(args.rounds):
        cells = []
        for k, meter in enumerate(meters):
            m = meter.measure(small)
            ratios[r, k] = m.ratio
            cells.append(f"{m.ratio:.3f}/{m.dense_ms:.2f}")
        print(f"round {r}: " + " ".join(cells), flush=True)
    for meter in meters:
        meter.close()
    print("per process (median):", " ".join(f"{v:.3f}" for v in np.median(ratios, 0)))
    print("per round (median):  ", " ".join(f"{v:.3f}" for v in np.median(ratios, 1)))
    print(f"all {ratios.size} readings: mean {ratios.mean():.3f}, median "
          f"{np.median(ratios):.3f}, range {ratios.min():.3f}-{ratios.max():.3f}")
    for k in (1, 3, 5):  # how far a figure pooled over k processes strays, by resampling
        draws = np.random.default_rng(0).choice(ratios.ravel(), size=(10000, k)).mean(1)
        lo, hi = np.quantile(draws, [0.05, 0.95])
        print(f"mean of {k}: 90% within {lo:.3f}-{hi:.3f} ({(hi - lo) / draws.mean():.1%})")


if __name__ == "__main__":
    main()
