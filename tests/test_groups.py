"""Channel groups: coupled channels land together, the classifier's outputs are never a group,
ignore / min_channels exclude what they should."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wgates
from wgates.errors import WgatesError
from wgates.groups import find_groups
from wgates.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

X32 = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def r20_groups():
    return find_groups(create_model("resnet20"), X32)


def _by_name(groups):
    return {g.name: g for g in groups}


def test_residual_coupled_convs_form_one_group(r20_groups):
    stem = _by_name(r20_groups)["conv1"]
    assert {p.module for p in stem.producers} == {
        "conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert {p.module for p in stem.gate_points} == {  # gated after their BatchNorms
        "bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"}
    assert {p.module for p in stem.consumers} == {
        "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
        "layer2.0.shortcut.0"}
    assert stem.size == 16 and stem.ties is None
    # a residual stage's convs are in exactly one group; every conv1 is its own group
    producers = [p.module for g in r20_groups for p in g.producers]
    assert len(producers) == len(set(producers))
    assert {"layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv1"} <= {g.name for g in r20_groups}
    assert len(r20_groups) == 12  # stem+stage1, 2 stage projections, 9 block conv1s


@pytest.mark.parametrize("spec", ["resnet20", "small_cnn", "mobilenetv2_cifar"])
def test_classifier_output_is_never_a_group(spec):
    model = create_model(spec)
    x = torch.randn(1, *wgates.models.default_input_shape(spec))
    groups = find_groups(model, x)
    assert groups
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    for g in groups:
        assert last_linear not in {p.module for p in g.producers}
        assert last_linear not in {p.module for p in g.channelwise}


def test_ignore_by_name_excludes_the_whole_coupled_group(r20_groups):
    model = create_model("resnet20")
    names = {g.name for g in r20_groups}
    # an ignored layer keeps its outputs and its inputs: the group it reads goes too
    kept = {g.name for g in find_groups(model, X32, ignore=["layer1.0.conv1"])}
    assert kept == names - {"layer1.0.conv1", "conv1"}
    # ignoring a residual member leaves its whole group (the stem group) dense
    kept = {g.name for g in find_groups(model, X32, ignore=["layer1.1.conv2"])}
    assert kept == names - {"conv1", "layer1.1.conv1"}
    # a container name covers everything inside it
    kept = find_groups(model, X32, ignore=["layer3"])
    assert kept and not any(m.startswith("layer3") for g in kept for m in g.modules)


def test_ignore_by_module_and_type():
    model = create_model("resnet20")
    kept = find_groups(model, X32, ignore=[model.layer2])
    assert kept and not any(m.startswith("layer2") for g in kept for m in g.modules)
    every = find_groups(model, X32)
    kept = find_groups(model, X32, ignore=[nn.Linear])  # the group the classifier reads goes
    assert [g.name for g in kept] == [g.name for g in every if "fc" not in g.modules]
    assert len(kept) == len(every) - 1
    with pytest.raises(WgatesError):  # nothing left to gate
        wgates.gate(model, X32, ignore=[nn.Conv2d], verify=False)


@pytest.mark.parametrize("bad", ["no_such_layer", nn.Conv2d(3, 3, 1), 42])
def test_bad_ignore_entries(bad):
    with pytest.raises(WgatesError, match="ignore"):
        find_groups(create_model("resnet20"), X32, ignore=[bad])


def test_min_channels_excludes_small_groups():
    model = create_model("resnet20")
    groups = find_groups(model, X32, min_channels=16)
    assert groups and all(g.size > 16 and g.min_channels == 16 for g in groups)
    with pytest.raises(WgatesError, match="min_channels"):
        find_groups(model, X32, min_channels=0)


def test_depthwise_conv_joins_its_input_group():
    model = create_model("mobilenetv2_cifar")
    groups = _by_name(find_groups(model, X32))
    expand = groups["features.4.conv.0"]
    dw = model.get_submodule("features.4.conv.3")
    assert dw.groups == dw.in_channels == dw.out_channels == expand.size
    assert {p.module for p in expand.producers} == {"features.4.conv.0", "features.4.conv.3"}
    assert {p.module for p in expand.consumers} == {"features.4.conv.6"}
    assert expand.ties is None  # depthwise is channelwise: no tie
    assert not any("features.4.conv.3" == g.name for g in groups.values())


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1, groups=4)  # 4 conv-groups of 4 inputs
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_grouped_conv_ties_channels_at_same_offset():
    groups = _by_name(find_groups(GroupedNet(), X32))
    a = groups["a"]
    assert a.n_units == 4
    # channel c is tied with c+4, c+8, c+12 (same offset in every conv-group)
    assert all(a.ties[c] == a.ties[c % 4] for c in range(16))
    assert len(set(a.ties[:4])) == 4
    b = groups["b"]  # 8 outputs in 4 conv-groups of 2
    assert b.n_units == 2


def test_bad_example_inputs():
    with pytest.raises(WgatesError, match="example_inputs"):
        find_groups(create_model("resnet20"), [1, 2, 3][:0])
    with pytest.raises(WgatesError, match="channels"):  # the real error, on one line
        find_groups(create_model("resnet20"), torch.randn(1, 1, 32, 32))


# -- structures found by tests/test_properties.py ------------------------------------------


class DepthwiseMultiplierNet(nn.Module):
    """A depthwise conv with a channel multiplier (groups == in_channels < out_channels) reads
    the stem: pruning one of its inputs would have to drop a whole conv-group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.dw(torch.relu(self.stem(x))).mean((2, 3)))


