"""The parts of `wgates.prune` for a training loop of your own (any task, any loss):

    gated = wgates.gate(model, example)                       # gates on a copy of the model
    measure = wgates.LatencyMeter(model, example)             # latency / dense, on this machine
    cost = wgates.fit_latency(gated, "latency.sqlite")        # LPNet: differentiable latency
    term = wgates.LatencyTerm(gated, cost, 0.5, steps, measure=measure)
    for x, y in loader:                                       # your loop, your loss
        loss = my_loss(gated(x), y) + term()                  # one call per step
        ...
    small, loop = term.close_loop(loader)                     # measured on the hardware
    wgates.finetune(small, loader, 3, teacher=model, loss_fn=my_loss)
    wgates.save_pruned(small, "pruned/"); wgates.export_onnx(small, example, "small.onnx")

Each piece is the one `wgates.prune` runs (`wgates.search`, `wgates.latency`,
`wgates.predictor`); nothing here is a second implementation of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wgates.defaults import PRUNE
from wgates.errors import WgatesError
from wgates.gated import GatedModel
from wgates.groups import as_input_tuple
from wgates.latency import (
    LatencyStore,
    Measurement,
    Meter,
    Protocol,
    architecture_key,
    get_backend,
    profile,
    profiled_quiet_ms,
    settled,
)
from wgates.latency.worker import IsolatedMeter
from wgates.macs import MacsModel
from wgates.predictor import LatencyPredictor, fit_file, fit_proxy
from wgates.search import (
    Cost,
    KnapsackSchedule,
    LatencyLoss,
    LoopStep,
    accepted_band,
    closed_loop,
    latency_control,
    parse_target,
)
from wgates.train import LossFn, classification_loss

PROXIES = ("latency", "flops", "params")


class LatencyMeter:
    """`meter(model) -> (latency / dense latency, spread)`, measured on `backend` against
    `dense` timed right beside it (`wgates.latency.Meter`: alternating rounds, so the ratio
    holds where absolute times drift). The dense reference is prepared at the first
    measurement, not before: under torchrun only the rank that measures pays for it.

    `isolated` (CPU backends): measure in a process of its own that never trains
    (`wgates.latency.worker.IsolatedMeter`, started at the first measurement): after this
    process has trained a pruned network it reads that network ~2% slower than a new
    process, where the model will be served, does. Each model is read in
    `protocol.processes` of them and their mean kept (`Protocol`). A model whose class a new
    process cannot import (defined in a notebook or in the script run) is measured here,
    with a warning."""

    def __init__(self, dense: nn.Module, example_inputs: torch.Tensor | tuple,
                 backend: str = "torch-cpu", threads: int = PRUNE.threads,
                 protocol: Protocol = Protocol(), isolated: bool = False) -> None:
        self.backend = get_backend(backend, threads)
        self.inputs = as_input_tuple(example_inputs)
        self.dense, self.protocol = dense, protocol
        self.isolated = isolated and self.backend.name != "torch-cuda"
        self._meter: Meter | IsolatedMeter | None = None
        self._quiet_ms = math.inf
        self._readings: Path | None = None

    @property
    def meter(self) -> Meter | IsolatedMeter:
        if self._meter is None and self.isolated:
            try:
                self._meter = IsolatedMeter(self.backend.name, self.backend.threads,
                                            self.dense.eval(), self.inputs, self.protocol,
                                            self._quiet_ms)
            except WgatesError as err:
                warnings.warn(f"{err}; measuring in this process, where readings after "
                              "training run ~2% high", stacklevel=2)
                self.isolated = False
        if self._meter is None:
            self._meter = Meter(self.backend, self.backend.prepare(self.dense.eval(),
                                                                   self.inputs), self.protocol,
                                self._quiet_ms)
        return self._meter

    def read(self, model: nn.Module) -> Measurement:
        """The whole measurement of `model` (ratio, spread and the dense model's time); with
        `remember`, its ratio and spread are those of every reading of this architecture
        kept so far."""
        meter = self.meter  # first: it may fall back to this process
        if self.isolated:
            m = meter.measure(model)
        else:
            m = meter.measure(self.backend.prepare(model.eval(), self.inputs))
        return m if self._readings is None else self._pooled(model, m)

    def remember(self, path: str | Path) -> None:
        """Keep every reading in the latency file `path` and answer with the median of all
        the readings of the same architecture taken in the same setting (this backend and
        input, this dense reference, isolated or not), earlier runs' included. Why: a model
        within the host's drift of a decision's threshold (0.26% between two runs of one
        seed, docs/design.md) was kept by one run and dropped by the next; pooled, a second
        run reads what the first did and more, and the figure sharpens with every run."""
        self._readings = Path(path)

    def _pooled(self, model: nn.Module, m: Measurement) -> Measurement:
        setting = {**self.backend.fingerprint_at(self.inputs[0].shape),
                   "isolated": self.isolated, "dense": architecture_key(self.dense),
                   **({"processes": self.protocol.processes} if self.isolated else {})}
        arch = architecture_key(model)
        store = LatencyStore(self._readings)
        try:
            store.add_reading(setting, arch, m)
            ratios = store.readings(setting, arch)
        finally:
            store.close()
        if len(ratios) < 3:  # too few for a spread of their own
            return replace(m, ratio=float(np.median(ratios)))
        low, mid, high = np.quantile(ratios, [0.25, 0.5, 0.75])
        return replace(m, ratio=float(mid), spread=float((high - low) / mid))

    def seed_quiet(self, profile: str | Path) -> None:
        """Take the dense model's time at rest from the latency profile `profile` measured
        for this model and backend (`LatencyStore.quiet_ms`; nothing when it has none), so
        that a slow spell of the host is seen as one from the first reading on."""
        quiet = profiled_quiet_ms(profile, self.backend.fingerprint_at(self.inputs[0].shape))
        self._quiet_ms = min(self._quiet_ms, quiet)
        if self._meter is not None:
            self._meter.quiet_ms = min(self._meter.quiet_ms, quiet)

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        m = self.read(model)
        return m.ratio, m.spread

    def dense_ms(self) -> float:
        """The dense model's latency in milliseconds (for a target given as a time)."""
        return self.read(self.dense).dense_ms

    def settled(self, model: nn.Module) -> tuple[float, float]:
        """The figure to report: the settled median of several measurements (`settled`)."""
        return settled(self, model)


def measure_threads(dense: nn.Module, model: nn.Module, example_inputs: torch.Tensor | tuple,
                    threads: Sequence[int], backend: str = "torch-cpu",
                    protocol: Protocol = Protocol(), repeats: int = 3,
                    isolated: bool = False) -> list[dict]:
    """`model`'s settled latency ratio to `dense` at each thread count, both timed at that
    count (rows of threads, ratio, spread, dense_ms). Why: the widths were chosen for one
    thread count, and at another each layer shares its work differently, so the same model
    is another fraction of the dense one there. `isolated`: as `LatencyMeter`'s."""
    rows = []
    for count in threads:
        meter = LatencyMeter(dense, example_inputs, backend, count, protocol, isolated)
        ratio, spread = settled(meter, model, repeats=repeats)
        rows.append({"threads": count, "ratio": ratio, "spread": spread,
                     "dense_ms": meter.meter.quiet_ms})
    return rows


def fit_latency(gated: GatedModel, path: str | Path = "latency.sqlite", *,
                backend: str = "torch-cpu", threads: int = PRUNE.threads,
                samples: int = PRUNE.samples, proxy: str = "latency",
                lookup_table: bool = False, protocol: Protocol = Protocol(),
                progress: bool = True) -> LatencyPredictor:
    """The cost model `LatencyTerm` reads: kept channels per group -> predicted latency /
    dense latency, differentiable (its own parameters frozen).

    `proxy="latency"`: LPNet fitted on `samples` width configurations measured on `backend`
    (at least 10; kept in the SQLite file `path`, so a second call resumes or reuses them);
    `"flops"` / `"params"`: the same net fitted on counted MACs or parameters, no
    measurement. `lookup_table` also profiles the per-conv table LPNet is compared with
    (`fit_and_compare`); off by default, since the fit does not use it."""
    if proxy not in PROXIES:
        raise WgatesError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    if proxy != "latency":
        net = fit_proxy(gated, proxy)
    else:
        run = profile(gated.plain_copy(), list(gated.example_inputs[0].shape), path,
                      samples=samples, backend=backend, threads=threads, protocol=protocol,
                      progress=progress, lookup_table=lookup_table,
                      channel_multiple=gated.channel_multiple,  # the widths it will deliver
                      channel_block=gated.channel_block, depth=bool(gated.droppable))
        net = fit_file(path, run, macs=MacsModel.of(gated)).predictor
    return net.requires_grad_(False)


class LatencyTerm:
    """The latency part of a training loss: call it once per training step of the gated
    model and add what it returns to your loss; then `close_loop` measures and delivers.

    `target`: the latency wanted, a fraction of the dense model's measured latency; `steps`:
    how many training steps you will run (the aim falls from the dense model to the target
    over the first `ramp` of them). With `allocation="knapsack"` (the default, as in
    `wgates.prune`) the term is zero and sets the widths itself, from the importance the
    gates' gradients show in your backward passes; with `"gradient"` it is the paper's
    adaptive latency loss, whose gradient moves the widths (train the gate offsets with
    `wgates.search.search_optimizers` then). The search aims at the middle of the band
    `accepted_band(target, tolerance)` that the closed loop accepts, so that the cost
    model's error and the measurement noise do not push its decision out of it; with
    `measure` the knapsack measures its widths when the ramp ends (`KnapsackSchedule`).
    `importance`, `loader`, `loss_fn`: `importance="loss"` values units by the `loss_fn`
    (output, target) measured on two batches of `loader`. `stats` holds the last step's
    predicted latency and aim (or latency weight)."""

    def __init__(self, gated: GatedModel, cost: Cost, target: float, steps: int, *,
                 measure: LatencyMeter | None = None, tolerance: float = PRUNE.tolerance,
                 allocation: str = PRUNE.allocation, ramp: float | None = None,
                 floor: float = PRUNE.floor, importance: str = PRUNE.importance,
                 loader: Iterable | None = None,
                 loss_fn: LossFn = classification_loss) -> None:
        self.gated, self.cost, self.measure = gated, cost, measure
        self.target, self.tolerance = parse_target(target), tolerance
        band = accepted_band(self.target, tolerance)
        self.aim = band.middle
        self.control: LatencyLoss | KnapsackSchedule = latency_control(
            gated, cost, self.aim, steps, allocation, ramp, floor, measure,
            band=band, importance=importance,
            loader=loader, loss_fn=loss_fn)
        self.stats: dict = {}

    def __call__(self) -> torch.Tensor:
        value, self.stats = self.control()
        return value

    @property
    def calibration(self) -> list[dict]:
        """The knapsack's measurements when its ramp ended (predicted and measured)."""
        return getattr(self.control, "calibration", [])

    def close_loop(self, loader: Iterable | None = None, max_steps: int = 8,
                   blocks: Sequence[int] = ()) -> tuple[nn.Module, list[LoopStep]]:
        """Extract, measure, correct until the measured latency lies in the band
        (`wgates.search.closed_loop`); returns the extracted model and the loop's steps
        (predicted and measured). A final miss is in the steps, not raised. `loader`
        re-estimates BatchNorm statistics when the delivered widths are not the searched
        ones. `blocks`: then widen where the hardware gives channels for free
        (`wgates.search.widen_to_blocks`). The gated model is left in eval mode, its masks at
        the loop's last step."""
        if self.measure is None:
            raise WgatesError("close_loop measures on the hardware: make the LatencyTerm "
                              "with measure=wgates.LatencyMeter(model, example_inputs)")
        return closed_loop(self.gated.eval(), self.cost, self.measure, self.target,
                           self.tolerance, max_steps,
                           propose=getattr(self.control, "masks_at", None), loader=loader,
                           blocks=blocks)

    def state_dict(self) -> dict:
        return self.control.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue a resumed loop where the term was (its step, widths, latency weight)."""
        self.control.load_state_dict(state)
