"""Whether a backend computes a model's convolutions in channel blocks at a given batch,
measured on the model itself. Why: at batch 32 on an AVX-512 host torch-cpu's ResNet-20 stage-2
convs cost the same at 17 to 32 channels (0.405 of the dense latency at 16, 0.565 at 17,
0.561 at 32; docs/design.md, "torch-cpu's blocks at batch 32"), and W-Gates searched on that
(1, 16) grid, with depth, kept 87.09% against 83.30% without either (three seeds). A grid given
by hand holds for one host and batch only; this reads it where the model will run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.latency.backends import Meter, Protocol, get_backend

if TYPE_CHECKING:
    from wgates.gated import GatedModel

AUTO = "auto"  # `channel_block=AUTO`: probe it (`wgates.prune`, `wgates profile`)
CANDIDATES = (16, 8)  # float lanes of an AVX-512 and an AVX2 register
# the least rise from b to 2b channels (of the dense latency) that is read as a step at all:
# under it the widths barely move the latency and any grid is moot
MIN_RISE = 0.03


@dataclass(frozen=True)
class BlockProbe:
    """`block`: the channel block found (1: none); `readings`: per candidate block b, the
    latency ratio with every group of at least 2b channels at b, b + 1 and 2b channels."""

    block: int
    readings: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def channel_block(self) -> int | None:
        """What to deliver widths with: the block found, else None (the backend's own grid,
        so ONNX Runtime keeps its 16-channel block where no other step shows)."""
        return self.block if self.block > 1 else None

    def state(self) -> dict:
        """As JSON keeps it (a run directory's `grid_probe`)."""
        return {"block": self.block,
                "readings": {str(b): list(r) for b, r in self.readings.items()}}

    @classmethod
    def from_state(cls, state: dict) -> BlockProbe:
        return cls(state["block"], {int(b): tuple(r) for b, r in state["readings"].items()})

    def summary(self) -> str:
        read = "; ".join(f"{b}, {b + 1}, {2 * b} channels: "
                         + " / ".join(f"{r:.3f}" for r in ratios)
                         for b, ratios in self.readings.items())
        return (f"channel block {self.block if self.block > 1 else 'none'} (every group "
                f"that has them at {read or 'no group wide enough'} of the dense latency)")


def check_block(value: int | str | None) -> None:
    """Refuse a channel block that is neither a whole number >= 1, None nor `AUTO`."""
    if value is None or value == AUTO or (isinstance(value, int) and value >= 1):
        return
    raise WgatesError(f"channel_block must be a whole number >= 1, {AUTO!r} (measure it) or "
                      f"None (the backend's grid), got {value!r}")


def is_step(low: float, over: float, high: float) -> bool:
    """One channel past b costs more than half of what b more do: the runtime computes the
    whole next block (channel by channel it would cost about 1/b of it)."""
    return high - low >= MIN_RISE and over - low > 0.5 * (high - low)


def probe_block(model: nn.Module, example_inputs: torch.Tensor | tuple,
                backend: str = "torch-cpu", threads: int = 1,
                candidates: Sequence[int] = CANDIDATES, multiple: int | None = None,
                protocol: Protocol = Protocol(rounds=30)) -> BlockProbe:
    """`find_block` for `model` on `backend`, each variant read against the dense model;
    with a channel `multiple`, only the candidates that are multiples of it."""
    from wgates.gated import gate

    candidates = [c for c in candidates if multiple is None or c % multiple == 0]
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    runner = get_backend(backend, threads)
    gated = gate(model.eval(), inputs)
    meter = Meter(runner, runner.prepare(gated.plain_copy().eval(), inputs), protocol)
    return find_block(gated, lambda variant: meter.measure(runner.prepare(variant, inputs)).ratio,
                      candidates)


def find_block(gated: GatedModel, read: Callable[[nn.Module], float],
               candidates: Sequence[int] = CANDIDATES) -> BlockProbe:
    """The largest of `candidates` b whose step `read` sees (`is_step`): every group of
    `gated` with at least 2b channels set to b, b + 1 and 2b, the variant extracted and read
    (its latency / the dense model's)."""
    readings: dict[int, tuple[float, float, float]] = {}
    try:
        for b in sorted(candidates, reverse=True):
            wide = [g for g in gated.groups if g.size >= 2 * b and g.min_channels <= b]
            if not wide:
                continue
            low, over, high = (
                read(_at(gated, {g.name: width for g in wide})) for width in (b, b + 1, 2 * b))
            readings[b] = (low, over, high)
            if is_step(low, over, high):
                return BlockProbe(b, readings)
    finally:
        gated.clear_masks()
    return BlockProbe(1, readings)


def _at(gated: GatedModel, widths: dict[str, int]) -> nn.Module:
    gated.set_masks(gated.masks_for_widths(widths))
    return gated.extract(verify=False).eval()
