"""The defaults `wgates.prune` and `wgates prune` share."""

from __future__ import annotations

import pytest

from wgates.defaults import deployment_threads, depth_for
from wgates.latency.backends import get_backend


@pytest.mark.parametrize("depth, batch, grid, expected", [
    (None, 1, (1, 1), True),  # overhead-bound: a block costs more than its channels
    (None, 32, (1, 1), False),  # latency follows compute, widths move channel by channel
    (None, 32, (8, 8), False),  # multiples of 8 throughout: still no block
    (None, 32, (1, 16), True),  # a grid: narrowing buys latency a block at a time
    (False, 1, (1, 16), False),  # given: as given
    (True, 32, (1, 1), True),
])
def test_depth_by_default_at_batch_1_and_on_a_channel_grid(depth, batch, grid, expected):
    assert depth_for(depth, batch, *grid) is expected


@pytest.mark.parametrize("backend, block, expected", [
    ("torch-cpu", None, False),  # its own grid is (1, 1): no block
    ("torch-cpu", 16, True),  # --channel-block 16
])
def test_depth_reads_the_grid_as_the_backend_gives_it(backend, block, expected):
    """At batch 32 the default follows `width_grid`'s (multiple, block), which always names
    a block (the multiple where there is none)."""
    grid = get_backend(backend, 1).width_grid(None, block)
    assert depth_for(None, 32, *grid) is expected


def test_deployment_threads_put_the_pruned_for_count_first_without_repeats():
    assert deployment_threads(2, (1, 2)) == [2, 1]
    assert deployment_threads(1, (1, 2)) == [1, 2]
