"""Does moving a tier of groups jointly find a latency cliff the one-group knapsack misses?

The allocation alone, with the training held out: LPNet is fitted on a cached latency
profile, `wgates.allocate` splits the channels at `--aim` with every channel worth the same
(so the better allocation is the one that keeps more channels at the same latency), once
group by group and once with `GatedModel.resolution_tiers` moved jointly too, and each
allocation is then measured against the dense model beside uniform width scaling, in
interleaved rounds. ResNet-20 at batch 32 on an AMD EPYC host has steps that hang on
several groups at once: 8/16/32 channels per stage run at 0.340 of the dense latency, 9/18/36
at 0.555, 8/16/48 at 0.366 and 8/24/48 at 0.555 (benchmarks/results/
width_steps_b32_stage1.txt).

LPNet (on its MACs prior, as `wgates.prune` fits it) is allocated with beside the plain MLP,
which extrapolates into holes the knapsack finds (benchmarks/results/
tier_allocation_b32_amd_prior.txt).

`--tier-samples` also measures every tier alone at each k/8 of its widths (the rest dense)
and fits a second LPNet on the profile plus those: the directions a joint move is priced
along, which a profile of random configurations rarely visits.

    python benchmarks/tier_allocation.py --profile \\
        "benchmarks/cache/resnet20_torch-cpu_(32, 3, 32, 32).sqlite" --aim 0.5 --rounds 3 \\
        --tier-samples
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from wgates.allocate import allocate
from wgates.gated import gate
from wgates.latency import LatencyStore, Meter, Protocol, get_backend, profiled_quiet_ms
from wgates.macs import MacsModel
from wgates.models import create_model
from wgates.predictor import LatencyPredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True, help="latency profile (SQLite)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--aim", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each allocation")
    parser.add_argument("--tier-samples", action="store_true",
                        help="also fit LPNet with every tier measured alone at k/8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    store = LatencyStore(args.profile, create=False)
    run = store.select_run()
    samples = store.calm_samples(run.id)
    store.close()
    batch, *shape = run.fingerprint["input_shape"]
    model = create_model(args.model).eval()
    gated = gate(model, (torch.randn(1, *shape),))
    groups = gated.channel_groups
    names, sizes = [g.name for g in groups], [g.size for g in groups]
    backend = get_backend(run.fingerprint["backend"], 1)
    example = (torch.randn(batch, *shape),)
    meter = Meter(backend, backend.prepare(model, example), Protocol(),
                  profiled_quiet_ms(args.profile, {}))

    def runner(widths: dict[str, int]):
        gated.clear_masks()
        gated.set_masks(gated.masks_for_widths(widths))
        return backend.prepare(gated.extract(verify=False), example)

    kept = np.array([[s.widths[n] for n in names] for s in samples], dtype=np.float64)
    ratios = np.array([s.ratio for s in samples])
    macs = MacsModel.of(gated)
    lpnets = {"LPNet": LatencyPredictor.fit(names, sizes, kept, ratios, macs=macs),
              "plain MLP": LatencyPredictor.fit(names, sizes, kept, ratios)}
    if args.tier_samples:
        extra = [{n: (math.ceil(k * s / 8) if i in tier else s)
                  for i, (n, s) in enumerate(zip(names, sizes))}
                 for tier in gated.resolution_tiers() for k in range(1, 8)]
        measured = [meter.measure(runner(w)).ratio for w in extra]
        lpnets["LPNet + tier samples"] = LatencyPredictor.fit(
            names, sizes, np.vstack([kept, [[w[n] for n in names] for w in extra]]),
            np.concatenate([ratios, measured]), macs=macs)

    flat = [torch.ones(n) for n in sizes]
    order = [torch.arange(n) for n in sizes]
    configs: dict[str, dict[str, int]] = {}
    for label, lpnet in lpnets.items():
        lpnet.requires_grad_(False)
        for how, tiers in (("group by group", ()), ("tiers jointly too", gated.resolution_tiers())):
            allocated = allocate(lpnet, sizes, sizes, [1] * len(sizes), order, flat, args.aim,
                                 tiers=tiers)
            configs[f"{label}, {how}"] = dict(zip(names, allocated))
    for k in (8, 9):
        configs[f"uniform {k}/16"] = {n: max(1, round(k * s / 16)) for n, s in zip(names, sizes)}
    runners = {name: runner(w) for name, w in configs.items()}
    measured_ratios: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, r in runners.items():
            measured_ratios[name].append(meter.measure(r).ratio)
    print(f"{args.model}, batch {batch}, {run.fingerprint['backend']}, aim {args.aim}, "
          f"{len(samples)} profile samples; every channel worth the same; measured ratio: "
          f"median of {args.rounds} (min-max); predicted by the LPNet it was allocated with")
    pad = max(map(len, configs))
    for name, w in configs.items():
        counts = torch.tensor([float(w[n]) for n in names])
        lpnet = next((p for label, p in lpnets.items() if name.startswith(label + ",")),
                     lpnets["LPNet"])
        r = measured_ratios[name]
        print(f"{name:<{pad}} predicted {float(lpnet(counts)):.3f} measured "
              f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) channels "
              f"{int(counts.sum())}/{sum(sizes)} widths {[w[n] for n in names]}")


if __name__ == "__main__":
    main()
