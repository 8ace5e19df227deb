"""How many channels each group keeps, decided over the whole network at once.

The gates rank the filters inside a group (which go first); `allocate` decides how many go
where, as a greedy knapsack on the latency predictor's marginal costs (HALP does the same on a
lookup table): starting from full widths, it repeatedly closes the next unit (the open one the
gate ranks lowest) of the group whose importance lost per unit of predicted latency saved is
smallest, until the predictor reaches `aim`.

Importance is the first-order Taylor estimate of what closing a unit costs the loss, averaged
over steps (`TaylorImportance`): (dL/dg)^2 for the unit's gate g. The gate sits on the
channel's output, so this is measured for closed units too (what reopening would gain), and
values of different layers are in the same unit, the loss, so they can be compared.

Why not the latency gradient alone: measured on ResNet-20 (docs/design.md), a search that
moves the widths by the latency term drives the network to chance once the target tightens;
the gates then allocate by latency alone and shut whole residual streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Cost = Callable[[torch.Tensor], torch.Tensor]  # kept counts [.., n_groups] -> latency ratio
PROBE = 8  # marginal savings are measured over 1/PROBE of a group, so LPNet's wiggles average


class TaylorImportance:
    """Running mean of (dL/dg)^2 per unit of every group, fed by gate-gradient hooks."""

    def __init__(self, units: Sequence[torch.Tensor], n_units: Sequence[int],
                 decay: float = 0.98) -> None:
        self.units = [u.cpu() for u in units]
        self.values = [torch.zeros(n) for n in n_units]
        self.decay = decay
        self.updates = [0] * len(units)

    def add(self, index: int, grad: torch.Tensor) -> None:
        """`grad`: dL/dg per channel of group `index` for one step (summed into its units)."""
        per_unit = torch.zeros_like(self.values[index]).index_add_(
            0, self.units[index], grad.detach().float().cpu())
        self.updates[index] += 1
        # bias-corrected exponential mean: early steps are not pulled towards zero
        d = self.decay
        self.values[index].mul_(d).add_(per_unit.pow(2), alpha=1 - d)

    def get(self, index: int) -> torch.Tensor:
        n = self.updates[index]
        return self.values[index] / (1 - self.decay ** n) if n else self.values[index]

    def state_dict(self) -> dict:
        return {"values": [v.clone() for v in self.values], "updates": list(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.values = [v.clone() for v in state["values"]]
        self.updates = [int(n) for n in state["updates"]]


def lowest_units(n_units: Sequence[int], min_units: Sequence[int], floor: float) -> list[int]:
    """The fewest units each group may keep: `floor` of its units, at least `min_units`."""
    return [max(m, math.ceil(floor * u)) for m, u in zip(min_units, n_units)]


def allocate(
    cost: Cost,
    sizes: Sequence[int],
    n_units: Sequence[int],
    min_units: Sequence[int],
    order: Sequence[torch.Tensor],
    importance: Sequence[torch.Tensor],
    aim: float,
    floor: float = 0.0,
    start: Sequence[int] | None = None,
    tiers: Sequence[Sequence[int]] = (),
    grid: Sequence[Sequence[int] | None] | None = None,
) -> list[int]:
    """Units kept per group so that `cost` predicts at most `aim` (or as close as the minimum
    widths allow). `order[i]`: group i's units, best first (the gate's ranking); `importance`:
    per unit; `floor`: no group below this fraction of its units (at least `min_units`).

    `start`: the widths to move from (default: full). Below the aim already, units are
    reopened instead, the most valuable per unit of latency first, while the aim still
    holds: a correction moves from the widths the weights were trained at.

    `tiers`: sets of groups that are also moved together (`GatedModel.resolution_tiers`):
    every group of a tier down to one fraction of its units, tried at each 1/PROBE level.
    A one-group step cannot see a saving that appears only once all of them are narrow; a
    joint move that is taken may overshoot the aim, and units are then reopened up to it.
    The search does not pass tiers: measured on the AMD batch-32 profile, LPNet does not
    see the steps either, and the allocation with tiers was the one without
    (benchmarks/results/tier_allocation_b32_amd.txt).

    A group whose `min_units` is 0 drops its residual block at 0 units (`wgates.depth`):
    below its lowest width one more move takes it to 0, priced like any other, so the floor
    bounds how narrow a block may get but not whether it may go.

    `grid`: per group, the unit counts it may take (sorted; None: any), so that every move
    goes from one deliverable width to the next (`GatedModel.unit_grid`) and is priced as
    such: where a runtime computes channels in blocks, a width between two of them costs
    what the next one does, and a one-unit price would not show it.

    Once at the aim, `_exchange` trades one group's move up for another's move down while
    that keeps more importance within the aim: a greedy descent that ends on a large move
    (a dropped block) leaves slack no single move can fill, and a calibration aiming between
    two such steps then lands on the same widths again (measured on ONNX Runtime, batch 1:
    0.452 delivered for a band of [0.475, 0.494], docs/design.md)."""
    kept = list(n_units if start is None else start)
    scale = torch.tensor([s / u for s, u in zip(sizes, n_units)], dtype=torch.float32)
    ranked_value = [imp[o] for imp, o in zip(importance, order)]  # value of the k-th best unit
    moves = _Moves.of(n_units, min_units, floor, grid, droppable=True)
    with torch.no_grad():
        kept, reached = _descend(cost, kept, scale, ranked_value, moves, aim, tiers)
        return _exchange(cost, kept, scale, ranked_value, moves, aim) if reached else kept


def _descend(cost: Cost, kept: list[int], scale: torch.Tensor,
             ranked_value: list[torch.Tensor], moves: _Moves, aim: float,
             tiers: Sequence[Sequence[int]] = (), frozen: int | None = None,
             ) -> tuple[list[int], bool]:
    """Close units from `kept`, each time the move (or tier move) that loses the least
    importance per unit of predicted latency saved, until `cost` predicts at most `aim`;
    group `frozen` keeps its width. Returns the widths and whether the aim was reached."""
    kept = list(kept)
    n_units = moves.n_units
    while True:
        counts = torch.tensor(kept, dtype=torch.float32) * scale
        current = float(cost(counts))
        if current <= aim:
            return kept, True
        down = {i: moves.down(i, kept[i]) for i in range(len(kept)) if i != frozen}
        movable = [i for i, to in down.items() if to is not None]
        if not movable:
            return kept, False
        joint = _joint_move(cost, kept, n_units, moves, scale, ranked_value, tiers, current)
        probes = []
        for i in movable:
            move = kept[i] - down[i]  # priced over 1/PROBE of the group where it is finer
            probe = move if moves.grid[i] else max(
                move, min(kept[i] - moves.lowest[i], n_units[i] // PROBE))
            trial = counts.clone()
            trial[i] -= probe * scale[i]
            probes.append((trial, probe))
        predicted = _each(cost, torch.stack([t for t, _ in probes]))
        choices = []
        for i, (_, probe), pred in zip(movable, probes, predicted.tolist()):
            saving = (current - pred) / probe * (kept[i] - down[i])
            lost = float(ranked_value[i][down[i]: kept[i]].sum())
            if saving > 0:  # ties (no importance measured yet) go to the larger saving
                choices.append((lost / saving, -saving, i))
        if joint is not None and (not choices or joint[0] < min(choices)[0]):
            kept = joint[1]
            continue
        if not choices:  # nothing saves latency any more: the aim is out of reach
            return kept, False
        best = min(choices)[2]
        kept[best] = down[best]


class _Moves:
    """The next unit count below or above a group's current one: `step` units, or the next
    count on the group's grid; for a group that may drop its block, 0 below its lowest."""

    def __init__(self, grid: list[Sequence[int] | None], step: list[int], lowest: list[int],
                 n_units: Sequence[int], droppable: Sequence[bool]) -> None:
        self.grid, self.step, self.lowest, self.n_units = grid, step, lowest, n_units
        self.droppable = droppable

    @classmethod
    def of(cls, n_units: Sequence[int], min_units: Sequence[int], floor: float,
           grid: Sequence[Sequence[int] | None] | None, droppable: bool) -> _Moves:
        """The moves `allocate` takes (`droppable`: a group whose `min_units` is 0 may drop
        its block; else none is ever dropped)."""
        grid = list(grid or [None] * len(n_units))
        lowest = [lo if g is None else min([c for c in g if c >= lo] or [g[-1]])
                  for lo, g in zip(lowest_units(n_units, min_units, floor), grid)]
        step = [max(1, u // 64) for u in n_units]  # wide groups close a few units per decision
        return cls(grid, step, lowest, n_units, [droppable and m == 0 for m in min_units])

    def down(self, i: int, k: int) -> int | None:
        if self.grid[i] is None:
            to = k - self.step[i]
        else:
            to = max([c for c in self.grid[i] if c < k], default=-1)
        if to >= max(self.lowest[i], 1) or (to == 0 and self.lowest[i] == 0):
            return to
        return 0 if self.droppable[i] and k > 0 else None

    def at_least(self, i: int, k: int) -> int:
        """The fewest units group i may keep that are at least `k` (and its lowest)."""
        k = max(k, self.lowest[i])
        return k if self.grid[i] is None else min(c for c in self.grid[i] if c >= k)

    def up(self, i: int, k: int) -> int | None:
        if k == 0:  # a dropped block comes back at its lowest width
            return self.at_least(i, 1)
        if self.grid[i] is None:
            to = k + self.step[i]
        else:
            to = min([c for c in self.grid[i] if c > k], default=self.n_units[i] + 1)
        return to if to <= self.n_units[i] else None


def narrowed_into(
    cost: Cost,
    sizes: Sequence[int],
    n_units: Sequence[int],
    min_units: Sequence[int],
    order: Sequence[torch.Tensor],
    importance: Sequence[torch.Tensor],
    kept: Sequence[int],
    reading: float,
    band: tuple[float, float],
    floor: float = 0.0,
    grid: Sequence[Sequence[int] | None] | None = None,
) -> list[list[int]]:
    """Widths `kept` (measured at `reading`, over `band`) with one group one move narrower
    (as `allocate` moves, never dropping a block) wherever `reading` scaled by `cost`'s
    ratio falls in `band`; those that lose the least importance first. Why: `allocate` at a
    corrected aim takes the most importance per latency saved, and where latency moves in
    steps that move can pass under the band (measured on ONNX Runtime, batch 1: 0.495 ->
    0.474 for a band of [0.475, 0.494]) where a smaller saving elsewhere lands in it."""
    scale = torch.tensor([s / u for s, u in zip(sizes, n_units)], dtype=torch.float32)
    moves = _Moves.of(n_units, min_units, floor, grid, droppable=False)
    trials = []
    for i, k in enumerate(kept):
        if (to := moves.down(i, k)) is not None and to > 0:
            trials.append((i, to, [*kept[:i], to, *kept[i + 1:]]))
    if not trials:
        return []
    rows = torch.tensor([t for *_, t in trials] + [list(kept)], dtype=torch.float32) * scale
    with torch.no_grad():
        *predicted, base = _each(cost, rows).tolist()
    low, high = band
    options = [(float(importance[i][order[i][to: kept[i]]].sum()), trial)
               for (i, to, trial), pred in zip(trials, predicted)
               if low <= reading * pred / base <= high]
    return [trial for _, trial in sorted(options, key=lambda o: o[0])]


def _joint_move(cost: Cost, kept: list[int], n_units: Sequence[int], moves: _Moves,
                scale: torch.Tensor, ranked_value: list[torch.Tensor],
                tiers: Sequence[Sequence[int]], current: float,
                ) -> tuple[float, list[int]] | None:
    """The tier move (every group of a tier down to k/PROBE of its units) that loses the
    least importance per unit of predicted latency saved: (that ratio, the widths), or None
    when no tier move saves latency."""
    trials = []
    for tier in tiers:
        for k in range(1, PROBE):
            trial = list(kept)
            for i in tier:
                trial[i] = min(kept[i], moves.at_least(i, math.ceil(k * n_units[i] / PROBE)))
            if trial != kept and sum(t < w for t, w in zip(trial, kept)) > 1:
                trials.append(trial)
    if not trials:
        return None
    rows = torch.tensor(trials, dtype=torch.float32) * scale
    best = None
    for trial, pred in zip(trials, _each(cost, rows).tolist()):
        if pred < current:
            lost = sum(float(v[t:w].sum()) for v, t, w in zip(ranked_value, trial, kept))
            ratio = lost / (current - pred)
            if best is None or ratio < best[0]:
                best = (ratio, trial)
    return best


def _reopen(cost: Cost, kept: list[int], scale: torch.Tensor,
            ranked_value: list[torch.Tensor], moves: _Moves, aim: float,
            frozen: int | None = None) -> list[int]:
    """Reopen units greedily (value per unit of latency added) while `cost` stays <= aim;
    group `frozen` keeps its width."""
    kept = list(kept)
    while True:
        counts = torch.tensor(kept, dtype=torch.float32) * scale
        current = float(cost(counts))
        up = {i: moves.up(i, k) for i, k in enumerate(kept) if i != frozen}
        growable = [i for i, to in up.items() if to is not None]
        if not growable:
            return kept
        trials = counts.repeat(len(growable), 1)
        for row, i in enumerate(growable):
            trials[row, i] += (up[i] - kept[i]) * scale[i]
        predicted = _each(cost, trials).tolist()
        choices = sorted(
            (-float(ranked_value[i][kept[i]: up[i]].sum())
             / max(pred - current, 1e-9), i, pred)
            for i, pred in zip(growable, predicted) if pred <= aim)
        if not choices:
            return kept
        best = choices[0][1]
        kept[best] = up[best]


def _exchange(cost: Cost, kept: list[int], scale: torch.Tensor,
              ranked_value: list[torch.Tensor], moves: _Moves, aim: float) -> list[int]:
    """`_reopen`, then repeatedly the trade that gains the most importance while `cost`
    stays <= aim, each followed by `_reopen`. The trades: one group a move up and another one
    a move down; one group a move up, paid for by `_descend` over the others; one group a
    move down, its saving spent by `_reopen` on the others. Why the last two: on a grid one
    group's move can cost what many of another's do (torch-cpu at batch 32 on an AMD host:
    a stage-2 stream of 16 -> 32 channels costs what ~5 stage-1 channels do), a trade no
    pair of single moves can make. Every trade taken adds importance, so this ends; it is
    bounded all the same."""
    n = len(kept)

    def value(widths: list[int]) -> float:
        return sum(float(v[:w].sum()) for v, w in zip(ranked_value, widths))

    def moved(widths: list[int], i: int, to: int) -> list[int]:
        return [*widths[:i], to, *widths[i + 1:]]

    kept = _reopen(cost, kept, scale, ranked_value, moves, aim)
    for _ in range(2 * n):
        ups = {i: up for i in range(n) if (up := moves.up(i, kept[i])) is not None}
        downs = {j: down for j in range(n) if (down := moves.down(j, kept[j])) is not None}
        options, base = [], value(kept)
        pairs = [pair for i, up in ups.items() for j, down in downs.items()
                 if j != i and value(pair := moved(moved(kept, i, up), j, down)) > base]
        if pairs:
            rows = torch.tensor(pairs, dtype=torch.float32) * scale
            fits = [p for p, pred in zip(pairs, _each(cost, rows).tolist()) if pred <= aim]
            if fits:  # the best single pair
                options.append(_reopen(cost, max(fits, key=value), scale, ranked_value,
                                       moves, aim))
        for i, up in ups.items():
            paid, reached = _descend(cost, moved(kept, i, up), scale, ranked_value, moves, aim,
                                     frozen=i)
            if reached:
                options.append(_reopen(cost, paid, scale, ranked_value, moves, aim))
        for j, down in downs.items():
            options.append(_reopen(cost, moved(kept, j, down), scale, ranked_value, moves, aim,
                                   frozen=j))
        best = max(options, key=value, default=None)
        if best is None or value(best) <= base:
            return kept
        kept = best
    return kept


def _each(cost: Cost, rows: torch.Tensor) -> torch.Tensor:
    """`cost` of every row: one batched call (LPNet takes batches), or one call per row for
    a cost written for a single vector."""
    try:
        out = cost(rows)
        if out.shape == (len(rows),):
            return out
    except RuntimeError:
        pass
    return torch.stack([cost(r).reshape(()) for r in rows])
