"""Where a gate method's accuracy goes, stage by stage, in the benchmark's own setting:
after each search epoch (the gated network, its own masks), at the end of the search, once
extracted with the searched widths, after the measured closed loop, after re-estimating the
BatchNorm statistics, and after the shared fine-tune. Issue 11's 'why', measured.

    python benchmarks/search_diagnosis.py \
        --dense-weights benchmarks/weights/resnet20_cifar10.safetensors --subset 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from cifar10 import HERE, conv_widths, data_spec, limited, make_measure, profile_path

from wgates.data import make_loaders
from wgates.gated import gate
from wgates.latency import LatencyStore, Protocol
from wgates.macs import MacsModel
from wgates.models import create_model
from wgates.predictor import fit_and_compare
from wgates.search import accepted_band, closed_loop, search
from wgates.train import evaluate, recalibrate_bn, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-weights", required=True)
    parser.add_argument("--data", help="data spec (default: cifar10:$WGATES_CIFAR10)")
    parser.add_argument("--kind", default="wgates")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--subset", type=int, default=None, help="training images used")
    parser.add_argument("--val-subset", type=int, default=None, help="validation images used")
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--gate-lr", type=float, default=0.05)
    parser.add_argument("--allocation", default="knapsack")
    parser.add_argument("--ramp", type=float, default=None)
    parser.add_argument("--floor", type=float, default=0.1)
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="do not measure the widths when the ramp ends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    args.data = data_spec(args.data, parser)

    train_loader, val_loader, info = make_loaders(args.data, 128)
    train_loader = limited(train_loader, args.subset, shuffle=True)
    val_loader = limited(val_loader, args.val_subset, shuffle=False)
    dense = create_model(args.model, info.num_classes, args.dense_weights).eval()
    inputs = (torch.randn(1, *info.input_shape),)
    torch.manual_seed(args.seed)
    gated = gate(copy.deepcopy(dense), inputs, kind=args.kind)
    store = LatencyStore(profile_path(HERE / "cache", args.model, "torch-cpu",
                                      [1, *info.input_shape]))
    try:
        cost = fit_and_compare(store, store.select_run(), macs=MacsModel.of(gated)
                               ).predictor.requires_grad_(False)
    finally:
        store.close()
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                    "dense": evaluate(dense, val_loader)}
    measure = make_measure(dense, inputs, "torch-cpu", Protocol(rounds=60, max_wait_s=60))
    start = time.perf_counter()
    band = accepted_band(args.target, args.tolerance)
    history, control = search(
        gated, cost, band.middle, train_loader, args.search_epochs, lr=args.lr,
        gate_lr=args.gate_lr, val_loader=val_loader, allocation=args.allocation,
        ramp=args.ramp, floor=args.floor, teacher=None if args.no_distill else dense,
        measure=None if args.no_calibrate else measure,
        band=band)
    record["calibration"] = getattr(control, "calibration", [])
    record["search_s"] = time.perf_counter() - start
    record["search_epochs"] = history.epochs
    gated.eval()
    record["gated_after_search"] = evaluate(gated, val_loader)
    searched = gated.masks()
    record["search_widths"] = {k: int(v.sum()) for k, v in searched.items()}
    gated.set_masks(searched)
    as_searched = gated.extract()
    gated.clear_masks()
    record["extracted_as_searched"] = evaluate(as_searched, val_loader)
    small, steps = closed_loop(gated, cost, measure, args.target, args.tolerance,
                               propose=getattr(control, "masks_at", None))
    record["loop"] = [s.__dict__ for s in steps]
    record["after_loop"] = evaluate(small, val_loader)
    record["after_loop_widths"] = conv_widths(small)
    recalibrated = recalibrate_bn(copy.deepcopy(small), train_loader)
    record["after_loop_bn_recalibrated"] = evaluate(recalibrated, val_loader)
    print(json.dumps(record), flush=True)
    if args.finetune_epochs:
        torch.manual_seed(args.seed)
        train(small, train_loader, args.finetune_epochs, lr=0.01, progress=False,
              teacher=None if args.no_distill else dense)
        record["finetuned"] = evaluate(small, val_loader)
    print(json.dumps(record, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
