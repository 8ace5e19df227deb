"""Running under `torchrun`: one process per device, DistributedDataParallel for every training
step, and one rank (0) for what must happen once.

What runs where:
- every rank: the training steps of dense training, the gate search and the fine-tune, each
  on its shard of the data (`DistributedSampler`, its epoch set every epoch); gradients are
  averaged by DDP, so every rank holds the same weights and gates;
- rank 0 only: latency measurement (profiling, the closed loop, the final figure: the target
  hardware is one device, and timing two models side by side on it would be wrong), LPNet
  fitting, progress bars, logs, checkpoints, the report and exported files. The others wait
  at a barrier and receive the result (`once`);
- decisions that depend on per-rank statistics (the knapsack's widths, read from gate
  gradients each rank sees on its own shard) are made on rank 0 and broadcast.

Outside torchrun (no WORLD_SIZE in the environment, or 1) every function here is the
single-process identity, so the rest of the code does not branch on it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from wgates.errors import WgatesError

T = TypeVar("T")
TIMEOUT_S = float(os.environ.get("WGATES_BARRIER_TIMEOUT_S", 4 * 3600))  # rank 0 may profile
_monitor: dist.ProcessGroup | None = None  # gloo group for barriers that name a late rank


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the same variables) with > 1 rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(kind: str) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under a launcher when `kind` is cuda."""
    if kind == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def setup(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (nccl for CUDA, gloo on
    CPU); returns whether this is a multi-process run. A no-op outside a launcher."""
    global _monitor
    if not launched() or active():
        return active()
    if not dist.is_available():
        raise WgatesError("launched with WORLD_SIZE > 1, but this PyTorch has no "
                          "torch.distributed: install a build with it, or run one process")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group(backend, timeout=timeout)
    _monitor = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return True


def teardown() -> None:
    global _monitor
    if active():
        dist.destroy_process_group()
    _monitor = None


def barrier(what: str, timeout_s: float | None = None) -> None:
    """Wait for every rank; a rank that does not arrive within the timeout is named (gloo's
    monitored barrier, on a side group when the main backend is nccl), never a silent hang."""
    if not active():
        return
    timeout = datetime.timedelta(seconds=TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        dist.monitored_barrier(group=_monitor, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        raise WgatesError(
            f"waiting for all ranks at '{what}' took more than {timeout.total_seconds():.0f} "
            f"s: {err}. The rank(s) named there stopped or are stuck; set "
            "WGATES_BARRIER_TIMEOUT_S to wait longer") from None


def broadcast(value: T) -> T:
    """Rank 0's `value`, on every rank (an object of our own processes, pickled in transit)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_monitor)
    return box[0]


def once(what: str, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; the other ranks wait (named barrier) and receive its result.
    An error on rank 0 is sent to the others too, so that every rank stops with it."""
    result: tuple[bool, object] = (True, None)
    if is_main():
        try:
            result = (True, fn())
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            if not active():
                raise
            result = (False, err)
    barrier(what)
    ok, value = broadcast(result)
    if not ok:
        if is_main():
            raise value
        raise WgatesError(f"rank 0 failed at '{what}': {value}")
    return value


def wrap(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel when several ranks train, else `model` itself."""
    if not active():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP sends them at the start of
    each forward, so after the last step every rank holds its own batch's update; this makes
    the model every rank evaluates, and rank 0 saves, one and the same."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank: a decision to stop that every rank takes together
    (a rank that stopped alone would leave the others waiting in their next all-reduce)."""
    if not active():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_monitor)
    return bool(t.item())


def all_mean(value: float) -> float:
    """The mean of a per-rank number (a loss) over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_monitor)
    return float(t) / world_size()
