"""`wgates unify` on a channel-pruned ResNet-20 (CIFAR-10) at several settings: stored size,
accuracy, and latency against the input model on torch-cpu and ONNX Runtime (issue 12.5).

The input is the uniform-width ResNet-20 of the batch-32 regime (82.71%, committed under
benchmarks/weights/resnet20_uniform_b32). Each setting starts from it afresh. Latency is
measured interleaved with the input model, one thread, batch 1, alone (`--lanes`).

    WGATES_CIFAR10=<root> python benchmarks/unify.py --lanes /tmp/lanes \
        > benchmarks/results/unify.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from lanes import Lanes

from wgates.data import make_loaders
from wgates.extract import load_pruned
from wgates.models import create_model
from wgates.parts import measure_threads
from wgates.train import evaluate
from wgates.unify import is_unified, stored_bytes, unify

HERE = Path(__file__).resolve().parent
SETTINGS = [  # (block, ratio, zero)
    (4, 0.5, False),
    (4, 0.5, True),
]
BACKENDS = ("torch-cpu", "onnxruntime-cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", type=Path, default=HERE / "weights/resnet20_uniform_b32")
    parser.add_argument("--epochs", type=int, nargs=2, default=(1, 1),
                        metavar=("ADMM", "FINETUNE"))
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    root = os.environ.get("WGATES_CIFAR10")
    if not root:
        parser.error("set WGATES_CIFAR10=<root> (see the README, 'Benchmarks')")
    torch.set_num_threads(1)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    train_loader, val_loader, _ = make_loaders(f"cifar10:{root}", batch_size=128)
    base = load_pruned(create_model("resnet20"), args.pruned).eval()
    example = torch.randn(1, 3, 32, 32)
    rows = []
    for block, ratio, zero in SETTINGS:
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        result = unify(model, train_loader, block=block, ratio=ratio, zero=zero,
                       admm_epochs=args.epochs[0], finetune_epochs=args.epochs[1],
                       teacher=base, progress=False)
        assert is_unified(model, result)
        row = {"block": block, "ratio": ratio, "zero": zero, "accuracy": evaluate(model,
                                                                                 val_loader),
               "stored": stored_bytes(model, result)}
        with alone():
            for name in BACKENDS:
                row[name] = measure_threads(base, model.eval(), example, [1], name)[0]["ratio"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    plain, accuracy = stored_bytes(base), evaluate(base, val_loader)
    print("# wgates unify on a channel-pruned ResNet-20 (CIFAR-10)\n")
    print(f"Command: `python benchmarks/unify.py {' '.join(sys.argv[1:])}`. Input: "
          f"{args.pruned.name}, {accuracy:.2%}, {plain:,} bytes stored (float32, zlib). "
          f"ADMM {args.epochs[0]} epoch(s), then {args.epochs[1]} fine-tune epoch(s) with "
          "the blocks held, distilled from the input model. Latency: against the input "
          "model, interleaved, 1 thread, batch 1, measured alone.\n")
    print("| blocks unified | accuracy | stored bytes (zlib) | of the input's | "
          "torch-cpu latency ratio | ONNX Runtime latency ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kind = "to zero" if r["zero"] else "one magnitude, signs kept"
        print(f"| {r['ratio']:.0%} of blocks of {r['block']}, {kind} | {r['accuracy']:.2%} | "
              f"{r['stored']:,} | {r['stored'] / plain:.2f} | {r['torch-cpu']:.3f} | "
              f"{r['onnxruntime-cpu']:.3f} |")


if __name__ == "__main__":
    main()
