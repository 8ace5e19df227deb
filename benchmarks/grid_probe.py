"""The channel block `wgates.latency.grid.probe_block` finds for a model at each batch, with
what it read (what `channel_block="auto"` / `--channel-block auto` would use).

    python benchmarks/grid_probe.py --model resnet20 \
        --weights benchmarks/weights/resnet20_cifar10.safetensors --batches 1 32
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load_file

from wgates.latency.grid import probe_block
from wgates.models import create_model, default_input_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--weights", help="safetensors state dict (default: random weights)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--backend", default="torch-cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = create_model(args.model).eval()
    if args.weights:
        model.load_state_dict(load_file(args.weights))
    for batch in args.batches:
        start = time.perf_counter()
        found = probe_block(model, torch.randn(batch, *default_input_shape(args.model)),
                            args.backend, args.threads)
        print(f"batch {batch}: {found.summary()} [{time.perf_counter() - start:.0f} s]",
              flush=True)


if __name__ == "__main__":
    main()