def test_depthwise_multiplier_ties_all_its_input_channels():
    with pytest.warns(UserWarning, match="leaving stem unpruned: grouped convolutions .*dw"):
        groups = _by_name(find_groups(DepthwiseMultiplierNet(), X32))
    assert "stem" not in groups
    assert groups["dw"].n_units == 2  # 8 outputs in 4 conv-groups of 2: offsets 0 and 1


class OneOutputPerGroupNet(nn.Module):
    """Conv(8 -> 4, groups=4): each output reads two inputs. Torch-Pruning takes it for a
    depthwise conv (groups == out_channels) and maps 8 channels onto its 4 outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.mix(torch.relu(self.stem(x))).mean((2, 3)))


def test_conv_with_one_output_per_group_is_refused_not_crashed():
    with pytest.warns(UserWarning, match="leaving stem unpruned: Torch-Pruning takes mix"):
        groups = find_groups(OneOutputPerGroupNet(), X32)
    assert "stem" not in {g.name for g in groups}


class ConcatFlattenNet(nn.Module):
    """cat of two branches, then flatten of a 2x2 map into a linear: Torch-Pruning compared
    the concat's 6 channels with the linear's 24 inputs and gave the concat no index mapping,
    so each branch was mapped onto all six channels (an IndexError when gating)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def test_concat_then_flatten_into_linear_maps_each_branch_to_its_channels():
    groups = _by_name(find_groups(ConcatFlattenNet(), X32))
    a, b = groups["a"], groups["b"]
    assert [p.module for p in a.producers] == ["a"] and [p.module for p in b.producers] == ["b"]
    (fc_a,), (fc_b,) = a.consumers, b.consumers
    assert sorted(fc_a.idxs) == list(range(0, 8))  # channels 0-1, 4 positions each
    assert sorted(fc_b.idxs) == list(range(8, 24))
    gated = wgates.gate(ConcatFlattenNet(), X32, strict=True)
    gated.set_masks(gated.masks_for_widths({"a": 1, "b": 2}))
    small = gated.extract()  # verify=True: exact
    assert small.fc.in_features == 3 * 4


class SplitNet(nn.Module):
    """CSP-style: the stem's 16 channels split in two; `mode` says how the chunks are used."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        x = self.stem(x)
        if self.mode == "residual":  # a chunk read twice, split with a negative dim
            x1, x2 = x.split(8, dim=-3)
            x = torch.cat([x1 + self.block(x1), x2], 1)
        elif self.mode == "branch":  # the block's output concatenated with the other chunk
            x1, x2 = x.chunk(2, 1)
            x = torch.cat([self.block(x1), x2], 1)
        else:  # along the width: the channels pass through unchanged
            x1, x2 = x.split(4, dim=-1)
            x = torch.cat([x1, x2], -1)
        return self.fc(self.mix(x).mean((2, 3)))


@pytest.mark.parametrize("mode, prunable", [
    ("residual", {"mix.0"}), ("branch", {"block.0", "mix.0"}), ("spatial", {"stem.0", "mix.0"})])
def test_channel_split_is_left_dense_and_the_rest_maps_by_chunk(mode, prunable, warm, make_masks):
    """A split along the channels cuts at sizes fixed in the model's code: its group is left
    dense, naming the layer split. Torch-Pruning mapped readers to chunks by their order (a
    chunk read twice shifted the rest) and a concatenation back into a split with the chunk's
    offset first: `block` landed in the stem's group. The rest must extract exactly."""
    model = warm(SplitNet(mode), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    if "stem.0" in prunable:
        gated = wgates.gate(model, x, verify=False)
    else:
        with pytest.warns(UserWarning, match="leaving stem.0 unpruned: .*splits the channels "
                                             "of stem.1 with torch.split/chunk"):
            gated = wgates.gate(model, x, verify=False)
    assert {g.name for g in gated.groups} == prunable
    for seed in range(3):
        gated.set_masks(make_masks(gated, seed))
        small = gated.extract(verify=False)
        with torch.no_grad():
            assert (gated(x) - small(x)).abs().max() <= 1e-5
