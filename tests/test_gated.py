"""GatedModel: masks are validated, widths are what was asked, the user's model is untouched."""

from __future__ import annotations

import pytest
import torch

import wgates
from wgates.errors import WgatesError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gated(resnet20, x32):
    return wgates.gate(resnet20, x32, verify=False, min_channels=2)


def test_group_views(gated):
    view = gated.groups[0]
    assert (view.name, view.size, view.min_channels) == ("conv1", 16, 2)
    assert view.mask.dtype == torch.bool and view.mask.shape == (16,)
    assert view.kept.requires_grad and float(view.kept.detach()) == 16
    assert "conv1" in repr(view)
    assert list(gated.masks()) == [g.name for g in gated.groups]


def test_set_masks_validation(gated):
    with pytest.raises(WgatesError, match="no group named"):
        gated.set_masks({"nope": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(WgatesError, match="shape"):
        gated.set_masks({"conv1": torch.ones(15, dtype=torch.bool)})
    with pytest.raises(WgatesError, match="bool"):
        gated.set_masks({"conv1": torch.ones(16)})
    with pytest.raises(WgatesError, match="bool"):
        gated.set_masks({"conv1": torch.ones(16, dtype=torch.long)})
    below = torch.zeros(16, dtype=torch.bool)
    below[0] = True
    with pytest.raises(WgatesError, match="min_channels"):
        gated.set_masks({"conv1": below})
    assert gated.widths()["conv1"] == 16  # nothing was applied by the failed calls
    ok = torch.zeros(16, dtype=torch.bool)
    ok[:2] = True
    gated.set_masks({"conv1": ok.tolist()})  # a list of bools is fine
    assert torch.equal(gated.masks()["conv1"], ok)


def test_masks_for_widths_gives_requested_widths(gated, x32):
    want = {g.name: max(2, g.size // (i + 2)) for i, g in enumerate(gated.groups)}
    masks = gated.masks_for_widths(want)
    assert {n: int(m.sum()) for n, m in masks.items()} == want
    gated.set_masks(masks)
    assert gated.widths() == want
    assert gated.kept_counts().tolist() == [float(want[g.name]) for g in gated.groups]
    # partial: only the named groups change
    gated.clear_masks()
    gated.set_masks(gated.masks_for_widths({"conv1": 5}))
    widths = gated.widths()
    assert widths["conv1"] == 5
    assert all(widths[g.name] == g.size for g in gated.groups if g.name != "conv1")
    gated.clear_masks()
    assert gated.widths() == {g.name: g.size for g in gated.groups}


def test_masks_for_widths_keeps_highest_scores(gated):
    scores = gated.scores(0).detach()
    mask = gated.masks_for_widths({"conv1": 4})["conv1"]
    assert set(mask.nonzero().flatten().tolist()) == set(scores.topk(4).indices.tolist())


@pytest.mark.parametrize("width", [1, 17])
def test_masks_for_widths_out_of_range(gated, width):
    with pytest.raises(WgatesError, match="outside"):
        gated.masks_for_widths({"conv1": width})


def test_masked_channels_are_zero_in_the_forward_pass(gated, x32):
    mask = gated.masks_for_widths({"conv1": 6})["conv1"]
    gated.set_masks({"conv1": mask})
    seen = {}
    bn = gated.model.get_submodule("bn1")
    handle = bn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    gated.eval()
    with torch.no_grad():
        gated(x32)
    handle.remove()
    # our hook runs after the gate hook: what we see is what the network sees
    per_channel = seen["out"].abs().sum((0, 2, 3))
    assert (per_channel[~mask] == 0).all() and (per_channel[mask] > 0).all()


def test_user_model_untouched(resnet20, x32):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    training = resnet20.training
    gated = wgates.gate(resnet20, x32, verify=True)
    gated.set_masks(gated.masks_for_widths({g.name: g.min_channels for g in gated.groups}))
    gated.train()
    gated(x32).sum().backward()
    gated.extract()
    after = resnet20.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert resnet20.training == training
    assert gated.model is not resnet20
    for module in resnet20.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    assert all(p.grad is None for p in resnet20.parameters())


def test_extracted_model_has_no_gate_hooks(gated):
    gated.set_masks(gated.masks_for_widths({"conv1": 8}))
    small = gated.extract()
    for module in small.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_model_without_prunable_groups():
    with pytest.raises(WgatesError, match="no prunable"):
        wgates.gate(torch.nn.Linear(4, 3), torch.randn(1, 4))


def test_channel_multiple_snaps_the_delivered_widths(resnet20, x32):
    """Widths come out in multiples of `channel_multiple` (the nearest; the full width is
    allowed too), keeping the channels asked for when it rounds up and the best-scored ones
    when it rounds down; the model is still exact, and the masks stay what was delivered."""
    gated = wgates.gate(resnet20, x32, channel_multiple=8)
    wide = gated.groups[-1]  # 64 channels
    for asked, delivered in [(13, 16), (11, 8), (61, 64), (60, 56), (3, 8)]:
        gated.clear_masks()
        wanted = gated.masks_for_widths({wide.name: asked})[wide.name]
        gated.set_masks({wide.name: wanted})
        small = gated.extract()  # verifies exactness
        mask = gated.masks()[wide.name]
        assert int(mask.sum()) == delivered
        assert bool((wanted & mask).sum() == min(asked, delivered))
        assert int(gated.kept_counts()[-1]) == delivered
        assert all(w % 8 == 0 or w == g.size for w, g in
                   zip(gated.widths().values(), gated.groups))
        del small
    with pytest.raises(WgatesError, match="channel_multiple"):
        wgates.gate(resnet20, x32, channel_multiple=0)


def test_resolution_tiers_group_the_stages_and_skip_linear_layers(gated):
    # ResNet-20: each stage's stream and inner groups (layer2.0.conv1 has stride 2)
    assert gated.resolution_tiers() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    mlp_head = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 2))
    tiers = wgates.gate(mlp_head, torch.randn(1, 3, 8, 8), verify=False).resolution_tiers()
    assert tiers == []  # the convs are 6x6 and 4x4, one group each; the Linear has no size


def test_allowed_widths_are_multiples_up_to_a_block_and_whole_blocks_above():
    from wgates.gated import allowed_widths

    assert allowed_widths(64, 1, 8, 16) == [8, 16, 32, 48, 64]
    assert allowed_widths(64, 1, 8, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert allowed_widths(16, 1, 8, 16) == [8, 16]
    assert allowed_widths(40, 10, 8, 16) == [16, 32, 40]  # the full width, none under 10
    assert allowed_widths(6, 1, 8, 16) == [6]


def test_channel_block_snaps_wide_groups_to_whole_blocks(resnet20, x32):
    """With `channel_block=16`, widths above 16 come out in multiples of 16 (24 ran as
    slowly as 32 on ONNX Runtime with AVX-512), narrower ones in multiples of 8, and the
    knapsack's grid (`unit_grid`) is the same set."""
    gated = wgates.gate(resnet20, x32, channel_multiple=8, channel_block=16)
    wide = gated.groups[-1]  # 64 channels
    assert gated.unit_grid(len(gated.groups) - 1) == [8, 16, 32, 48, 64]
    for asked, delivered in [(40, 32), (41, 48), (24, 16), (12, 8), (13, 16)]:
        gated.clear_masks()
        gated.set_masks({wide.name: gated.masks_for_widths({wide.name: asked})[wide.name]})
        gated.extract()
        assert int(gated.masks()[wide.name].sum()) == delivered
    assert wgates.gate(resnet20, x32).unit_grid(0) is None  # any width
    with pytest.raises(WgatesError, match="channel_block"):
        wgates.gate(resnet20, x32, channel_multiple=8, channel_block=12)
