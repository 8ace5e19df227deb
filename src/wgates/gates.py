"""Gate kinds: what turns a group into one keep/prune score per channel.

`wgates` is the paper's weight-dependent gate: a small net reads each filter's weights and
scores it, so the pruning decision is a function of the weights and moves with them during
training. `plain` is the weight-independent ablation: one free score per channel.
Both are binarised the same way (`binarize`): a hard step forward, a sigmoid surrogate
gradient backward (straight-through), never fewer than `min_channels` open.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wgates.errors import WgatesError

INIT_SCORE = 1.0  # every gate starts open, a margin away from the step
SURROGATE_TEMPERATURE = 1.0

GATE_KINDS: dict[str, Callable[..., nn.Module]] = {}


def register_gate(name: str) -> Callable:
    def add(cls: type) -> type:
        GATE_KINDS[name] = cls
        return cls

    return add


@register_gate("wgates")
class WeightGate(nn.Module):
    """Scores filters from their own weights with an MLP shared across the group's filters.

    Input: one row per output channel, the concatenated filters of all the group's producers,
    each producer's block divided by its RMS so one gate net design fits every layer's scale.
    The last layer starts with small weights and a positive bias: every gate is open at step 0
    and the scores already differ a little from filter to filter, so the surrogate gradient
    can tell filters apart from the first step.
    """

    needs_weights = True

    def __init__(self, size: int, in_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.normal_(self.net[2].weight, std=0.01)
        nn.init.constant_(self.net[2].bias, INIT_SCORE)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows).squeeze(-1)


@register_gate("plain")
class PlainGate(nn.Module):
    """One learnable score per channel, blind to the weights (the ablation of W-Gates)."""

    needs_weights = False

    def __init__(self, size: int, in_dim: int = 0) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.full((size,), INIT_SCORE))

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.score


def binarize(scores: torch.Tensor, min_channels: int) -> torch.Tensor:
    """Hard 0/1 gates with a straight-through sigmoid gradient; keeps >= min_channels open."""
    hard = (scores > 0).to(scores.dtype)
    if int(hard.sum()) < min_channels:
        hard = torch.zeros_like(hard).index_fill_(0, scores.topk(min_channels).indices, 1.0)
    soft = torch.sigmoid(scores / SURROGATE_TEMPERATURE)
    return hard + soft - soft.detach()


def make_gate(kind: str, size: int, in_dim: int) -> nn.Module:
    if kind not in GATE_KINDS:
        raise WgatesError(f"unknown gate kind {kind!r}; choose one of {sorted(GATE_KINDS)}")
    return GATE_KINDS[kind](size, in_dim)
