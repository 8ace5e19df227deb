"""How long one `wgates.allocate.allocate` call takes as the number of channel groups grows.

Why: the search allocates at least 10 times a ramp and again at each calibration, and
`_exchange` scores every (up, down) pair of groups and runs a descent per group each round.
ResNet-20 has 12 groups; this times torchvision models with many more, from full widths to
0.5 of the predicted cost, with a LatencyPredictor that is its MACs prior alone (the shape of
the cost LPNet starts from) and random importance.

    python benchmarks/allocate_scale.py --models resnet18 resnet50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from wgates.allocate import allocate
from wgates.gated import GatedModel
from wgates.macs import MacsModel
from wgates.predictor import LatencyPredictor


def time_allocate(name: str, depth: bool, block: int | None, repeats: int,
                  aim: float) -> dict:
    """Median seconds of `allocate` on torchvision's `name` (random weights, 224x224)."""
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    gated = GatedModel(model, torch.randn(1, 3, 224, 224), channel_block=block)
    if depth:
        gated.enable_depth()
    groups = gated.channel_groups
    cost = LatencyPredictor([g.name for g in groups], [g.size for g in groups],
                            macs=MacsModel.of(gated))
    n_units = [g.n_units for g in groups]
    min_units = [gated._min_units(i) for i in range(len(groups))]
    grid = [gated.unit_grid(i) for i in range(len(groups))]
    gen = torch.Generator().manual_seed(0)
    # heavy-tailed within a group and a log-normal scale per group, as Taylor scores are:
    # groups differ in value, so the exchange has trades to take
    importance = [torch.rand(u, generator=gen) ** 4 * torch.randn(1, generator=gen).exp()
                  for u in n_units]
    order = [v.argsort(descending=True) for v in importance]
    seconds, widths = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        widths = allocate(cost, [g.size for g in groups], n_units, min_units, order,
                          importance, aim, grid=grid)
        seconds.append(time.perf_counter() - start)
    counts = torch.tensor([k * g.size / g.n_units for k, g in zip(widths, groups)])
    with torch.no_grad():
        reached = float(cost(counts))
    return {"model": name, "groups": len(groups), "depth": depth, "block": block,
            "seconds": statistics.median(seconds), "predicted": reached,
            "dropped": sum(k == 0 for k in widths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aim", type=float, default=0.5)
    parser.add_argument("--block", type=int, default=None,
                        help="channel block of the width grid (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | groups | depth | block | allocate (s, median) | predicted | dropped |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for depth in (False, True):
            r = time_allocate(name, depth, args.block, args.repeats, args.aim)
            print(f"| {r['model']} | {r['groups']} | {r['depth']} | {r['block']} | "
                  f"{r['seconds']:.2f} | {r['predicted']:.3f} | {r['dropped']} |", flush=True)


if __name__ == "__main__":
    main()
