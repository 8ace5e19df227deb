"""MetaPruning (Liu et al., ICCV 2019, arXiv 1903.10258): a PruningNet that generates the
weights of any width encoding, trained on randomly sampled encodings, then an evolutionary
search over encodings scored with generated weights, under the latency predictor.

The parts, as read here (docs/methods.md lists the choices):
- `PruningNet`: for every conv, a two-layer MLP from (its output width, its input width), as
  fractions, to a correction of the whole weight tensor; the generated weight is the trained
  model's plus the correction (the last layer starts at zero, so the PruningNet starts as the
  trained model). The encoding's channels are kept by masks on the gated model, the
  highest-L1 filters of each group first; the paper crops the first ones of a net trained
  from scratch.
- `PruningNet.fit`: one random encoding per step, the generators alone trained.
- `evolve`: a population of encodings, each moved onto the latency band by one scale factor
  on its width fractions (under the cost model), scored by accuracy on held-out batches
  with generated weights and BatchNorm statistics re-estimated; the best half breeds by
  crossover and mutation.
- `materialise`: the encoding's generated weights written into the gated model, extracted,
  BatchNorm re-estimated."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from wgates.gated import GatedModel, allowed_widths
from wgates.train import LossFn, classification_loss, evaluate, recalibrate_bn, task_loss

GEN_HIDDEN = 32
GEN_LR = 1e-3
LOWEST = 0.1  # no group's sampled width below this fraction of it
POPULATION, GENERATIONS = 16, 6
MUTATION = 0.1  # per-gene probability of a fresh fraction
SCORE_BATCHES = 4  # batches for BatchNorm re-estimation, and again for the score

Widths = dict[str, int]


class _Generated(nn.Module):
    """`model` run with `weights` in place of its own (`torch.func.functional_call`), so that
    `recalibrate_bn` and `evaluate` can take it as they take any model."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.weights = model, weights

    def forward(self, x: torch.Tensor):
        return functional_call(self.model, self.weights, (x,))


class PruningNet(nn.Module):
    """Weights for any width encoding of `gated`'s groups (see the module docstring)."""

    def __init__(self, gated: GatedModel) -> None:
        super().__init__()
        self.gated = gated
        out_of, in_of = {}, {}
        for g in gated.channel_groups:
            for p in g.producers:
                out_of[p.module] = g.name
            for p in g.consumers:
                in_of[p.module] = g.name
        self.convs = [(n, out_of.get(n), in_of.get(n)) for n, m in gated.model.named_modules()
                      if isinstance(m, nn.Conv2d)]
        self.base = {n: gated.model.get_submodule(n).weight.detach().clone()
                     for n, _, _ in self.convs}
        self.generators = nn.ModuleList()
        for n, _, _ in self.convs:
            last = nn.Linear(GEN_HIDDEN, self.base[n].numel())
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.generators.append(nn.Sequential(nn.Linear(2, GEN_HIDDEN), nn.ReLU(), last))
        self.to(self.base[self.convs[0][0]].device)
        self.sizes = {g.name: g.size for g in gated.channel_groups}

    def weights(self, widths: Widths) -> dict[str, torch.Tensor]:
        """The generated weight of every conv for `widths` (full size; masks drop the rest)."""
        out = {}
        for (name, group_out, group_in), gen in zip(self.convs, self.generators, strict=True):
            code = [widths[g] / self.sizes[g] if g else 1.0 for g in (group_out, group_in)]
            code = torch.tensor(code, device=self.base[name].device)
            out[f"{name}.weight"] = self.base[name] + gen(code).view_as(self.base[name])
        return out

    def forward(self, x: torch.Tensor, widths: Widths):
        self.gated.clear_masks()
        self.gated.set_masks(self.gated.masks_for_widths(widths))
        return functional_call(self.gated.model, self.weights(widths), (x,))

    def fit(self, loader: Iterable, epochs: int, sample: Callable[[], Widths],
            teacher: nn.Module | None = None, loss_fn: LossFn = classification_loss) -> list:
        """Train the generators on one random encoding per step; the losses per epoch."""
        optimizer = torch.optim.Adam(self.generators.parameters(), lr=GEN_LR)
        self.gated.model.train()
        self.gated.model.requires_grad_(False)  # the generators alone learn
        device = self.base[self.convs[0][0]].device
        try:
            history = self._epochs(loader, epochs, sample, teacher, loss_fn, optimizer, device)
        finally:  # Torch-Pruning traces the extraction through autograd: gradients back on
            self.gated.model.requires_grad_(True)
            self.gated.clear_masks()
        return history

    def _epochs(self, loader, epochs, sample, teacher, loss_fn, optimizer, device) -> list:
        history = []
        for _ in range(max(1, epochs)):
            total, steps = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                taught = None
                if teacher is not None:
                    with torch.no_grad():
                        taught = teacher(x)
                loss = task_loss(loss_fn, self(x, sample()), y, taught)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            history.append(total / max(steps, 1))
        return history

    @torch.no_grad()
    def score(self, widths: Widths, calibration: Sequence, held_out: Sequence) -> float:
        """Accuracy on `held_out` with generated weights, after BatchNorm's statistics are
        re-estimated on `calibration` (they were gathered over every encoding)."""
        self.gated.clear_masks()
        self.gated.set_masks(self.gated.masks_for_widths(widths))
        generated = _Generated(self.gated.model, self.weights(widths))
        try:
            recalibrate_bn(generated, calibration, batches=len(calibration))
            return evaluate(generated, held_out)
        finally:
            self.gated.clear_masks()

    @torch.no_grad()
    def materialise(self, widths: Widths, loader: Iterable) -> nn.Module:
        """The plain, smaller model of `widths` with its generated weights and BatchNorm
        statistics re-estimated on `loader`."""
        gated = self.gated
        for name, w in self.weights(widths).items():
            gated.model.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(w)
        gated.clear_masks()
        gated.set_masks(gated.masks_for_widths(widths))
        small = gated.extract(verify=False)
        gated.clear_masks()
        for name, w in self.base.items():  # the gated model as it was
            gated.model.get_submodule(name).weight.copy_(w)
        return recalibrate_bn(small, loader, batches=SCORE_BATCHES * 4)


