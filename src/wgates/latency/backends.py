"""Where and how latency is measured: backends (torch-cpu, onnxruntime-cpu, torch-cuda) and the
interleaved measurement protocol.

Absolute batch-1 latency on a shared machine drifts by several x between runs, while the ratio
of a candidate to the dense model timed right next to it holds within a few percent. So every
measurement is a set of alternating rounds (candidate, reference, reference, candidate, ...) and
the primary figure is the ratio of the two; milliseconds are kept too. See `Protocol`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import time
import timeit
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.export import on_device, onnx_bytes, onnx_session

Runner = Callable[[], object]


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), part of every fingerprint."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_avx512f() -> bool:
    """Whether this CPU has AVX-512F (from /proc/cpuinfo, else PyTorch's own CPU check)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class Backend(ABC):
    """Turns a plain model into a zero-argument runner and times runners on one device."""

    name: str
    # pruned widths are delivered in multiples of this (`GatedModel.snapped`): measured per
    # backend, where a runtime computes channels in blocks
    channel_multiple: int = 1

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise WgatesError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    @property
    def channel_block(self) -> int:
        """Above this many channels, widths are delivered in multiples of it (`allowed_widths`)."""
        return self.channel_multiple

    def width_grid(self, requested: int | None = None,
                   block: int | None = None) -> tuple[int, int]:
        """(multiple, block) of the widths pruning delivers (`wgates.gated.allowed_widths`):
        a `requested` multiple is used throughout (up to a requested `block`, if any), else
        this backend's own grid (with a requested `block` in place of its own). Why a block
        alone: at batch 32 on an AVX-512 host torch-cpu's stage-2 convs cost the same at 17
        to 32 channels, 0.56 of the dense ResNet-20 against 0.41 at 16 (docs/design.md,
        "torch-cpu's blocks at batch 32")."""
        multiple = requested or self.channel_multiple
        own = requested if requested else self.channel_block
        return multiple, max(block or own, multiple)

    @abstractmethod
    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Runner:
        """A callable running one inference of `model` on `example_inputs`."""

    @property
    def clock(self) -> Callable[[], float]:
        """With one thread, inference runs on the calling thread, so its CPU time is its
        latency minus the time other processes held the core: on a shared machine under a
        load of 6 on 2 cores, probe ratios measured by thread CPU time kept a CV of 4-6%
        against 14-40% by wall clock. With more threads only the wall clock is meaningful."""
        return time.thread_time if self.threads == 1 else time.perf_counter

    def timer(self, fn: Runner) -> Callable[[int], float]:
        """A function timing `number` back-to-back calls of `fn` (seconds per call).

        The stdlib `timeit.Timer` (GC off while timing), not torch.utils.benchmark: its
        `timeit` runs at least two hidden warm-up calls per timing, which triples the cost of
        the short interleaved timings this protocol is made of."""
        timer = timeit.Timer(fn, timer=self.clock)

        def per_call(number: int) -> float:
            # the thread count applies while timing only: the caller's training keeps its own
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return timer.timeit(number) / number
            finally:
                torch.set_num_threads(previous)

        return per_call

    def fingerprint(self) -> dict:
        """Everything about the software and hardware that changes latency."""
        import onnxruntime

        return {
            "backend": self.name,
            "threads": self.threads,
            "clock": self.clock.__name__,
            # the meter's allocator state (`pin_allocator`): a profile taken without it read
            # the batch-32 dense model up to 1.5x slower, so it is another setting's
            "allocator": "glibc-pinned" if _mallopt() is not None else "default",
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }

    def fingerprint_at(self, input_shape) -> dict:
        """`fingerprint` and the input's shape: what a latency measured on this backend, and
        the dense reference's time, hold for."""
        return {**self.fingerprint(), "batch": int(input_shape[0]),
                "input_shape": list(input_shape)}


class TorchCPU(Backend):
    """Eager PyTorch on CPU, inference mode, `threads` intra-op threads."""

    name = "torch-cpu"

    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Runner:
        model = on_device(model, "cpu").eval()
        inputs = tuple(x.cpu() for x in example_inputs)

        def run() -> object:
            with torch.inference_mode():
                return model(*inputs)

        return run


class OnnxRuntimeCPU(Backend):
    """The model exported to ONNX and run by ONNX Runtime's CPU provider, threads fixed.
    Its convolutions run channels in blocks: widths off a multiple of 8 measured 3-10% slower
    than the neighbouring multiples (5% on average; benchmarks/results/latency.md), so pruning
    delivers multiples of 8."""

    name = "onnxruntime-cpu"
    channel_multiple = 8

    @property
    def channel_block(self) -> int:
        """MLAS's NCHWc block on this CPU (16 channels with AVX-512F, else 8: onnxruntime
        core/mlas/lib/platform.cpp). A conv whose channels are not whole blocks runs outside
        the blocked layout with conversions around it: measured on ResNet-20 at batch 1 on an
        AVX-512 host, stage-2 widths of 24 ran as slowly as 32 and stage-3 widths of 40 as 48
        (docs/design.md)."""
        return 16 if has_avx512f() else 8

    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Runner:
        session = onnx_session(onnx_bytes(on_device(model, "cpu"), tuple(
            x.cpu() for x in example_inputs), dynamic_batch=False), self.threads)
        names = [i.name for i in session.get_inputs()]
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, example_inputs, strict=True)}
        return lambda: session.run(None, feeds)


