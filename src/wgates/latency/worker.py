"""A `Meter` in a process of its own that never trains.

Why: after a process has trained a pruned network, the same untrained model reads ~2% slower
against its dense reference there than in a new process (ResNet-20 at batch 32, torch-cpu:
0.476-0.478 -> 0.486-0.488; `benchmarks/host_spells.py train --what copy`), while a deployment
serves the model from a process that never trained. Not the weights, not denormals, not the
thread pool, not memory `malloc_trim` returns (docs/design.md). The worker, a new process
started at the first measurement and never training, keeps that state for every reading.

The worker is a new interpreter (`worker.main`), not a multiprocessing child: spawning one
re-runs the caller's script, which an unguarded training script must not see. Models travel
pickled over two pipes, so their classes must be importable there (the caller's `sys.path`
is passed on, and the files of `path/to/file.py:Class` models are imported there under the
same names); a class defined in `__main__` or a notebook is not, and `IsolatedMeter` refuses
it when it starts.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection

import numpy as np
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.latency.backends import Measurement, Meter, Protocol, get_backend
from wgates.models import USER_MODULE_PREFIX, import_file


def _pickled(model: nn.Module) -> bytes:
    """`model` as bytes, its tensors on the CPU (the worker measures CPU backends)."""
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    try:
        return pickle.dumps(model if on_cpu else copy.deepcopy(model).cpu())
    except Exception as err:  # a local class, a lambda held by the model
        raise WgatesError(f"{type(model).__name__} cannot be sent to the measurement process "
                          f"({err}): define its class in an importable module, or measure "
                          "in this process (isolated=False)") from None


def _send(conn: Connection, message: object) -> None:
    """Plain pickle over the pipe: `Connection.send` would share tensors through torch's
    multiprocessing reductions, which need a multiprocessing parent."""
    conn.send_bytes(pickle.dumps(message))


def _recv(conn: Connection):  # our own caller's bytes, not a user's file
    return pickle.loads(conn.recv_bytes())


def serve(requests: Connection, replies: Connection) -> None:
    """The worker's loop. The first request builds the meter (backend, threads, the dense
    model's bytes, inputs, protocol, quiet time); then ('measure', a model's bytes) is
    answered with the `Measurement` and the meter's quiet time, ('quiet', ms) by setting
    that time, every failure with ('error', text), until 'stop' or the pipe closes."""
    try:
        backend, threads, dense, inputs, protocol, quiet_ms, files = _recv(requests)
        for name, path in files.items():  # the caller's `path/to/file.py:Class` models
            import_file(path, name)
        hardware = get_backend(backend, threads)
        reference = hardware.prepare(pickle.loads(dense).eval(), inputs)
        meter = Meter(hardware, reference, protocol, quiet_ms)
        _send(replies, ("ok", meter.quiet_ms))
    except Exception:
        _send(replies, ("error", traceback.format_exc()))
        return
    while True:
        try:
            request, payload = _recv(requests)
        except EOFError:
            return
        if request == "stop":
            return
        try:
            if request == "measure":
                m = meter.measure(hardware.prepare(pickle.loads(payload).eval(), inputs))
                _send(replies, ("ok", (m, meter.quiet_ms)))
            else:  # "quiet"
                meter.quiet_ms = payload
                _send(replies, ("ok", meter.quiet_ms))
        except Exception:
            _send(replies, ("error", traceback.format_exc()))


class _Worker:
    """One measuring process: started, asked, stopped."""

    def __init__(self) -> None:
        from_parent, to_worker = os.pipe()  # (read end, write end)
        from_worker, to_parent = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from wgates.latency.worker import main; "
             "main(sys.argv[1:])", str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent), env=env)
        os.close(from_parent)
        os.close(to_parent)
        self.requests = Connection(to_worker, readable=False)
        self.replies = Connection(from_worker, writable=False)

    def reply(self, doing: str):
        try:
            status, payload = _recv(self.replies)
        except EOFError:
            raise WgatesError(f"the measurement process ended while asked to {doing}: "
                              "measure in this process instead (isolated=False)") from None
        if status == "error":
            raise WgatesError(f"the measurement process could not {doing}: "
                              f"{payload.strip().splitlines()[-1]}")
        return payload

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                _send(self.requests, ("stop", None))
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.requests.close()
        self.replies.close()


def process_mean(readings: Sequence[Measurement]) -> Measurement:
    """One figure from readings of the same model in several processes: their mean, with the
    standard error of that mean (or the readings' own spread, if larger) as its spread. Why
    the mean: at batch 1 on torch-cpu a reading lands on one of two levels 4.6% apart, set
    per process, most likely by where the heap put the tensors (ResNet-20 pruned to 0.48:
    0.468 or 0.490, 12 processes x 4 readings; docs/design.md), so the median of a few
    readings is either level and the mean is the expected one."""
    ratios = np.array([m.ratio for m in readings])
    mean = float(ratios.mean())
    error = float(ratios.std(ddof=1) / math.sqrt(len(ratios)) / mean) if len(ratios) > 1 else 0.0
    return Measurement(
        ratio=mean, ms=float(np.mean([m.ms for m in readings])),
        dense_ms=float(np.mean([m.dense_ms for m in readings])),
        spread=max(error, float(np.median([m.spread for m in readings]))),
        attempts=sum(m.attempts for m in readings),
        slowdown=max(m.slowdown for m in readings))


class IsolatedMeter:
    """`Meter.measure` for models, run in `protocol.processes` new Python processes that
    only measure: every reading sees processes that have never trained, and a model's figure
    is their mean (`process_mean`). `quiet_ms` as `Meter`'s (the quickest process's)."""

    def __init__(self, backend: str, threads: int, dense: nn.Module,
                 example_inputs: Sequence[torch.Tensor], protocol: Protocol = Protocol(),
                 quiet_ms: float = math.inf) -> None:
        dense_bytes = _pickled(dense)  # refused here, before a process is started
        inputs = tuple(x.detach().cpu() for x in example_inputs)
        files = {name: module.__file__ for name, module in list(sys.modules.items())
                 if name.startswith(USER_MODULE_PREFIX) and getattr(module, "__file__", None)}
        self._workers = [_Worker() for _ in range(max(1, protocol.processes))]
        for worker in self._workers:  # all start at once; each then builds its meter
            _send(worker.requests, (backend, threads, dense_bytes, inputs, protocol, quiet_ms,
                                    files))
        self._quiet = [w.reply("start (is the dense model's class importable from a new "
                               "process?)") for w in self._workers]

    def measure(self, model: nn.Module) -> Measurement:
        """`model` read in each process in turn (never two at once: they would share the
        cores), averaged."""
        payload = _pickled(model)
        readings = []
        for i, worker in enumerate(self._workers):
            _send(worker.requests, ("measure", payload))
            m, self._quiet[i] = worker.reply(
                "measure a model (is its class importable from a new process?)")
            readings.append(m)
        return process_mean(readings)

    @property
    def quiet_ms(self) -> float:
        """The dense reference's time at rest, as `Meter.quiet_ms` (the quickest worker's)."""
        return min(self._quiet)

    @quiet_ms.setter
    def quiet_ms(self, ms: float) -> None:  # seeded, e.g. from a latency profile
        for i, worker in enumerate(self._workers):
            _send(worker.requests, ("quiet", float(ms)))
            self._quiet[i] = worker.reply("seed the dense model's time at rest")

    @property
    def processes(self) -> list[subprocess.Popen]:
        """The measuring processes, one per `protocol.processes`."""
        return [w.process for w in self._workers]

    def close(self) -> None:
        for worker in self._workers:
            worker.close()

    def __del__(self) -> None:  # a worker must not outlive its meter
        for worker in getattr(self, "_workers", ()):
            if worker.process.poll() is None:
                worker.process.kill()

    def __enter__(self) -> IsolatedMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(fds: Sequence[str]) -> None:
    """The worker process's entry: the pipes' file descriptors (requests, replies)."""
    serve(Connection(int(fds[0]), writable=False), Connection(int(fds[1]), readable=False))
