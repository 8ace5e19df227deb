"""Gate kinds: what turns a group into one keep/prune score per channel.

`wgates` is the paper's weight-dependent gate: a small net reads each filter's weights and
scores it, so the pruning decision is a function of the weights and moves with them during
training. `plain` is the weight-independent ablation: one free score per channel.
Both are binarised the same way (`binarize`): a hard step forward, a sigmoid surrogate
gradient backward (straight-through), never fewer than `min_channels` open.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from wgates.errors import WgatesError

OPEN_OFFSET = 3.5  # scores start at z + 3.5 with z clamped to [-3, 3]: every gate open
SURROGATE_TEMPERATURE = 1.0

GATE_KINDS: dict[str, Callable[..., nn.Module]] = {}


def register_gate(name: str) -> Callable:
    def add(cls: type) -> type:
        GATE_KINDS[name] = cls
        return cls

    return add


class _RankedGate(nn.Module):
    """Score = standardised ranking signal + one learnable offset per group.

    The ranking (which filters go first) and the offset (how many go) are separate: the
    latency term moves the offset, so the kept count sweeps smoothly through the ranking.
    Without this split every filter's score shares the same bias, Adam moves them in
    lockstep and whole layers close at once (measured: a 0.5 target ended at 0.16).
    """

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(OPEN_OFFSET))

    def ranked(self, raw: torch.Tensor) -> torch.Tensor:
        z = (raw - raw.mean()) / (raw.std() + 1e-6)
        return z.clamp(-3.0, 3.0) + self.offset


@register_gate("wgates")
class WeightGate(_RankedGate):
    """Scores filters from their own weights: an L1-magnitude prior plus an MLP shared across
    the group's filters that learns a correction.

    Input: one row per output channel, the concatenated filters of all the group's producers,
    each producer's block divided by its RMS so one gate net design fits every layer's scale.
    The MLP's last layer starts at zero, so the first ranking is the rows' L1 norm (the
    classic criterion, Li et al. 2017) rather than a random projection of the weights. Why:
    on CIFAR ResNet-20 with a one-epoch search, a randomly initialised gate net ended 12 points
    below L1-ranked uniform pruning at the same latency and fine-tune (57.8% vs 70.2%).
    Its outputs are standardised within the group (see `_RankedGate`): the prior and the net
    decide the order, the offset the count.
    """

    needs_weights = True

    def __init__(self, size: int, in_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        l1 = rows.abs().mean(1)
        prior = (l1 - l1.mean()) / (l1.std() + 1e-6)
        return self.ranked(prior + self.net(rows).squeeze(-1))


@register_gate("plain")
class PlainGate(_RankedGate):
    """One learnable value per channel, blind to the weights (the ablation of W-Gates);
    initialised at random, so its first ranking carries no information."""

    needs_weights = False

    def __init__(self, size: int, in_dim: int = 0) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(size))

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.ranked(self.value)


def binarize(scores: torch.Tensor, min_channels: int) -> torch.Tensor:
    """Hard 0/1 gates with a straight-through sigmoid gradient; keeps >= min_channels open."""
    hard = (scores > 0).to(scores.dtype)
    if int(hard.sum()) < min_channels:
        hard = torch.zeros_like(hard).index_fill_(0, scores.topk(min_channels).indices, 1.0)
    soft = torch.sigmoid(scores / SURROGATE_TEMPERATURE)
    return hard + (soft - soft.detach())  # exactly 0/1 forward: (s - s) is exactly 0


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hard gates open on the `k` highest scores, with `binarize`'s straight-through gradient
    centred between the k-th and the (k+1)-th score: the count is fixed from outside (by the
    allocation), the gradient still teaches the gate which units deserve the places."""
    ranked = scores.detach().sort(descending=True).values
    if k == 0:  # none kept (a dropped block): the gradient still says which unit is best
        tau = ranked[0] + 1.0
    else:
        tau = (ranked[k - 1] + ranked[k]) / 2 if k < len(ranked) else ranked[-1] - 1.0
    hard = torch.zeros_like(scores).index_fill_(0, scores.detach().topk(k).indices, 1.0)
    soft = torch.sigmoid((scores - tau) / SURROGATE_TEMPERATURE)
    return hard + (soft - soft.detach())


@register_gate("gdp")
class PolarGate(nn.Module):
    """GDP's gate (Guo et al., 2021): g = x^2 / (x^2 + eps) per channel, a free parameter x.

    Written as a score, log(x^2 / eps), so that g = sigmoid(score) exactly and the thresholding
    and top-k code that reads scores works unchanged (score > 0 <=> g > 0.5 <=> x^2 > eps).
    In training mode the gate is smooth (no straight-through step: GDP trains the smooth gate
    and lets the polarisation regulariser in `wgates.baselines` drive it to 0 or 1); in eval
    mode it is the hard step that extraction uses. Simplification: GDP folds the open gates'
    values (close to 1 once polarised) into the weights; here open gates become exactly 1.
    `eps` is annealed from outside (see `wgates.baselines.Polariser`).
    """

    needs_weights = False

    def __init__(self, size: int, in_dim: int = 0, eps: float = 1e-2) -> None:
        super().__init__()
        # g = 0.9 at the start: open, yet not so saturated that the gradient vanishes
        self.x = nn.Parameter(torch.full((size,), 3 * math.sqrt(eps)))
        self.eps = eps

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return torch.log(self.x.pow(2) + 1e-20) - math.log(self.eps)

    def activate(self, scores: torch.Tensor, min_channels: int) -> torch.Tensor:
        """Smooth gate while training, hard 0/1 (>= min_channels open) in eval mode."""
        return torch.sigmoid(scores) if self.training else binarize(scores, min_channels)


def make_gate(kind: str, size: int, in_dim: int) -> nn.Module:
    if kind not in GATE_KINDS:
        raise WgatesError(f"unknown gate kind {kind!r}; choose one of {sorted(GATE_KINDS)}")
    return GATE_KINDS[kind](size, in_dim)
