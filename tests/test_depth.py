"""Depth: a residual block whose inner group keeps no channel is dropped exactly (its `Skip`),
found on the architectures that have such blocks, saved, reloaded and exported; the search's
allocation, the latency samples and the snapping treat 0 channels as a dropped block."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import wgates
from wgates.allocate import allocate
from wgates.depth import Skip, common_ancestors, skip_form
from wgates.extract import load_pruned, max_difference, save_pruned
from wgates.gates import top_k
from wgates.latency.sampling import sample_widths
from wgates.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    """x + branch(x), then `act`: the shape every droppable block has."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
                                    nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, bias=True))
        self.act = act

    def forward(self, x):
        return self.act(x + self.branch(x))


def test_skip_form_reads_the_constant_and_the_activation():
    torch.manual_seed(0)
    for act, name in ((nn.ReLU(), "relu"), (nn.Identity(), "identity")):
        block = Residual(act).double().eval()
        with torch.no_grad():
            block.branch[3].weight.zero_()  # the branch now adds its bias: a constant
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        form = skip_form(block, x)
        assert form is not None and form[0] == name
        torch.testing.assert_close(form[1], block.branch[3].bias.float())
        skip = Skip(4, form[0]).double()
        skip.constant.copy_(form[1])
        torch.testing.assert_close(skip(x), block(x))


def test_a_branch_that_still_reads_its_input_is_no_skip():
    block = Residual(nn.ReLU()).double().eval()
    assert skip_form(block, torch.randn(1, 4, 8, 8, dtype=torch.float64)) is None


def test_common_ancestors_innermost_first():
    assert common_ancestors(["layer1.1.conv1", "layer1.1.bn1", "layer1.1.conv2"]) == [
        "layer1.1", "layer1"]
    assert common_ancestors(["conv1", "layer1.0.conv2"]) == []
    assert common_ancestors(["layer1.1.conv1", "layer1.10.conv1"]) == ["layer1"]


@pytest.mark.parametrize("name,blocks", [
    ("resnet20", ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                  "layer3.2"]),
    ("resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    ("mobilenet_v2", ["features.3", "features.5", "features.6", "features.8", "features.9",
                      "features.10", "features.12", "features.13", "features.15",
                      "features.16"]),
])
def test_the_droppable_blocks_are_the_identity_shortcut_ones(name, blocks, warm):
    model = (create_model(name) if name == "resnet20"
             else torchvision.models.get_model(name, weights=None, num_classes=10))
    side = 32 if name == "resnet20" else 64
    model = warm(model, (2, 3, side, side))
    gated = wgates.gate(model, torch.randn(1, 3, side, side), depth=True)
    assert sorted(gated.droppable.values()) == sorted(blocks)
    for i in gated.droppable:
        assert gated.channel_groups[i].min_channels == 0


def test_without_depth_no_group_may_go_to_zero(resnet20, x32):
    gated = wgates.gate(resnet20, x32)
    assert not gated.droppable and all(g.min_channels >= 1 for g in gated.channel_groups)


@pytest.fixture
def dropped(resnet20, x32):
    """resnet20 gated with depth, three blocks dropped, every other group halved."""
    gated = wgates.gate(resnet20, x32, depth=True)
    widths = {g.name: g.size // 2 for g in gated.channel_groups}
    widths.update({"layer1.1.conv1": 0, "layer1.2.conv1": 0, "layer3.1.conv1": 0})
    gated.set_masks(gated.masks_for_widths(widths))
    return gated, gated.extract()  # verify=True: exact or an error


def test_dropped_blocks_extract_exactly_as_skips(dropped, x32):
    gated, small = dropped
    assert isinstance(small.layer1[1], Skip) and isinstance(small.layer1[2], Skip)
    assert isinstance(small.layer3[1], Skip) and not isinstance(small.layer1[0], Skip)
    assert max_difference(gated, small, (x32,)) < 1e-4
    assert gated.widths()["layer1.1.conv1"] == 0
    n_convs = sum(isinstance(m, nn.Conv2d) for m in small.modules())
    assert n_convs == 21 - 6


def test_dropped_blocks_reload_and_export(dropped, x32, tmp_path):
    _, small = dropped
    save_pruned(small, tmp_path / "m")
    back = load_pruned(create_model("resnet20"), tmp_path / "m")
    assert isinstance(back.layer1[1], Skip)
    assert max_difference(small, back, (x32,)) == 0.0
    onnxruntime = pytest.importorskip("onnxruntime")
    path = wgates.export_onnx(back, x32[:1], tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x32[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), back(x32[:1]), atol=1e-4, rtol=1e-4)


def test_a_group_without_a_block_still_refuses_zero(resnet20, x32):
    gated = wgates.gate(resnet20, x32, depth=True)
    with pytest.raises(wgates.WgatesError, match="below min_channels"):
        gated.set_masks({"conv1": torch.zeros(16, dtype=torch.bool)})


def test_top_k_of_zero_keeps_none_and_still_ranks():
    scores = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    gates = top_k(scores, 0)
    assert gates.sum().item() == 0
    gates.sum().backward()
    assert scores.grad.argmax().item() == 2  # the best unit is nearest to coming back


def test_a_few_channels_never_snap_to_a_dropped_block(resnet20, x32):
    gated = wgates.gate(resnet20, x32, depth=True, channel_multiple=8, channel_block=16)
    i = next(iter(gated.droppable))
    assert 0 in gated.unit_grid(i)
    assert gated.snap_width(i, 1) == 8 and gated.snap_width(i, 0) == 0


def _toy_cost(drop_saving: float):
    """Latency of two groups of 8: linear in the counts, and `drop_saving` less when the
    second group is at 0 (a block's overhead)."""
    def cost(counts: torch.Tensor) -> torch.Tensor:
        rows = counts.reshape(-1, 2)
        out = 0.5 + rows.sum(dim=1) / 32 - drop_saving * (rows[:, 1] == 0).float()
        return out if counts.dim() == 2 else out[0]
    return cost


@pytest.mark.parametrize("min_units,dropped", [([1, 0], True), ([1, 1], False)])
def test_allocation_drops_a_block_below_the_floor_only_where_allowed(min_units, dropped):
    order = [torch.arange(8), torch.arange(8)]
    importance = [torch.ones(8), torch.ones(8) * 0.5]
    kept = allocate(_toy_cost(0.3), [8, 8], [8, 8], min_units, order, importance, aim=0.7,
                    floor=0.5, grid=[[4, 8], [0, 4, 8] if min_units[1] == 0 else [4, 8]])
    assert (kept[1] == 0) is dropped
    if dropped:  # the saving of the drop is spent on the other group again
        assert kept[0] == 8


def test_latency_samples_drop_blocks_only_where_allowed(resnet20, x32):
    gated = wgates.gate(resnet20, x32, depth=True)
    droppable = {gated.channel_groups[i].name for i in gated.droppable}
    draws = [sample_widths(gated.groups, k)[1] for k in range(2, 60)]
    zeros = {name for w in draws for name, c in w.items() if c == 0}
    assert zeros and zeros <= droppable
    plain = wgates.gate(resnet20, x32)
    assert all(min(sample_widths(plain.groups, k)[1].values()) >= 1 for k in range(2, 60))
