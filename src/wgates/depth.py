"""Depth: residual blocks that pruning one group whole turns into their shortcut.

Why: where latency is overhead-bound, a block costs far more than its channels. ResNet-20 on
ONNX Runtime at batch 1 (AMD EPYC, one thread), at Torch-Pruning Taylor's widths for 0.5 of
the dense latency: dropping one 8-channel stage-1 block saves 0.066 of the dense latency, two
save 0.133 (docs/design.md, "ONNX Runtime at batch 1: the latency is in the blocks").

When every channel of a block's inner group is pruned, the branch reads zeros and adds a
constant, so the block computes act(x + c): the input, a per-channel constant and the block's
closing activation. That is found numerically (`skip_form`) and extracted as `Skip`, so a
block is only ever dropped where the result is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TOLERANCE = 1e-4
PROBE = 1e6  # the input `skip_form` probes a block with: far above any constant it adds
# the closing activations a dropped block may have: torchvision's and timm's ResNet blocks
# end with a ReLU after the add, MobileNetV2's inverted residual with none
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda y: y,
    "relu": torch.relu,
}


class Skip(nn.Module):
    """What a residual block computes once its branch is pruned away: act(x + constant)."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("constant", torch.zeros(channels))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return ACTIVATIONS[self.act](x + self.constant.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.constant.numel()}, act={self.act}"


def skip_form(block: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor
              ) -> tuple[str, torch.Tensor] | None:
    """(activation, per-channel constant c) such that `block`(x) == act(x + c) for inputs
    shaped like `like` (channels on dim 1), or None when no such form holds. `block` is
    called in float64 on inputs +-PROBE: at +PROBE the output is PROBE + c under either
    activation, at -PROBE it tells the two apart. `fits` then checks real inputs."""
    with torch.no_grad():
        up = block(torch.full_like(like, PROBE, dtype=torch.float64))
        down = block(torch.full_like(like, -PROBE, dtype=torch.float64))
    if up.shape != like.shape:
        return None
    c = _per_channel(up - PROBE)
    if c is None:
        return None
    for act, fn in ACTIVATIONS.items():
        if _close(down, fn(torch.full_like(down, -PROBE) + _shaped(c, down))):
            return act, c.float()
    return None


def fits(x: torch.Tensor, y: torch.Tensor, act: str, c: torch.Tensor) -> bool:
    """Whether y == act(x + c) on these inputs and outputs."""
    return x.shape == y.shape and _close(y, ACTIVATIONS[act](x + _shaped(c, x)))


def _shaped(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.dtype).view([1, -1] + [1] * (like.dim() - 2))


def _per_channel(t: torch.Tensor) -> torch.Tensor | None:
    """The value of each channel (dim 1) of `t`, or None when it is not constant."""
    if t.dim() < 2:
        return None
    flat = t.transpose(0, 1).reshape(t.shape[1], -1)
    c = flat[:, 0]
    return c if _close(flat, c[:, None].expand_as(flat)) else None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.detach().double(), b.detach().double()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return float((a - b).abs().max()) <= TOLERANCE * scale


def common_ancestors(names: list[str]) -> list[str]:
    """The modules that contain or are every one of `names`, innermost first: where a group's
    residual block may be. The model itself ("") is left out: it is never a block."""
    parts = names[0].split(".")
    prefixes = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
    return [p for p in prefixes if all(n == p or n.startswith(p + ".") for n in names)]


class _Seen(Exception):
    """Raised by `capture`'s hook: the rest of the forward is not needed."""


def capture(model: nn.Module, name: str, run: Callable[[], object]) -> tuple | None:
    """(input, output) of submodule `name` the first time it runs in `run()`, which is cut
    short there; None when it does not run or takes or returns no single tensor."""
    seen: list[tuple] = []

    def hook(module, args, output) -> None:
        seen.append((args[0] if args else None, output))
        raise _Seen

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        run()
    except _Seen:
        pass
    finally:
        handle.remove()
    if not seen or not all(isinstance(t, torch.Tensor) for t in seen[0]):
        return None
    return seen[0]
