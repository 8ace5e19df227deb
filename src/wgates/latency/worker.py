"""A `Meter` in a process of its own that never trains.

Why: after a process has trained a pruned network, the same untrained model reads ~2% slower
against its dense reference there than in a new process (ResNet-20 at batch 32, torch-cpu:
0.478 -> 0.487-0.490; `benchmarks/host_spells.py train --what copy`), while a deployment
serves the model from a process that never trained. Not the weights, not denormals, not the
thread pool, not memory `malloc_trim` returns (docs/design.md). A worker started before the
search keeps the state of a new process for every reading of the run.

Models travel pickled (`torch.save` of the whole module), so their classes must be
importable in a new Python process: a class defined in a script run as `__main__` is not,
and `start` says so.
"""

from __future__ import annotations

import copy
import io
import math
import multiprocessing as mp
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.latency.backends import Measurement, Meter, Protocol, get_backend


def _pickled(model: nn.Module) -> bytes:
    """`model` as bytes, its tensors on the CPU (the worker measures CPU backends)."""
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    buffer = io.BytesIO()
    try:
        torch.save(model if on_cpu else copy.deepcopy(model).cpu(), buffer)
    except Exception as err:  # pickling: a local class, a lambda held by the model
        raise WgatesError(f"{type(model).__name__} cannot be sent to the measurement process "
                          f"({err}): define its class in an importable module, or measure "
                          "in this process") from None
    return buffer.getvalue()


def _serve(conn, backend: str, threads: int, dense: bytes, inputs: Sequence[torch.Tensor],
           protocol: Protocol, quiet_ms: float) -> None:
    """The worker's loop: build the meter, then answer each model's bytes with a
    `Measurement` (or ('error', text)) until 'stop' or the pipe closes."""
    def load(data: bytes) -> nn.Module:  # our own parent's bytes, not a user's file
        return torch.load(io.BytesIO(data), weights_only=False).eval()

    try:
        hardware = get_backend(backend, threads)
        meter = Meter(hardware, hardware.prepare(load(dense), inputs), protocol, quiet_ms)
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            request, payload = conn.recv()
        except EOFError:
            return
        if request == "stop":
            return
        try:
            conn.send(("ok", meter.measure(hardware.prepare(load(payload), inputs))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class IsolatedMeter:
    """`Meter.measure` for models, run in a spawned process that only measures: every
    reading sees a process that has never trained. `quiet_ms` as `Meter`'s."""

    def __init__(self, backend: str, threads: int, dense: nn.Module,
                 example_inputs: Sequence[torch.Tensor], protocol: Protocol = Protocol(),
                 quiet_ms: float = math.inf) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        inputs = tuple(x.detach().cpu() for x in example_inputs)
        dense_bytes = _pickled(dense)
        self._process = context.Process(
            target=_serve, args=(child, backend, threads, dense_bytes, inputs, protocol,
                                 quiet_ms), daemon=True, name="wgates-meter")
        self._process.start()
        child.close()
        self._reply("start the measurement process")
        self.protocol = protocol

    def _reply(self, doing: str):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise WgatesError(f"the measurement process ended while asked to {doing}: "
                              "measure in this process instead") from None
        if status == "error":
            raise WgatesError(f"the measurement process could not {doing}: "
                              f"{payload.strip().splitlines()[-1]}")
        return payload

    def measure(self, model: nn.Module) -> Measurement:
        self._conn.send(("measure", _pickled(model)))
        return self._reply("measure a model (is its class importable from a new process?)")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def __enter__(self) -> IsolatedMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
