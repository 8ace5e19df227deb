"""Building the latency dataset: which width configurations to measure, and the resumable
measuring loop behind `wgates profile`.

Configurations are a pure function of (seed, sample index), so a resumed run continues the
sequence where the killed one stopped instead of repeating configurations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wgates.latency.backends import Backend, Meter, Protocol, Runner, get_backend
from wgates.latency.store import LatencyStore, Run, Sample

# Share of random configurations drawn from each family (indices 0 and 1 are dense and min).
FAMILIES = {"uniform": 0.35, "near_uniform": 0.35, "random": 0.30}
NEAR_UNIFORM_JITTER = 0.1
# Uniform width ratios of the probe configurations re-measured to estimate the noise floor.
PROBE_RATIOS = (0.75, 0.5, 0.25)
# Share of the groups that may drop their block (minimum 0) kept at 0 in a random
# configuration: a dropped block costs far less than its narrowest width (wgates.depth), a
# step LPNet learns only from samples that take it.
DROP_SHARE = 0.25
# Fractions of each layer's dense in/out channels measured for the lookup-table predictor.
LUT_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
LUT_PROTOCOL = Protocol(rounds=20, retries=0)


def _clip_widths(groups: Sequence, ratios: Sequence[float]) -> dict[str, int]:
    return {
        g.name: int(np.clip(round(r * g.size), g.min_channels, g.size))
        for g, r in zip(groups, ratios, strict=True)
    }


def sample_widths(groups: Sequence, index: int, seed: int = 0) -> tuple[str, dict[str, int]]:
    """(family, kept channels per group) of sample `index`: 0 is dense, 1 is all-minimum, the
    rest are uniform, near-uniform (uniform + per-group jitter) or independent per-group ratios.
    `groups` need `.name`, `.size`, `.min_channels`."""
    if index == 0:
        return "dense", {g.name: g.size for g in groups}
    if index == 1:
        return "min", {g.name: g.min_channels for g in groups}
    rng = np.random.default_rng([seed, index])
    family = str(rng.choice(list(FAMILIES), p=list(FAMILIES.values())))
    n = len(groups)
    if family == "uniform":
        ratios = np.full(n, rng.uniform())
    elif family == "near_uniform":
        ratios = np.clip(rng.uniform() + rng.normal(0, NEAR_UNIFORM_JITTER, n), 0, 1)
    else:
        ratios = rng.uniform(size=n)
    widths = _clip_widths(groups, ratios)
    droppable = [g.name for g in groups if g.min_channels == 0]
    if droppable:  # drawn after the rest: profiles without droppable blocks stay as they were
        for name, drop in zip(droppable, rng.uniform(size=len(droppable)) < DROP_SHARE):
            widths[name] = 0 if drop else widths[name]
    return family, widths


def probe_widths(groups: Sequence, probe: int) -> dict[str, int]:
    """The fixed configuration re-measured every few samples (probe number `probe`)."""
    return _clip_widths(groups, [PROBE_RATIOS[probe]] * len(groups))


@dataclass(frozen=True)
class ConvShape:
    """One conv of a dense model as measured in isolation for the lookup table."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    depthwise: bool
    hw: tuple[int, int]
    cin: int
    cout: int

    @property
    def key(self) -> str:
        dw = "dw" if self.depthwise else ""
        return (
            f"conv{dw}{self.cin}-{self.cout}k{self.kernel}s{self.stride}p{self.padding}"
            f"d{self.dilation}@{self.hw}"
        )

    def grid(self) -> list[tuple[int, int]]:
        """(cin, cout) points of the lookup table: fractions of the dense channels."""
        cins = sorted({max(1, round(f * self.cin)) for f in LUT_FRACTIONS})
        if self.depthwise:
            return [(c, c) for c in cins]
        couts = sorted({max(1, round(f * self.cout)) for f in LUT_FRACTIONS})
        return list(itertools.product(cins, couts))

    def build(self, cin: int, cout: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
        conv = nn.Conv2d(
            cin, cout, self.kernel, self.stride, self.padding, self.dilation,
            groups=cin if self.depthwise else 1, bias=False,
        )
        return conv, torch.randn(batch, cin, *self.hw)


@dataclass(frozen=True)
class LayerReport:
    """The convs of a model by module name, and its multiply-accumulates."""

    convs: dict[str, ConvShape]
    flops: float


def describe(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> LayerReport:
    """Conv shapes and MACs (convs and linears) seen in one forward pass.

    Grouped convs that are not depthwise are left out of the table (they are rare; their
    time lands in the predictors' constant term)."""
    convs: dict[str, ConvShape] = {}
    flops = 0.0

    def hook(name: str):
        def record(module: nn.Module, args, output: torch.Tensor) -> None:
            nonlocal flops
            if isinstance(module, nn.Linear):
                flops += module.in_features * module.out_features
                return
            flops += output[0].numel() * module.weight[0].numel()
            depthwise = module.groups == module.in_channels == module.out_channels
            if module.groups == 1 or depthwise:
                convs[name] = ConvShape(
                    module.kernel_size, module.stride, module.padding, module.dilation,
                    depthwise, tuple(args[0].shape[-2:]), module.in_channels,
                    module.out_channels,
                )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            model.eval()(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return LayerReport(convs, flops)


def _measure_lut(
    store: LatencyStore,
    run_id: int,
    dense: LayerReport,
    meter: Meter,
    batch: int,
    backend: Backend,
) -> None:
    """Time every missing (layer, cin, cout) grid point in isolation, relative to the dense
    model (so the table is drift-free too)."""
    have = store.lut(run_id)
    shapes = {s.key: s for s in dense.convs.values()}
    todo = [
        (key, cin, cout)
        for key, shape in shapes.items()
        for cin, cout in shape.grid()
        if (cin, cout) not in have.get(key, {})
    ]
    for key, cin, cout in tqdm(todo, desc="layer table", unit="layer", disable=not todo):
        conv, x = shapes[key].build(cin, cout, batch)
        store.add_lut_entry(run_id, key, cin, cout, meter.measure(backend.prepare(conv, (x,))))


def profile(
    model: nn.Module,
    input_shape: Sequence[int],
    out: str | Path,
    *,
    samples: int,
    backend: str = "torch-cpu",
    threads: int = 1,
    seed: int = 0,
    model_spec: str | None = None,
    protocol: Protocol = Protocol(),
    repeat_every: int = 10,
    progress: bool = True,
    lookup_table: bool = True,
    channel_multiple: int | None = None,
    channel_block: int | None = None,
    depth: bool = False,
) -> Run:
    """Measure width configurations of `model` until `out` holds `samples` of them measured on
    a calm machine for this fingerprint (so re-running resumes, and a larger `samples` adds
    more). Samples the host's load spoiled (`LatencyStore.calm_samples`) are replaced, up to
    `samples // 2 + 10` extra configurations; the fit says so if that was not enough.

    Every `repeat_every`-th sample also re-measures a probe configuration: the noise floor.
    `lookup_table`: also time every conv alone at a grid of widths, for the lookup-table
    predictor LPNet is compared with (930 timings for LRASPP-MobileNetV3 at 64x64; LPNet
    needs none). `channel_multiple`, `channel_block` (default: the backend's `width_grid`):
    the widths pruning will deliver (`wgates.gated.allowed_widths`), so the samples are too
    (each sampled width snapped to one). `depth`: residual blocks may be dropped
    (`wgates.gate(depth=True)`), and a share of the samples drops them (`DROP_SHARE`).
    """
    from wgates.gated import gate

    runner_backend = get_backend(backend, threads)
    multiple, block = runner_backend.width_grid(channel_multiple, channel_block)
    example = (torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)),)
    gated = gate(model, example, channel_multiple=multiple, channel_block=block, depth=depth)
    groups = gated.groups
    fingerprint = {
        **runner_backend.fingerprint_at(input_shape),
        "model": model_spec or type(model).__name__,
        "groups": [[g.name, g.size, g.min_channels] for g in groups],
        **({"channel_multiple": multiple} if multiple > 1 else {}),
        **({"channel_block": block} if block > multiple else {}),
    }

    def build(widths: dict[str, int]) -> tuple[nn.Module, LayerReport, dict[str, int]]:
        """The variant, its layers, and the widths it has (`widths` snapped)."""
        gated.set_masks(gated.masks_for_widths(widths))
        variant = gated.extract(verify=False)
        return variant, describe(variant, example), gated.widths()

    store = LatencyStore(out)
    try:
        run_id = store.run_for(fingerprint)
        start = store.next_index(run_id)
        calm = store.counts(run_id)[1]
        if calm >= samples:
            return next(r for r in store.runs() if r.id == run_id)
        dense_model, dense, _ = build({g.name: g.size for g in groups})
        reference = runner_backend.prepare(dense_model, example)
        if lookup_table:
            _measure_lut(
                store, run_id, dense, Meter(runner_backend, reference, LUT_PROTOCOL),
                int(input_shape[0]), runner_backend,
            )
        meter = Meter(runner_backend, reference, protocol, store.quiet_ms(run_id))  # resumed
        probes: dict[int, Runner] = {}
        bar = tqdm(
            total=samples, initial=calm, desc="latency samples", unit="sample",
            disable=not progress,
        )
        idx = start
        while calm < samples and idx < samples * 3 // 2 + 10:
            kind, widths = sample_widths(groups, idx, seed)
            variant, report, widths = build(widths)
            m = meter.measure(runner_backend.prepare(variant, example))
            repeat = None
            if idx % repeat_every == repeat_every - 1:
                probe = (idx // repeat_every) % len(PROBE_RATIOS)
                if probe not in probes:
                    probes[probe] = runner_backend.prepare(
                        build(probe_widths(groups, probe))[0], example
                    )
                repeat = (probe, meter.measure(probes[probe]))
            layers = [
                [dense.convs[name].key, shape.cin, shape.cout]
                for name, shape in report.convs.items()
                if name in dense.convs
            ]
            sample = Sample(
                idx, kind, widths, layers, report.flops / dense.flops, m.ratio, m.ms,
                m.dense_ms, m.spread, m.attempts,
            )
            store.add_sample(run_id, sample, repeat)
            idx += 1
            calm = store.counts(run_id)[1]
            bar.update(calm - bar.n)
            bar.set_postfix(ratio=f"{m.ratio:.3f}", spread=f"{m.spread:.3f}",
                            contended=idx - calm)
        bar.close()
        return next(r for r in store.runs() if r.id == run_id)
    finally:
        store.close()
