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
