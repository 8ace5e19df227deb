"""The knapsack allocation and the Taylor importance it reads."""

from __future__ import annotations

import pytest
import torch

from wgates.allocate import TaylorImportance, allocate, narrowed_into


def linear_cost(weights):
    """Latency ratio = sum_i w_i * kept_i / size_i (w sums to 1): group i's channels cost w_i."""
    w = torch.tensor(weights, dtype=torch.float32)
    sizes = torch.tensor([8.0] * len(weights))
    return lambda kept: (kept.float() / sizes * w).sum(-1)


def run(cost, importance, aim, floor=0.0, n=8):
    k = len(importance)
    order = [torch.arange(n)] * k  # unit 0 ranked best
    return allocate(cost, [n] * k, [n] * k, [1] * k, order,
                    [torch.as_tensor(v, dtype=torch.float32) for v in importance], aim, floor)


def test_meets_aim_and_keeps_important_groups():
    cost = linear_cost([0.5, 0.5])
    kept = run(cost, [[1.0] * 8, [0.01] * 8], aim=0.6)
    assert float(cost(torch.tensor(kept) * 1.0)) <= 0.6 + 1e-6
    assert kept[0] == 8 and kept[1] < 8  # the unimportant group goes first


def test_prefers_the_cheaper_saving_per_importance():
    # equal importance: the group whose channels cost more latency is pruned first
    cost = linear_cost([0.8, 0.2])
    kept = run(cost, [[1.0] * 8, [1.0] * 8], aim=0.7)
    assert kept[0] < 8 and kept[1] == 8


def test_value_follows_the_gate_order():
    # the lowest-ranked units (by `order`) are the ones a group gives up first, so their
    # importance is what the decision weighs: group 0's tail is worthless, group 1's is not
    cost = linear_cost([0.5, 0.5])
    tail_free = [1.0] * 4 + [0.0] * 4
    kept = run(cost, [tail_free, [1.0] * 8], aim=0.75)
    assert kept == [4, 8]


def test_floor_and_unreachable_aim():
    cost = linear_cost([0.5, 0.5])
    kept = run(cost, [[1.0] * 8, [0.0] * 8], aim=0.01, floor=0.25)
    assert kept == [2, 2]  # both at the floor: the aim cannot be met, nothing breaks it
    assert run(cost, [[1.0] * 8, [1.0] * 8], aim=1.5) == [8, 8]


def test_taylor_importance_sums_units_and_corrects_bias():
    units = [torch.tensor([0, 0, 1]), torch.tensor([0, 1])]
    imp = TaylorImportance(units, [2, 2], decay=0.9)
    imp.add(0, torch.tensor([1.0, 2.0, -1.0]))
    assert imp.get(0).tolist() == pytest.approx([9.0, 1.0])  # (1 + 2)^2, (-1)^2, unbiased
    assert imp.get(1).tolist() == [0.0, 0.0]  # never fed
    state = imp.state_dict()
    other = TaylorImportance(units, [2, 2], decay=0.9)
    other.load_state_dict(state)
    assert other.get(0).tolist() == pytest.approx([9.0, 1.0])


def test_a_cost_for_one_vector_at_a_time_works_too():
    batched = linear_cost([0.8, 0.2])

    def single(kept):
        if kept.dim() != 1:
            raise RuntimeError("one configuration at a time")
        return batched(kept)

    importance = [[1.0] * 8, [1.0] * 8]
    assert run(single, importance, aim=0.7) == run(batched, importance, aim=0.7)


def test_start_reopens_below_the_aim_and_closes_from_itself_above_it():
    cost = linear_cost([0.5, 0.5])
    order = [torch.arange(8)] * 2
    imp = [torch.ones(8), torch.full((8,), 0.01)]

    def from_start(start, aim):
        return allocate(cost, [8, 8], [8, 8], [1, 1], order, imp, aim, start=start)

    # under the aim: the important group reopens first, and the aim still holds; then a
    # unit of the unimportant group is traded for the important group's last one
    assert from_start([2, 2], 0.6) == [8, 1]
    # over it: units close from the given widths, so a group never grows past its start
    kept = from_start([8, 4], 0.5)
    assert kept[1] <= 4 and float(cost(torch.tensor(kept) * 1.0)) <= 0.5 + 1e-6
    assert from_start([8, 4], 0.75) == [8, 4]  # already at the aim: nothing moves


