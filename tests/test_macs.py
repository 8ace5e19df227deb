"""The MACs map LPNet's prior reads: exact against the MACs profiling records (convs and
linears), for plain, residual and depthwise convs; and what it buys LPNet where the samples
never went."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import wgates
from wgates.latency.sampling import describe
from wgates.macs import MacsModel
from wgates.models import create_model
from wgates.predictor import LatencyPredictor


@pytest.mark.parametrize("spec", ["resnet20", "mobilenetv2_cifar"])
def test_macs_model_counts_the_convs_and_linears(spec, make_masks, one_thread):
    inputs = (torch.randn(1, 3, 32, 32),)
    gated = wgates.gate(create_model(spec).eval(), inputs)
    macs = MacsModel.of(gated)
    dense = describe(gated.plain_copy(), inputs).flops
    assert float(macs(gated.sizes())) == pytest.approx(1.0)
    for seed in range(3):
        gated.set_masks(make_masks(gated, seed))
        small = describe(gated.extract(verify=False), inputs).flops
        assert float(macs(gated.kept_counts())) == pytest.approx(small / dense, rel=1e-4)
        gated.clear_masks()


def _resnet20_groups():
    gated = wgates.gate(create_model("resnet20").eval(), (torch.randn(1, 3, 32, 32),))
    return ([g.name for g in gated.channel_groups], [g.size for g in gated.channel_groups],
            MacsModel.of(gated))


def test_lpnet_on_the_prior_holds_where_no_sample_went(tmp_path):
    """Samples only keep half of every group or more; the knapsack then asks about one group
    at 1 channel. The prior carries the prediction there; it also survives save and load."""
    names, sizes, macs = _resnet20_groups()
    rng = np.random.default_rng(0)
    size = np.array(sizes)

    def latency(kept: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return 0.25 + 0.75 * macs(torch.as_tensor(kept, dtype=torch.float32)).numpy()

    kept = np.ceil(size * rng.uniform(0.5, 1.0, (60, len(sizes))))
    ratios = latency(kept) * (1 + 0.02 * rng.standard_normal(len(kept)))
    model = LatencyPredictor.fit(names, sizes, kept, ratios, steps=400, macs=macs)
    far = np.tile(size // 2, (len(sizes), 1)).astype(float)
    far[np.arange(len(sizes)), np.arange(len(sizes))] = 1  # one group at 1 channel each
    with torch.no_grad():
        predicted = model(torch.as_tensor(far, dtype=torch.float32)).numpy()
    assert np.abs(predicted / latency(far) - 1).max() < 0.05

    model.save(tmp_path / "lpnet.pt")
    again = LatencyPredictor.load(tmp_path / "lpnet.pt")
    with torch.no_grad():
        assert torch.equal(again(torch.as_tensor(far, dtype=torch.float32)),
                           torch.as_tensor(predicted))


def test_layers_counts_the_convs_and_linears_a_dropped_block_takes_away():
    gated = wgates.gate(create_model("resnet20").eval(), (torch.randn(1, 3, 32, 32),),
                        depth=True)
    macs = MacsModel.of(gated)
    n = macs.weights.numel()  # 19 convs and the classifier
    kept = gated.sizes().float()
    assert float(macs.layers(kept)) == 1.0
    droppable = sorted(gated.droppable)
    kept[droppable[0]] = 0  # the block's two convs go
    assert float(macs.layers(kept)) == pytest.approx((n - 2) / n)
    kept[droppable[1]] = 0
    assert float(macs.layers(kept)) == pytest.approx((n - 4) / n)
    kept[droppable[1]] = 1  # one channel keeps both
    assert float(macs.layers(kept)) == pytest.approx((n - 2) / n)


def test_lpnet_prices_dropped_blocks_by_the_layers_they_take_away(tmp_path):
    """Latency with a fixed cost per layer, as at batch 1: samples drop a few blocks at random
    widths; the knapsack asks about wide stages with many blocks dropped. MACs alone cannot
    see a block's fixed cost there; the layers term does. An LPNet saved before the term
    existed (a prior of two entries) still loads and predicts as it did."""
    gated = wgates.gate(create_model("resnet20").eval(), (torch.randn(1, 3, 32, 32),),
                        depth=True)
    macs = MacsModel.of(gated)
    names, sizes = [g.name for g in gated.groups], [g.size for g in gated.groups]
    droppable = sorted(gated.droppable)
    rng = np.random.default_rng(0)
    size = np.array(sizes, dtype=float)

    def latency(kept: np.ndarray) -> np.ndarray:
        k = torch.as_tensor(kept, dtype=torch.float32)
        with torch.no_grad():
            return (0.1 + 0.3 * macs(k) + 0.6 * macs.layers(k)).numpy()

    kept = np.ceil(size * rng.uniform(0.25, 1.0, (80, len(sizes))))
    kept[:, droppable] *= rng.uniform(size=(80, len(droppable))) > 0.25
    ratios = latency(kept) * (1 + 0.01 * rng.standard_normal(len(kept)))
    far = np.tile(size, (3, 1))
    far[0, droppable[:4]] = 0
    far[1, droppable[:5]] = 0
    far[2, droppable] = 0
    model = LatencyPredictor.fit(names, sizes, kept, ratios, steps=400, macs=macs,
                                 prior_decay=10.0)
    with torch.no_grad():
        predicted = model(torch.as_tensor(far, dtype=torch.float32)).numpy()
    assert np.abs(predicted / latency(far) - 1).max() < 0.05

    old = LatencyPredictor(names, sizes, macs=macs)
    with torch.no_grad():
        old.prior.copy_(torch.tensor([0.2, 0.8, 0.0]))
    old.save(tmp_path / "lpnet.pt")
    blob = torch.load(tmp_path / "lpnet.pt", weights_only=True)
    blob["state_dict"]["prior"] = blob["state_dict"]["prior"][:2]  # as saved before
    torch.save(blob, tmp_path / "old.pt")
    again = LatencyPredictor.load(tmp_path / "old.pt")
    with torch.no_grad():
        assert torch.allclose(again(torch.as_tensor(far, dtype=torch.float32)),
                              old(torch.as_tensor(far, dtype=torch.float32)))
