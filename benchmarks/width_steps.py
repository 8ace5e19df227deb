"""Latency against one group's width, every width, on ONNX Runtime and torch-cpu (issue 15.3).

Why ONNX Runtime's LPNet error was 3-4x torch-cpu's while its noise was not higher: its CPU
convolutions run channels in blocks, so latency is not smooth in the width. This sweeps one
group (default: ResNet-20's last, 64 channels) from a quarter of its width to all of it, the
rest dense, each ratio to the dense model measured by the profiling protocol.

    python benchmarks/width_steps.py --lanes /tmp/lanes > benchmarks/results/width_steps.txt
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch
from lanes import Lanes

from wgates.gated import gate
from wgates.latency import Meter, Protocol, get_backend
from wgates.models import create_model, default_input_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--group", type=int, default=-1, help="index of the group swept")
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="measure alone: pause the other benchmark lanes in DIR")
    args = parser.parse_args()
    torch.set_num_threads(1)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    example = (torch.randn(1, *default_input_shape(args.model)),)
    gated = gate(model, example)
    group = gated.groups[args.group]
    widths = range(max(1, group.size // 4), group.size + 1)
    ratios: dict[str, list[float]] = {}
    for name in ("onnxruntime-cpu", "torch-cpu"):
        backend = get_backend(name, 1)
        with alone():
            meter = Meter(backend, backend.prepare(model, example), Protocol())
        for k in widths:
            gated.clear_masks()
            gated.set_masks(gated.masks_for_widths({group.name: k}))
            runner = backend.prepare(gated.extract(verify=False), example)
            with alone():
                ratios.setdefault(name, []).append(meter.measure(runner).ratio)
    print(f"{args.model}, group {group.name} ({group.size} channels), the rest dense; "
          "latency ratio to the dense model, 1 thread, batch 1")
    print("width onnxruntime-cpu torch-cpu")
    for k, ort, pt in zip(widths, ratios["onnxruntime-cpu"], ratios["torch-cpu"]):
        print(f"{k} {ort:.3f} {pt:.3f}")


if __name__ == "__main__":
    main()
