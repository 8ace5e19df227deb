"""The defaults `wgates.prune` and `wgates prune` share."""

from __future__ import annotations

import pytest

from wgates.defaults import deployment_threads, depth_for


@pytest.mark.parametrize("depth, batch, block, expected", [
    (None, 1, None, True),  # overhead-bound: a block costs more than its channels
    (None, 32, None, False),  # latency follows compute, widths move channel by channel
    (None, 32, 16, True),  # a grid: narrowing buys latency a block at a time
    (False, 1, 16, False),  # given: as given
    (True, 32, None, True),
])
def test_depth_by_default_at_batch_1_and_on_a_channel_grid(depth, batch, block, expected):
    assert depth_for(depth, batch, block) is expected


def test_deployment_threads_put_the_pruned_for_count_first_without_repeats():
    assert deployment_threads(2, (1, 2)) == [2, 1]
    assert deployment_threads(1, (1, 2)) == [1, 2]
