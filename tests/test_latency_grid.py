"""The channel block a model's latency steps in (`wgates.latency.grid`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.gated import gate
from wgates.latency import Protocol
from wgates.latency.grid import check_block, find_block, is_step, probe_block
from wgates.models.cifar_resnet import CifarResNet


@pytest.mark.parametrize("low, over, high, expected", [
    (0.405, 0.565, 0.561, True),  # torch-cpu, batch 32, AVX-512: a 17th channel costs 16
    (0.405, 0.415, 0.561, False),  # channel by channel: one channel ~1/16 of the block
    (0.900, 0.930, 0.920, False),  # widths barely move the latency: no grid worth having
])
def test_a_step_is_one_channel_costing_most_of_a_block(low, over, high, expected):
    assert is_step(low, over, high) is expected


def _blocked_cost(block: int):
    """A stand-in backend: latency ~ the sum over convs of in x out channels, each rounded up
    to whole blocks of `block` above `block` (below it channel by channel)."""
    def padded(c: int) -> int:
        return c if c <= block else block * math.ceil(c / block)

    def cost(model: nn.Module) -> float:
        return sum(padded(m.in_channels) * padded(m.out_channels)
                   for m in model.modules() if isinstance(m, nn.Conv2d))
    return cost


@pytest.mark.parametrize("block, expected", [(16, 16), (8, 8), (1, 1)])
def test_the_block_the_latency_steps_in_is_found(block, expected):
    x = torch.randn(1, 3, 32, 32)
    gated = gate(CifarResNet(20).eval(), x)
    before = gated.widths()
    cost = _blocked_cost(block)
    dense = cost(gated.plain_copy())
    found = find_block(gated, lambda model: cost(model) / dense)
    assert found.block == expected
    assert set(found.readings) == ({16} if expected == 16 else {16, 8})
    assert gated.widths() == before  # the probe's masks are cleared


def test_probe_reads_each_variant_against_the_dense_model_on_the_backend():
    """The measured path end to end (what it finds depends on this CPU): every group of 32
    channels read at 16, 17 and 32, then at 8, 9 and 16 unless a step was found at 16."""
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 10))
    found = probe_block(net, torch.randn(2, 3, 8, 8), protocol=Protocol(rounds=6))
    assert found.block in (1, 8, 16) and 16 in found.readings
    assert all(0 < r < 2 for ratios in found.readings.values() for r in ratios)
    assert set(found.readings) == ({16} if found.block == 16 else {16, 8})
    assert "16, 17, 32 channels" in found.summary()


@pytest.mark.parametrize("value", [0, "16", "Auto", 2.5])
def test_a_channel_block_that_is_no_count_nor_auto_is_refused(value):
    with pytest.raises(WgatesError, match="whole number >= 1, 'auto'"):
        check_block(value)
    for good in (None, "auto", 1, 16):
        check_block(good)
