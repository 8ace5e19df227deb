"""Which width allocation is better, with the ranking and the training held fixed: each set of
conv widths (taken from a benchmark results file's rows) is cut from the dense model by the
same L1 ranking, measured against the dense model, fine-tuned for the same epochs (distilled,
the regime's learning rate and seed) and evaluated. Issue 11's question 'is W-Gates behind
because of the widths it picks, or because of its training?', measured.

    python benchmarks/widths.py --dense-weights benchmarks/weights/resnet20_cifar10.safetensors \
        --rows cifar10_regime88_f25:wgates:0 cifar10_regime88_f25:l1:0 --epochs 1

`--drop BLOCK ...` also removes whole residual blocks after the cut (each replaced by its
identity shortcut; the widths of its convs are then ignored): depth as well as width, measured
on the same footing (docs/design.md, "ONNX Runtime at batch 1: the latency is in the blocks").
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from cifar10 import HERE, conv_widths, data_spec, make_measure
from torch import nn

from wgates.baselines import l1_ranked
from wgates.data import make_loaders
from wgates.latency import Protocol, settled
from wgates.models import create_model
from wgates.train import evaluate, train


def row_widths(spec: str, results: Path) -> list[int]:
    """`name:method:seed` -> that row's conv widths in results/<name>.json."""
    name, method, seed = spec.split(":")
    rows = json.loads((results / f"{name}.json").read_text())
    for r in rows:
        if r["method"] == method and int(r["seed"]) == int(seed):
            return [int(w) for w in r["widths"]]
    raise SystemExit(f"no row {method} seed {seed} in {results / name}.json")


def cut(dense: nn.Module, inputs: tuple, widths: list[int]) -> nn.Module:
    """`dense` cut to conv `widths` (in module order), the highest L1 norms kept per group."""
    gated = l1_ranked(copy.deepcopy(dense), inputs)
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    by_conv = dict(zip(names, widths))
    gated.set_masks(gated.masks_for_widths({g.name: by_conv[g.name] for g in gated.groups}))
    small = gated.extract()
    if conv_widths(small) != widths:
        raise SystemExit(f"widths {widths} are not reachable: got {conv_widths(small)}")
    return small


def drop_blocks(model: nn.Module, blocks: list[str]) -> None:
    """Replace each named residual block of `model` by its identity shortcut, in place. The
    block's output is then its input: exact up to what the branch added, which the fine-tune
    makes up for; a block whose shortcut is not the identity cannot be dropped."""
    for name in blocks:
        block = model.get_submodule(name)
        shortcut = getattr(block, "shortcut", getattr(block, "downsample", None))
        if shortcut is not None and not isinstance(shortcut, nn.Identity):
            raise SystemExit(f"{name} changes its input's shape (its shortcut is "
                             f"{type(shortcut).__name__}): only identity blocks can be dropped")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-weights", required=True)
    parser.add_argument("--data", help="data spec (default: cifar10:$WGATES_CIFAR10)")
    parser.add_argument("--rows", nargs="+", default=[],
                        help="results rows as name:method:seed, e.g. cifar10_regime88_f25:l1:0")
    parser.add_argument("--widths", nargs="+", default=[],
                        help="conv widths given directly, comma-separated in module order")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--epochs", type=int, default=1, help="0: only measure the latency")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch-cpu",
                        help="the backend the ratio is measured on (1 thread, batch 1)")
    parser.add_argument("--drop", nargs="+", default=[], metavar="BLOCK",
                        help="residual blocks removed after the cut, e.g. layer1.1 layer1.2")
    parser.add_argument("--out", type=Path, help="append one JSON record per row to this file")
    args = parser.parse_args(argv)
    args.data = data_spec(args.data, parser)

    train_loader, val_loader, info = make_loaders(args.data, 128)
    dense = create_model(args.model, info.num_classes, args.dense_weights).eval()
    inputs = (torch.randn(1, *info.input_shape),)
    measure = make_measure(dense, inputs, args.backend, Protocol(rounds=60, max_wait_s=60))
    given = [(spec, row_widths(spec, args.results)) for spec in args.rows]
    given += [(w, [int(x) for x in w.split(",")]) for w in args.widths]
    if not given:
        parser.error("give --rows or --widths")
    for spec, widths in given:
        small = cut(dense, inputs, widths)
        drop_blocks(small, args.drop)
        ratio, spread = settled(measure, small)
        record = {"row": spec, "widths": widths, "backend": args.backend, "ratio": ratio,
                  "spread": spread, "epochs": args.epochs, "seed": args.seed}
        if args.drop:
            record["dropped"] = args.drop
        if args.epochs:
            record["before"] = evaluate(small, val_loader)
            torch.manual_seed(args.seed)
            train(small, train_loader, args.epochs, lr=args.lr, teacher=dense, progress=False)
            record["accuracy"] = evaluate(small, val_loader)
        print(json.dumps(record), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