class TorchCUDA(Backend):
    """Eager PyTorch on the current GPU, timed with CUDA events around synchronised blocks."""

    name = "torch-cuda"

    def __init__(self, threads: int) -> None:
        if not torch.cuda.is_available():
            raise WgatesError("backend torch-cuda needs a CUDA GPU: none is visible here")
        super().__init__(threads)

    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Runner:
        model = on_device(model, "cuda").eval()
        inputs = tuple(x.cuda() for x in example_inputs)

        def run() -> object:
            with torch.inference_mode():
                return model(*inputs)

        return run

    def timer(self, fn: Runner) -> Callable[[int], float]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def time(number: int) -> float:
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number

        return time

    def fingerprint(self) -> dict:
        gpu = torch.cuda.get_device_name()
        return {**super().fingerprint(), "clock": "cuda-events", "gpu": gpu}


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchCPU, OnnxRuntimeCPU, TorchCUDA)}


def get_backend(name: str, threads: int = 1) -> Backend:
    if name not in BACKENDS:
        raise WgatesError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](threads)


@dataclass(frozen=True)
class Protocol:
    """How hard to measure.

    `rounds` alternating candidate/reference timings (ABBA order, so linear drift cancels),
    each of enough calls to last `min_block_s`, after `warmup` calls. On a shared machine other
    processes only ever add time, in bursts, so the estimate is the ratio of the `quantile`-th
    per-call times rather than of means (measured here under load: CV 4% vs 9% for medians of
    15 ms blocks). `spread` is the IQR / median of the ratios of `chunks` consecutive chunks of
    rounds; above `max_spread` the measurement is retaken up to `retries` times.

    When other processes take most of the CPU the ratio itself breaks (a long call is
    preempted far more often than a short one: under a load of 9 on 2 cores, probes measured
    0.06-0.38 for a true 0.36). Such a measurement is recognised by the reference running over
    `max_slowdown` x its quietest time so far, and retaken every `busy_sleep_s` for up to
    `max_wait_s` (then kept, recognisable by its `dense_ms`).

    Milder slow spells move the ratio too. On a shared host the reference's own time jumps
    for seconds at a time from ~2.6 to 3.3-4.7 ms (one thread, CPU time, so not
    preemption), and a pruned ResNet-20 read 0.714 at the median of the slowest tenth of
    885 readings against 0.684 in the quickest quarter (59 fresh processes over 12 minutes;
    `docs/design.md`, "A ratio read while the host is slow"). A reading whose reference ran
    over `calm_slowdown` x its quietest time is retaken up to `slow_retries` times, every
    `busy_sleep_s`, and the quickest-reference one kept: most spells are short. The limit is
    1.08 since ONNX Runtime's batch-1 readings showed where the ratio breaks (ResNet-20, some
    800 readings pooled per architecture, docs/design.md): within 1.08x of the quiet time their
    median stays within 1% of the architecture's, from 1.10x it reads 10% high.

    Some last minutes, and a meter made inside one takes the spell for the host at rest
    (a re-measurement round caught in one read the same models up to 8.5% high). So the
    quiet time can be seeded from earlier readings of the same reference (`Meter(quiet_ms=)`,
    e.g. the latency profile's), and a reading still slow after the quick retakes is retaken
    for up to `calm_wait_s` before the quickest-reference one is kept (its `slowdown` says
    how slow). A spell that outlasts the wait, or a seed this host does not reach, becomes
    the quiet time until a quicker reading comes: one wait per spell, not one per reading.
    A pace once waited out in vain is not waited for again when it comes back after quicker
    readings: at batch 1 on torch-cpu a process's reference alternates between two heap
    levels 7% apart (1.72 and 1.85 ms), and each return to the slow one cost a full wait
    (a search's measurements took 724 s against 315 s before; docs/design.md).

    `processes`: an isolated meter (`wgates.latency.worker.IsolatedMeter`) reads each model
    in this many processes and keeps their mean. A batch-1 torch-cpu reading lands on one of
    two levels 4.6% apart, set per process (most likely by where the heap puts the tensors),
    and most processes keep theirs (docs/design.md, "Two levels at batch 1"):
    one process's reading is a draw, and so is the mean of a few. Two figures pooled over 5
    processes each differ by over 3% in ~2% of cases if the levels fall evenly, over 3
    processes in ~22%."""

    rounds: int = 60
    min_block_s: float = 0.001
    warmup: int = 3
    quantile: float = 0.25
    chunks: int = 5
    max_spread: float = 0.05
    retries: int = 1
    max_slowdown: float = 2.0
    calm_slowdown: float = 1.08
    slow_retries: int = 3
    calm_wait_s: float = 60.0
    busy_sleep_s: float = 1.0
    max_wait_s: float = 300.0
    processes: int = 5