def test_a_dropped_block_comes_back_when_a_narrower_group_pays_for_it():
    # group 0 is a block (droppable, widths 4 or 8) with a fixed 0.05 when present
    def cost(kept: torch.Tensor) -> torch.Tensor:
        k = kept.float()
        return (0.05 * (k[..., 0] > 0) + 0.3 * k[..., 0] / 8 + 0.12 * k[..., 1] / 8
                + 0.16 * k[..., 2] / 8)

    imp = [torch.tensor(v) for v in ([1.7, 1.7, 1.4, 1.2, 0.8, 0.8, 0.5, 0.4],
                                     [2.0, 1.9, 1.5, 1.5, 1.2, 1.1, 1.1, 1.0],
                                     [1.7, 1.5, 1.2, 1.2, 1.1, 0.9, 0.8, 0.6])]
    kept = allocate(cost, [8] * 3, [8] * 3, [0, 1, 1], [torch.arange(8)] * 3, imp, 0.44,
                    grid=[[4, 8], [2, 4, 6, 8], [2, 4, 6, 8]])
    # the descent drops the block and ends at [0, 8, 8] (0.28): bringing it back alone
    # (0.48) is over the aim, but with group 2 one step narrower it fits and keeps more
    assert kept == [4, 8, 6]
    assert float(cost(torch.tensor(kept))) <= 0.44 + 1e-6


def test_narrowed_into_the_band_least_important_first_never_dropping():
    cost = linear_cost([0.5, 0.3, 0.2])
    order = [torch.arange(8)] * 3
    imp = [torch.full((8,), 3.0), torch.ones(8), torch.full((8,), 2.0)]
    grid = [[4, 8]] * 3

    def narrowed(kept, reading, band, min_units=(1, 1, 1)):
        return narrowed_into(cost, [8] * 3, [8] * 3, list(min_units), order, imp, kept,
                             reading, band, grid=grid)

    # 0.6 read at full widths: group 0 at 4 would read 0.45 (under), groups 1 and 2 at 4
    # 0.51 and 0.54; group 1's units are the less important
    assert narrowed([8, 8, 8], 0.6, (0.5, 0.56)) == [[8, 4, 8], [8, 8, 4]]
    # group 2 at its lowest may drop its block in `allocate`, but is not dropped here
    assert narrowed([8, 8, 4], 0.6, (0.45, 0.56), min_units=(1, 1, 0)) == [[8, 4, 4]]
    assert narrowed([8, 8, 8], 0.6, (0.2, 0.3)) == []  # no one move reaches the band


def cliff_cost(kept: torch.Tensor) -> torch.Tensor:
    """Groups 0 and 1 (8 units each) share a cache: their part of the latency drops from 0.6
    to 0.18 only once both are at 4 units or fewer; group 2's 0.4 is linear in its width."""
    both_narrow = (kept[..., :2].max(-1).values <= 4).float()
    return 0.6 * (1.0 - 0.7 * both_narrow) + 0.4 * kept[..., 2] / 8


def test_a_tier_moves_jointly_over_a_cliff_no_single_group_can_see():
    order, imp = [torch.arange(8)] * 3, [torch.ones(8)] * 3

    def alloc(tiers):
        return allocate(cliff_cost, [8] * 3, [8] * 3, [1] * 3, order, imp, 0.62, tiers=tiers)

    alone = alloc(())
    assert alone[:2] == [8, 8] and float(cliff_cost(torch.tensor(alone) * 1.0)) > 0.62
    jointly = alloc([[0, 1]])
    # both at 4 (not lower: reopening a unit of either would climb the cliff again), and
    # group 2 reopened to full width with the latency the jump saved
    assert jointly == [4, 4, 8] and float(cliff_cost(torch.tensor(jointly) * 1.0)) <= 0.62


