"""Does moving a tier of groups jointly find a latency cliff the one-group knapsack misses?

The allocation alone, with the training held out: LPNet is fitted on a cached latency
profile, `wgates.allocate` splits the channels at `--aim` with every channel worth the same
(so the better allocation is the one that keeps more channels at the same latency), once
group by group and once with `GatedModel.resolution_tiers` moved jointly too, and each
allocation is then measured against the dense model beside uniform width scaling, in
interleaved rounds. ResNet-20 at batch 32 on an AMD EPYC host has such a cliff: every
stage-1 group at 8 channels or fewer runs at 0.55 of the dense latency, the stage-1 stream
alone there at 0.90 (benchmarks/results/width_steps_b32_stage1.txt).

    python benchmarks/tier_allocation.py --profile \\
        "benchmarks/cache/resnet20_torch-cpu_(32, 3, 32, 32).sqlite" --aim 0.5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from wgates.allocate import allocate
from wgates.gated import gate
from wgates.latency import LatencyStore, Meter, Protocol, get_backend
from wgates.models import create_model
from wgates.predictor import fit_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="latency profile (SQLite)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--aim", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each allocation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    store = LatencyStore(args.profile, create=False)
    run = store.select_run()
    store.close()
    batch, *shape = run.fingerprint["input_shape"]
    lpnet = fit_file(args.profile, run).predictor.requires_grad_(False)
    model = create_model(args.model).eval()
    gated = gate(model, (torch.randn(1, *shape),))
    groups = gated.channel_groups
    sizes = [g.size for g in groups]
    flat = [torch.ones(n) for n in sizes]
    order = [torch.arange(n) for n in sizes]

    def widths(tiers) -> dict[str, int]:
        kept = allocate(lpnet, sizes, sizes, [1] * len(sizes), order, flat, args.aim,
                        tiers=tiers)
        return {g.name: k for g, k in zip(groups, kept)}

    configs = {
        "group by group": widths(()),
        "tiers jointly too": widths(gated.resolution_tiers()),
        **{f"uniform {k}/16": {g.name: max(1, round(k * g.size / 16)) for g in groups}
           for k in (8, 9)},
    }
    backend = get_backend(run.fingerprint["backend"], 1)
    example = (torch.randn(batch, *shape),)
    meter = Meter(backend, backend.prepare(model, example), Protocol())
    runners = {}
    for name, w in configs.items():
        gated.clear_masks()
        gated.set_masks(gated.masks_for_widths(w))
        runners[name] = backend.prepare(gated.extract(verify=False), example)
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            ratios[name].append(meter.measure(runner).ratio)
    print(f"{args.model}, batch {batch}, {run.fingerprint['backend']}, aim {args.aim}, LPNet "
          f"on {run.n_samples} samples; measured ratio: median of {args.rounds} (min-max)")
    for name, w in configs.items():
        counts = torch.tensor([float(w[g.name]) for g in groups])
        r = ratios[name]
        print(f"{name:18s} predicted {float(lpnet(counts)):.3f} measured "
              f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) channels "
              f"{int(counts.sum())}/{sum(sizes)} widths {[w[g.name] for g in groups]}")


if __name__ == "__main__":
    main()
