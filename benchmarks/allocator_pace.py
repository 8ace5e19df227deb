"""Why a batch-32 dense ResNet-20 reads 32 ms in one process and 45-51 ms in another
(docs/design.md, "At batch 32 on the AMD host it is the dense reference that changes pace").

glibc's malloc returns large freed blocks to the kernel (mmap'd chunks, heap trimming) and
faults them in again on the next forward; how often depends on the process's allocation
history (its dynamic mmap threshold). This times the dense model (torch-cpu, one thread,
thread CPU time, median of 9 calls) in new processes, `--processes` of each kind:
`fresh` as started, `trained` after 20 training steps at batch 128 in the same process, and
`fixed` with the thresholds pinned by the environment (MALLOC_MMAP_THRESHOLD_=64 MiB,
MALLOC_TRIM_THRESHOLD_=256 MiB), so that large blocks stay in the heap.

    python benchmarks/allocator_pace.py --processes 3 > benchmarks/results/allocator_pace_amd.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch

from wgates.latency import get_backend

FIXED = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def dense_ms(model: torch.nn.Module, batch: int) -> float:
    """The median of 9 single calls after 2 warm-up ones, timed as the meter times them."""
    backend = get_backend("torch-cpu", threads=1)
    time_calls = backend.timer(backend.prepare(model, (torch.randn(batch, 3, 32, 32),)))
    time_calls(2)
    return statistics.median(time_calls(1) for _ in range(9)) * 1e3


def child(kind: str, model_spec: str, batch: int) -> None:
    from wgates.models import create_model

    torch.set_num_threads(1)
    if kind == "trained":  # the allocation history of a process that has trained
        net = create_model(model_spec).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(20):
            loss = net(torch.randn(128, 3, 32, 32)).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(dense_ms(create_model(model_spec).eval(), batch))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--child", choices=["fresh", "trained", "fixed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.model, args.batch)
    readings: dict[str, list[float]] = {"fresh": [], "trained": [], "fixed": []}
    for _ in range(args.processes):  # interleaved, so that a slow spell of the host hits all
        for kind, values in readings.items():
            env = {**os.environ, **(FIXED if kind == "fixed" else {})}
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--model",
                                  args.model, "--batch", str(args.batch)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            values.append(float(out.split()[-1]))
    print(f"{args.model}, batch {args.batch}, torch-cpu, 1 thread: dense ms per process")
    for kind, values in readings.items():
        each = " ".join(f"{v:.1f}" for v in values)
        print(f"{kind:8s} {each}  median {statistics.median(values):.1f}")


if __name__ == "__main__":
    main()
