"""Extraction is exact: the physically smaller model computes what the gated model computes
under the same masks (eval mode, real BatchNorm statistics), and it is really smaller."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

import wgates
from wgates.errors import WgatesError
from wgates.extract import verify_groups
from wgates.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def _tv(name, **kwargs):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


MODELS = {  # name -> (constructor, input side)
    "resnet20": (lambda: create_model("resnet20"), 32),
    "resnet56": (lambda: create_model("resnet56"), 32),
    "mobilenetv2_cifar": (lambda: create_model("mobilenetv2_cifar"), 32),
    "resnet18": (_tv("resnet18"), 64),
    "resnet50": (_tv("resnet50"), 64),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64),
    "densenet121": (_tv("densenet121"), 64),
    "efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 64),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 64),
    "vgg11_bn": (_tv("vgg11_bn"), 64),
}
# Channel shuffle cannot be followed by Torch-Pruning: these groups must be found and left
# dense by gate(verify=True), so this model is gated with verification on.
VERIFY = {"shufflenet_v2_x0_5"}


def check_exact(model, gated, masks, shape, seed=0):
    """Set `masks`, extract, compare on random inputs; returns the extracted model."""
    gated.clear_masks()
    gated.set_masks(masks)
    small = gated.extract(verify=False)
    gated.eval(), small.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(1):
            x = torch.randn(shape, generator=gen)
            out_gated, out_small, out_dense = gated(x), small(x), model(x)
            assert out_small.shape == out_gated.shape
            assert (out_gated - out_small).abs().max().item() <= TOL
            # the masks really change the function (the comparison is not vacuous)
            assert (out_gated - out_dense).abs().max().item() > 10 * TOL * out_dense.abs().max()
    ops_dense, params_dense = tp.utils.count_ops_and_params(model, x)
    ops_small, params_small = tp.utils.count_ops_and_params(small, x)
    assert params_small < params_dense
    assert ops_small < ops_dense
    return small


@pytest.mark.parametrize("name", list(MODELS))
def test_extracted_model_is_exact(name, warm, make_masks):
    build, side = MODELS[name]
    torch.manual_seed(0)
    shape = (2, 3, side, side)
    model = warm(build(), shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="wgates: leaving")
        gated = wgates.gate(model, torch.randn(shape), verify=name in VERIFY)
    if name in VERIFY:
        assert any(".branch2.5" not in g.name for g in gated.groups)
    check_exact(model, gated, make_masks(gated), shape)


class UnseenNet(nn.Module):
    """A fresh architecture: residual add, two-branch concat, depthwise conv,
    squeeze-excitation, grouped conv, a Linear after flatten."""

    def __init__(self, num_classes: int = 5, concat_into_grouped: bool = False):
        super().__init__()
        self.concat_into_grouped = concat_into_grouped
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.left = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 20, 3, padding=1), nn.BatchNorm2d(20),
                                   nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU6())
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.mix = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        cin = 32 if concat_into_grouped else 24
        self.grouped = nn.Sequential(nn.Conv2d(cin, 24, 3, stride=2, padding=1, groups=4),
                                     nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        if self.concat_into_grouped:
            return self.head(self.grouped(x).flatten(1))
        x = self.dw(x)
        squeezed = torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))
        x = self.grouped(self.mix(x * torch.sigmoid(self.se_expand(squeezed))))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(x.flatten(1))


def test_unseen_user_model_is_exact(warm, make_masks):
    torch.manual_seed(0)
    shape = (2, 3, 16, 16)
    model = warm(UnseenNet(), shape)
    gated = wgates.gate(model, torch.randn(shape), verify=True, strict=True)
    names = {g.name for g in gated.groups}
    assert {"stem.0", "left.0", "right.0", "se_reduce", "mix.0", "grouped.0"} <= names
    ties = {g.name: g.n_units for g in gated.channel_groups if g.ties is not None}
    assert ties == {"mix.0": 6, "grouped.0": 6}  # 24 channels in 4 conv-groups of 6
    for seed in range(3):
        check_exact(model, gated, make_masks(gated, seed), shape, seed)


def test_concat_into_grouped_conv_is_left_dense(warm, make_masks):
    """Two groups concatenated into one grouped conv: the grouped conv ties channels *across*
    the groups, which per-group ties cannot express. verify=True must find exactly those
    groups and leave them dense (or refuse them with strict=True); the rest stays exact."""
    torch.manual_seed(0)
    shape = (2, 3, 8, 8)
    model = warm(UnseenNet(concat_into_grouped=True), shape)
    with pytest.raises(WgatesError, match="left.0"):
        wgates.gate(model, torch.randn(shape), strict=True)
    with pytest.warns(UserWarning, match="leaving 2 channel group"):
        gated = wgates.gate(model, torch.randn(shape))
    names = {g.name for g in gated.groups}
    assert "left.0" not in names and "right.0" not in names and "stem.0" in names
    check_exact(model, gated, make_masks(gated), shape)


def test_extract_with_verification(resnet20, x32, make_masks):
    gated = wgates.gate(resnet20, x32, verify=True, strict=True)
    gated.set_masks(make_masks(gated))
    small = gated.extract(verify=True)
    widths = gated.widths()
    for g in gated.channel_groups:
        assert small.get_submodule(g.name).out_channels == widths[g.name]
    full = wgates.gate(resnet20, x32).extract()  # gates start open: nothing is removed
    assert sum(p.numel() for p in full.parameters()) == sum(
        p.numel() for p in resnet20.parameters())


# -- save / load -------------------------------------------------------------------------


@pytest.fixture
def pruned(resnet20, x32, make_masks):
    gated = wgates.gate(resnet20, x32, verify=False)
    gated.set_masks(make_masks(gated))
    return gated.extract()


def test_save_load_round_trip(pruned, x32, tmp_path):
    out = wgates.save_pruned(pruned, tmp_path / "p")
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors", "pruning.json"]
    plan = json.loads((out / "pruning.json").read_text())
    assert set(plan) == {"kept", "sizes", "input_shapes", "input_dtypes", "dropped"}
    assert plan["dropped"] == {}  # no block dropped without depth
    raw = (out / "model.safetensors").read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch zip archive
    header_len = struct.unpack("<Q", raw[:8])[0]
    json.loads(raw[8 : 8 + header_len])  # safetensors: length-prefixed JSON header
    assert b"torch._utils" not in raw and b"_rebuild_tensor" not in raw

    loaded = wgates.load_pruned(create_model("resnet20"), out).eval()
    pruned.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x32), pruned(x32))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in pruned.parameters()]
    wgates.save_pruned(loaded, tmp_path / "again")  # a loaded model can be saved again


@pytest.mark.parametrize("wrong", ["resnet56", "small_cnn", "mobilenetv2_cifar"])
def test_load_into_wrong_architecture(pruned, tmp_path, wrong):
    wgates.save_pruned(pruned, tmp_path)
    with pytest.raises(WgatesError):
        wgates.load_pruned(create_model(wrong), tmp_path)


def test_load_into_already_pruned_model(pruned, tmp_path):
    wgates.save_pruned(pruned, tmp_path)
    with pytest.raises(WgatesError):
        wgates.load_pruned(pruned, tmp_path)


def test_save_dense_model_refused(resnet20, tmp_path):
    with pytest.raises(WgatesError, match="extract"):
        wgates.save_pruned(resnet20, tmp_path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(WgatesError, match="not found"):
        wgates.load_pruned(create_model("resnet20"), tmp_path / "nothing")


# -- structures found by tests/test_properties.py ------------------------------------------


class ConcatResidualNet(nn.Module):
    """cat(a, b) (8 channels), then a residual whose last conv is grouped (groups=2) and
    writes onto the concatenation: a's channel i and b's channel i sit at the same offset of
    its two conv-groups, so they must go together, across the two groups."""

    def __init__(self, grouped: int = 2, split: int = 4):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, split, 3, padding=1), nn.BatchNorm2d(split))
        self.b = nn.Sequential(nn.Conv2d(3, 8 - split, 3, padding=1), nn.BatchNorm2d(8 - split))
        self.c1 = nn.Conv2d(8, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, groups=grouped)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        y = torch.relu(y + self.c2(torch.relu(self.c1(y))))
        return self.head(y.mean((2, 3)))


def test_grouped_conv_tying_channels_across_groups_is_found_for_every_seed(warm):
    """verify_groups used to find this by a random mask, which could miss it; now it comes
    from the structure (ChannelGroup.unsafe), whatever the seed."""
    shape = (2, 3, 8, 8)
    torch.manual_seed(0)
    model = warm(ConcatResidualNet(), shape)
    gated = wgates.GatedModel(model, torch.randn(shape))
    unsafe = {g.name: g.unsafe for g in gated.channel_groups if g.unsafe}
    assert set(unsafe) == {"a.0", "b.0"}
    assert "grouped conv c2 (groups=2) ties channels across groups" in unsafe["a.0"]
    for seed in range(5):
        assert set(verify_groups(gated, seed=seed)) == {"a.0", "b.0"}
    with pytest.raises(WgatesError, match="a.0.*ties channels across groups"):
        wgates.gate(model, torch.randn(shape), strict=True)
    with pytest.warns(UserWarning, match="leaving 2 channel group"):
        gated = wgates.gate(model, torch.randn(shape))
    assert {g.name for g in gated.groups} == {"c1"}
    # the same net with an ungrouped conv there is pruned everywhere, exactly
    plain = warm(ConcatResidualNet(grouped=1), shape)
    gated = wgates.gate(plain, torch.randn(shape), strict=True)
    assert {g.name for g in gated.groups} == {"a.0", "b.0", "c1"}


class ConcatInResidualNet(nn.Module):
    """x + cat(a(x), b(x)): the stem, a and b are one group, but a writes only channels 0-1 of
    it; a mask dropping both would leave a conv with no output channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.a = nn.Conv2d(6, 2, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.mid = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(self.mid(x)).mean((2, 3)))


def test_concat_inside_residual_is_left_dense(warm):
    shape = (2, 3, 8, 8)
    torch.manual_seed(0)
    model = warm(ConcatInResidualNet(), shape)
    with pytest.raises(WgatesError, match="stem.0.*a writes only 2 of its 6 coupled channels"):
        wgates.gate(model, torch.randn(shape), strict=True)
    with pytest.warns(UserWarning, match="leaving 1 channel group"):
        gated = wgates.gate(model, torch.randn(shape))
    assert {g.name for g in gated.groups} == {"mid"}
