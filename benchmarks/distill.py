"""Does knowledge distillation help the fine-tune? The *same* pruned models fine-tuned with
and without KD from the dense model, side by side, over seeds (issue #5 asks; the answer
sets `wgates.prune(distill=...)`'s default).

    python benchmarks/distill.py --dense-weights dense.safetensors --pruned runs/r20/pruned \\
        --uniform 0.45 --subset 10000 --epochs 2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from cifar10 import HERE, data_spec, limited

from wgates.baselines import extract_at, l1_ranked
from wgates.data import make_loaders
from wgates.extract import load_pruned
from wgates.models import create_model
from wgates.train import evaluate, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-weights", required=True)
    parser.add_argument("--data", help="data spec (default: cifar10:$WGATES_CIFAR10)")
    parser.add_argument("--pruned", action="append", default=[], type=Path,
                        help="a saved pruned model (e.g. a run's pruned/ directory)")
    parser.add_argument("--uniform", action="append", default=[], type=float,
                        help="also: every group kept at this fraction (L1 choice)")
    parser.add_argument("--subset", type=int, default=None, help="training images used")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distill.json")
    args = parser.parse_args(argv)
    args.data = data_spec(args.data, parser)

    train_loader, val_loader, info = make_loaders(args.data, 128, subset=None)
    train_loader = limited(train_loader, args.subset, shuffle=True)
    dense = create_model(args.model, info.num_classes, args.dense_weights).eval()
    inputs = (torch.randn(1, *info.input_shape),)
    models = {str(p): load_pruned(create_model(args.model, info.num_classes), p)
              for p in args.pruned}
    if args.uniform:
        ranked = l1_ranked(dense, inputs)
        for x in args.uniform:
            models[f"uniform {x}"] = extract_at(ranked, dict.fromkeys(ranked.widths(), x))
    rows = []
    for name, pruned in models.items():
        for distill in (False, True):
            accs = []
            for seed in args.seeds:
                model = copy.deepcopy(pruned)
                torch.manual_seed(seed)
                train(model, train_loader, args.epochs, lr=args.lr,
                      teacher=dense if distill else None, progress=False)
                accs.append(evaluate(model, val_loader))
            rows.append({"model": name, "distill": distill, "accuracies": accs,
                         "mean": statistics.mean(accs)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))
    print("| pruned model | fine-tune | accuracy (mean over seeds) | per seed |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {'KD' if r['distill'] else 'labels'} | {100 * r['mean']:.2f}% "
              f"| {', '.join(f'{100 * a:.2f}' for a in r['accuracies'])} |")


if __name__ == "__main__":
    main()