def test_a_tier_move_waits_while_single_steps_are_cheaper():
    # no cliff: a joint move loses as much per latency saved as single steps, so the
    # allocation is the one without tiers
    cost = linear_cost([0.4, 0.4, 0.2])
    order, imp = [torch.arange(8)] * 3, [torch.ones(8), torch.ones(8), torch.full((8,), 0.1)]
    plain = allocate(cost, [8] * 3, [8] * 3, [1] * 3, order, imp, 0.8)
    assert allocate(cost, [8] * 3, [8] * 3, [1] * 3, order, imp, 0.8, tiers=[[0, 1]]) == plain


def block_cost(block: int = 16, size: int = 64):
    """Group 0 costs whole blocks (a width between two costs the next one, as a blocked
    kernel runs it); group 1 is smooth. Both weigh half of the latency."""
    def cost(kept):
        k = kept.float()
        blocked = torch.ceil(k[..., 0] / block) * block
        return 0.5 * blocked / size + 0.5 * k[..., 1] / size
    return cost


def test_a_grid_moves_a_blocked_group_a_whole_block_and_prices_it_so():
    """Priced one unit (or 1/8 of the group) at a time, the blocked group never shows a
    saving, so all the cut falls on the smooth one; on its grid, the blocked group's moves
    are from one block to the next, priced at what they save, and it ends on the grid."""
    cost, n = block_cost(), 64
    order, value = [torch.arange(n)] * 2, [torch.ones(n)] * 2
    free = allocate(cost, [n, n], [n, n], [1, 1], order, value, aim=0.6)
    assert free[0] == n  # no probe of it ever saved latency
    grid = [[16, 32, 48, 64], None]
    kept = allocate(cost, [n, n], [n, n], [1, 1], order, value, aim=0.6, grid=grid)
    assert kept[0] in grid[0] and kept[0] < n
    assert float(cost(torch.tensor(kept, dtype=torch.float32))) <= 0.6 + 1e-6
    # from there, reopening also goes a block at a time, and the floor lands on the grid
    assert allocate(cost, [n, n], [n, n], [1, 1], order, value, aim=0.95, grid=grid,
                    start=kept)[0] in grid[0]
    assert allocate(cost, [n, n], [n, n], [1, 1], order, value, aim=0.01, grid=grid,
                    floor=0.1)[0] == 16  # the floor (7 units) rounded up to the grid


def test_a_whole_block_is_traded_for_many_units_of_another_group():
    """Group 0 moves only in blocks of 16 (a quarter of the latency each), group 1 one unit
    at a time (1/32 each). Its units are worth more per latency, so the descent closes group
    0's block first and overshoots the aim; reopening group 0 costs what four of group 1's
    units do, a trade no single pair of moves makes. As in torch-cpu at batch 32, where a
    stage-2 stream's 16 -> 32 costs what ~5 stage-1 channels do."""
    def cost(kept):
        k = kept.float()
        return 0.5 * k[..., 0] / 32 + 0.5 * k[..., 1] / 16

    order = [torch.arange(32), torch.arange(16)]
    value = [torch.ones(32), torch.full((16,), 2.5)]
    grid = [[16, 32], None]

    def alloc(aim, start=None):
        return allocate(cost, [32, 16], [32, 16], [1, 1], order, value, aim, grid=grid,
                        start=start)

    # descent: [16, 16] (0.75, worth 56); the block back, paid by 4 units: [32, 12] (62)
    assert alloc(0.9) == [32, 12]
    # the other way: at [32, 3] (worth 39.5) the block closed and its saving spent on
    # group 1 gives [16, 11] (43.5), though the block against one unit alone ([16, 4]) loses
    assert alloc(0.6, start=[32, 3]) == [16, 11]
