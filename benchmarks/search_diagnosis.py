"""Where a gate method's accuracy goes: after its search (gated, its own masks), after the
measured closed loop (extracted), and after the shared fine-tune. Issue #6's 'why', measured.

    python benchmarks/search_diagnosis.py --dense-weights dense.safetensors --subset 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from cifar10 import HERE, conv_widths, data_spec, limited, make_measure

import wgates.search
from wgates.data import make_loaders
from wgates.gated import gate
from wgates.latency import LatencyStore, Protocol
from wgates.models import create_model
from wgates.predictor import fit_and_compare
from wgates.search import LAMBDA_RATE, LatencyLoss, closed_loop, search
from wgates.train import evaluate, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-weights", required=True)
    parser.add_argument("--data", help="data spec (default: cifar10:$WGATES_CIFAR10)")
    parser.add_argument("--profile", type=Path,
                        default=HERE / "cache" / "resnet20_torch-cpu_(1, 3, 32, 32).sqlite",
                        help="latency profile of the model (benchmarks/cifar10.py caches one)")
    parser.add_argument("--kind", default="wgates")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--search-epochs", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01,
                        help="weights' lr in the search (0: the weights stay the dense ones)")
    parser.add_argument("--gate-lr", type=float, default=0.05)
    parser.add_argument("--offset-range", type=float, default=None,
                        help="override wgates.search.OFFSET_RANGE (how far the offsets' lr "
                        "lets them travel in a search)")
    parser.add_argument("--ramp", type=float, default=0.0,
                        help="fraction of the search over which the aim moves to the target")
    parser.add_argument("--lam-rate", type=float, default=LAMBDA_RATE,
                        help="how fast the latency weight adapts per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    args.data = data_spec(args.data, parser)

    if args.offset_range is not None:
        wgates.search.OFFSET_RANGE = args.offset_range
    train_loader, val_loader, info = make_loaders(args.data, 128, subset=None)
    train_loader = limited(train_loader, args.subset, shuffle=True)
    dense = create_model(args.model, info.num_classes, args.dense_weights).eval()
    inputs = (torch.randn(1, *info.input_shape),)
    store = LatencyStore(args.profile)
    try:
        cost = fit_and_compare(store, store.select_run()).predictor.requires_grad_(False)
    finally:
        store.close()
    torch.manual_seed(args.seed)
    gated = gate(copy.deepcopy(dense), inputs, kind=args.kind)
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                    "dense": evaluate(dense, val_loader)}
    gated.eval()
    record["initial_widths"] = gated.widths()
    start = time.perf_counter()
    steps = args.search_epochs * len(train_loader)
    loss = LatencyLoss(gated, cost, args.target, rate=args.lam_rate,
                       ramp=round(args.ramp * steps))
    search(gated, cost, args.target, train_loader, args.search_epochs, lr=args.lr,
           gate_lr=args.gate_lr, progress=True, loss=loss)
    record["search_s"] = time.perf_counter() - start
    gated.eval()
    record["predicted_end_of_search"] = loss.trace[-1]
    record["gated_after_search"] = evaluate(gated, val_loader)  # its own masks
    record["search_widths"] = gated.widths()
    measure = make_measure(dense, inputs, "torch-cpu", Protocol(rounds=60, max_wait_s=60))
    small, steps = closed_loop(gated, cost, measure, args.target)
    record["loop"] = [s.__dict__ for s in steps]
    record["extracted"] = evaluate(small, val_loader)
    record["extracted_widths"] = conv_widths(small)
    print(json.dumps(record), flush=True)
    # The same architecture, but cut from the dense weights: what did the search's weight
    # training do to the starting point of the fine-tune?
    from_dense = gate(copy.deepcopy(dense), inputs, kind="plain")
    from_dense.set_masks(gated.masks())
    from_dense = from_dense.extract()
    record["same_masks_dense_weights"] = evaluate(from_dense, val_loader)
    for name, model in (("finetuned", small), ("same_masks_dense_weights_finetuned",
                                                from_dense)):
        torch.manual_seed(args.seed)
        train(model, train_loader, args.finetune_epochs, lr=0.01, progress=False)
        record[name] = evaluate(model, val_loader)
    print(json.dumps(record, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