def widths_from(fractions: np.ndarray, groups: Sequence, grid: tuple[int, int] = (1, 1)
                ) -> Widths:
    """A width per group from its fraction (clipped to 1), at least the group's minimum and
    moved to the nearest deliverable width of `grid`, (multiple, block)
    (`wgates.gated.allowed_widths`)."""
    out = {}
    for g, f in zip(groups, fractions, strict=True):
        w = int(min(g.size, max(g.min_channels, round(min(1.0, float(f)) * g.size))))
        if max(grid) > 1:
            w = min(allowed_widths(g.size, g.min_channels, *grid), key=lambda c: (abs(c - w), c))
        out[g.name] = w
    return out


def predicted_cost(cost: Callable[[torch.Tensor], torch.Tensor], groups: Sequence,
                   widths: Widths) -> float:
    """The cost model's figure for `widths` (kept counts in the groups' order)."""
    with torch.no_grad():
        return float(cost(torch.tensor([float(widths[g.name]) for g in groups])))


def on_band(fractions: np.ndarray, groups: Sequence, cost: Callable[[torch.Tensor], torch.Tensor],
            goal: float, grid: tuple[int, int] = (1, 1)) -> Widths:
    """`widths_from` the fractions scaled by the one factor whose predicted cost is nearest
    under `goal` (bisected)."""
    lo, hi = 0.0, 1.0 / max(float(np.min(fractions)), 1e-3)
    for _ in range(30):
        mid = (lo + hi) / 2
        if predicted_cost(cost, groups, widths_from(fractions * mid, groups, grid)) > goal:
            hi = mid
        else:
            lo = mid
    return widths_from(fractions * lo, groups, grid)


def evolve(score: Callable[[Widths], float], groups: Sequence,
           place: Callable[[np.ndarray], Widths], seed: int = 0,
           population: int = POPULATION, generations: int = GENERATIONS,
           mutation: float = MUTATION) -> list[tuple[float, Widths]]:
    """(score, widths) of every candidate seen, best first. A candidate is a width fraction
    per group, `place`d on the latency band before it is scored."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    seen: dict[tuple, tuple[float, Widths, np.ndarray]] = {}

    def add(fractions: np.ndarray) -> None:
        widths = place(fractions)
        key = tuple(widths[g.name] for g in groups)
        if key not in seen:
            seen[key] = (score(widths), widths, fractions)

    while len(seen) < population:
        add(rng.uniform(LOWEST, 1.0, n))
    for _ in range(generations):
        parents = sorted(seen.values(), key=lambda s: -s[0])[:population // 2]
        children = []
        for _ in range(population // 2):  # crossover
            a, b = rng.choice(len(parents), 2, replace=False)
            pick = rng.random(n) < 0.5
            children.append(np.where(pick, parents[a][2], parents[b][2]))
        for _ in range(population // 2):  # mutation
            f = parents[rng.integers(len(parents))][2].copy()
            change = rng.random(n) < mutation
            f[change] = rng.uniform(LOWEST, 1.0, int(change.sum()))
            children.append(f)
        for f in children:
            add(f)
    return [(s, w) for s, w, _ in sorted(seen.values(), key=lambda s: -s[0])]