@dataclass(frozen=True)
class Measurement:
    """One candidate against the dense reference: `ratio` = candidate / dense latency."""

    ratio: float
    ms: float
    dense_ms: float
    spread: float
    attempts: int = 1
    slowdown: float = 1.0  # the reference's time over the meter's quiet time when it was read


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None where there is none (not Linux, or musl)."""
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@functools.cache
def pin_allocator(mmap_bytes: int = 64 << 20, trim_bytes: int = 256 << 20) -> bool:
    """Pin glibc malloc's mmap and trim thresholds for this process; True where applied
    (Linux with glibc). Otherwise glibc hands large freed blocks back to the kernel and
    faults them in on the next call, as often as a threshold set by the process's history
    allows: a dense ResNet-20 at batch 32 read 50 ms in a new process and 32-35 ms after
    training or pinned, while its pruned models (smaller tensors) did not change
    (`benchmarks/allocator_pace.py`). Pinned, every measurement sees one allocator state.
    The cost: up to `trim_bytes` of freed heap stays with the process."""
    mallopt = _mallopt()
    return (mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes))
            and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes)))


class Meter:
    """Measures candidates against one dense reference runner with a fixed protocol."""

    def __init__(self, backend: Backend, reference: Runner, protocol: Protocol = Protocol(),
                 quiet_ms: float = math.inf):
        pin_allocator()  # before the reference is timed: one allocator state for every reading
        self.protocol = protocol
        self.backend = backend
        self.reference = self._prepare(reference)
        # the reference's time with the machine at rest: seeded, else the quickest seen here
        self.quiet_ms = quiet_ms
        # the slowest pace a wait ended at in vain: not waited for again (see `measure`)
        self.waited_ms = 0.0

    def _prepare(self, fn: Runner) -> tuple[Callable[[int], float], int]:
        """(timer, calls per timing): warms `fn` up and times it once to size its blocks."""
        timer = self.backend.timer(fn)
        per_call = timer(self.protocol.warmup)
        return timer, max(1, round(self.protocol.min_block_s / max(per_call, 1e-7)))

    def _estimate(self, c: np.ndarray, r: np.ndarray) -> float:
        q = self.protocol.quantile
        return float(np.quantile(c, q) / np.quantile(r, q))

    def _once(self, candidate: tuple[Callable[[int], float], int]) -> Measurement:
        (c_time, c_number), (r_time, r_number) = candidate, self.reference
        c, r = [], []
        for i in range(self.protocol.rounds):
            if i % 2 == 0:
                c.append(c_time(c_number))
                r.append(r_time(r_number))
            else:
                r.append(r_time(r_number))
                c.append(c_time(c_number))
        c, r = np.array(c), np.array(r)
        ratio = self._estimate(c, r)
        parts = [
            self._estimate(cc, rr)
            for cc, rr in zip(
                np.array_split(c, self.protocol.chunks),
                np.array_split(r, self.protocol.chunks),
                strict=True,
            )
        ]
        q1, med, q3 = np.quantile(parts, [0.25, 0.5, 0.75])
        q = self.protocol.quantile
        return Measurement(
            ratio=ratio,
            ms=float(np.quantile(c, q)) * 1e3,
            dense_ms=float(np.quantile(r, q)) * 1e3,
            spread=float((q3 - q1) / med),
        )

    def measure(self, candidate: Runner) -> Measurement:
        """The candidate's ratio to the reference; a noisy measurement is taken again and the
        tightest attempt is kept."""
        p = self.protocol
        prepared = self._prepare(candidate)
        start = time.monotonic()
        calm: list[Measurement] = []
        slow: list[Measurement] = []  # the reference over calm_slowdown x its quiet time
        busy: list[Measurement] = []  # ... over max_slowdown x: the ratio itself breaks
        while True:
            m = self._once(prepared)
            self.quiet_ms = min(self.quiet_ms, m.dense_ms)
            m = replace(m, slowdown=m.dense_ms / self.quiet_ms)
            if m.dense_ms <= p.calm_slowdown * max(self.quiet_ms, self.waited_ms):
                calm.append(m)
                if m.spread <= p.max_spread or len(calm) > p.retries:
                    break
                continue
            (slow if m.slowdown <= p.max_slowdown else busy).append(m)
            waited = time.monotonic() - start
            if (len(slow) > p.slow_retries and waited >= p.calm_wait_s) or waited > p.max_wait_s:
                break
            time.sleep(p.busy_sleep_s)
        if calm:
            best = min(calm, key=lambda m: m.spread)
        else:  # the machine never calmed down: the reading nearest to it at rest
            best = min(slow or busy, key=lambda m: m.dense_ms)
            if slow:  # waited in vain: this is the host's pace for now
                self.quiet_ms = best.dense_ms
                self.waited_ms = max(self.waited_ms, best.dense_ms)
        return replace(best, attempts=len(calm) + len(slow) + len(busy))


def settled(measure: Callable[[nn.Module], tuple[float, float]], model: nn.Module,
            repeats: int = 3, agree: float = 0.03, most: int = 9) -> tuple[float, float]:
    """The latency figure to deliver: the median of `repeats` measurements, with more taken
    (up to `most`) while the middle half of them spans more than `agree` of the median, so
    that one noisy spell cannot set the figure. Returns (median ratio, that relative span)."""
    ratios = [measure(model)[0] for _ in range(repeats)]
    while True:
        low, mid, high = np.quantile(ratios, [0.25, 0.5, 0.75])
        span = float((high - low) / mid)
        if span <= agree or len(ratios) >= most:
            return float(mid), span
        ratios.append(measure(model)[0])
