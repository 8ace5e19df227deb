"""timm models: `timm:<name>` specs build untrained (no download), and gating + extraction is
exact on one small model of each family; what cannot be pruned exactly is left dense with a
warning naming the layer (never extracted wrongly)."""

from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch

import wgates
from test_extract import check_exact
from wgates.errors import WgatesError
from wgates.models import check_spec, create_model, default_input_shape

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 64, 64)
SPLIT = "splits the channels of {} with torch.split/chunk"
NORM = "{} normalizes over its channels"

MODELS = {  # spec -> (options, what must be left dense: warning patterns)
    "timm:resnet10t": ({}, []),
    "timm:efficientnet_b0": ({}, []),
    "timm:mobilenetv3_small_050": ({}, []),
    "timm:regnetx_002": ({}, []),
    # ConvNeXt normalizes its residual stream with LayerNorm: only the MLPs can be pruned
    "timm:convnext_atto": ({}, [NORM.format(r"stem\.1 \(LayerNorm2d\)")]),
    # the same with Linear MLPs on channels-last maps (ConvNeXt-T and larger)
    "timm:convnext_atto+linear": (
        {"conv_mlp": False}, [NORM.format(r"stages\.1\.blocks\.0\.norm \(LayerNorm\)")]),
    # CSP stages split their expanded channels in two with sizes fixed in the code
    "timm:cs3darknet_s": ({}, [SPLIT.format(r"stages\.0\.conv_exp\.bn")]),
    "timm:cspresnet50": ({}, [SPLIT.format(r"stages\.3\.conv_exp\.bn")]),
}


def randomize_affine(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random 1-D parameters (norm scales and shifts, biases, ConvNeXt's layer scale, which
    starts at 1e-6 and would hide the blocks): an exactness test must not see identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                centre = 1.0 if name.endswith(("weight", "gamma")) else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + centre)
    return model


def build(key: str) -> torch.nn.Module:
    options, _ = MODELS[key]
    torch.manual_seed(0)
    return randomize_affine(create_model(key.partition("+")[0], **options))


@pytest.mark.parametrize("key", list(MODELS))
def test_timm_model_is_exact(key, warm, make_masks):
    model = build(key)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = warm(model, SHAPE)
    model.eval()
    # verify=False: exactness must come from the structure alone, not from the random-mask
    # check that would otherwise drop a wrongly coupled group
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = wgates.gate(model, torch.randn(SHAPE), verify=False)
    said = " | ".join(str(w.message) for w in caught if "wgates:" in str(w.message))
    for pattern in MODELS[key][1]:
        assert re.search(pattern, said), said
    if not MODELS[key][1]:
        assert not said
    for seed in range(2):
        check_exact(model, gated, make_masks(gated, seed), SHAPE, seed)


def test_split_groups_are_refused_and_the_rest_pruned():
    """CSP: the residual stream read through `x.split(n, dim=1)` is left dense (with the layer
    named); the layers inside the blocks and the transition convs stay prunable."""
    with pytest.warns(UserWarning, match=SPLIT.format(r"stages\.1\.conv_exp\.bn")):
        gated = wgates.gate(build("timm:cs3darknet_s"), torch.randn(SHAPE), verify=False)
    names = {g.name for g in gated.groups}
    assert "stages.1.conv_exp.conv" not in names
    assert {"stages.1.blocks.0.conv1.conv", "stages.1.conv_transition.conv"} <= names
    with pytest.warns(UserWarning, match=SPLIT.format(r"stages\.0\.conv_exp\.bn")):
        gated = wgates.gate(build("timm:cspresnet50"), torch.randn(SHAPE), verify=False)
    cspresnet = {g.name for g in gated.groups}
    # its second branch's transition conv is concatenated with a split chunk: mapped by offsets
    assert "stages.0.conv_transition_b.conv" in cspresnet


def test_save_load_round_trip(tmp_path, warm, make_masks):
    model = warm(build("timm:regnetx_002"), SHAPE)
    gated = wgates.gate(model, torch.randn(SHAPE), verify=False)
    gated.set_masks(make_masks(gated))
    small = gated.extract()
    wgates.save_pruned(small, tmp_path)
    loaded = wgates.load_pruned(create_model("timm:regnetx_002"), tmp_path).eval()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))


def test_timm_specs():
    check_spec("timm:resnet18")
    assert default_input_shape("timm:resnet18") == (3, 224, 224)
    model = create_model("timm:mobilenetv3_small_050", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(WgatesError, match="timm has no model 'no_such_net'"):
        check_spec("timm:no_such_net")
    with pytest.raises(WgatesError, match="cannot build timm:resnet18 with options"):
        create_model("timm:resnet18", no_such_option=1)
    with pytest.raises(WgatesError, match="weights file .* does not exist"):
        create_model("timm:resnet18", weights="resnet18.a1_in1k")


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(WgatesError, match=r"pip install 'wgates\[timm\]'"):
        create_model("timm:resnet18")
