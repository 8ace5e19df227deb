"""Model registry: every spec form builds, weights round-trip, bad input says what to do."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wgates.errors import WgatesError
from wgates.models import create_model, default_input_shape, list_models, register_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_registered_models_build_and_run(name):
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, *default_input_shape(name))
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_registry_contents():
    assert {"resnet20", "resnet32", "resnet56", "mobilenetv2_cifar", "small_cnn"} <= set(
        list_models()
    )
    assert default_input_shape("resnet20") == (3, 32, 32)
    assert default_input_shape("small_cnn") == (1, 32, 32)
    assert default_input_shape("torchvision:resnet18") == (3, 224, 224)


def test_resnet_param_counts_match_paper():
    assert n_params(create_model("resnet20")) == pytest.approx(0.27e6, rel=0.03)
    assert n_params(create_model("resnet56")) == pytest.approx(0.85e6, rel=0.03)


def test_resnet_uses_conv_shortcuts():
    """Option-B shortcuts: every stride-2 block projects with a 1x1 conv (traceable)."""
    model = create_model("resnet20")
    assert isinstance(model.layer2[0].shortcut[0], torch.nn.Conv2d)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)


def test_width_mult_shrinks_models():
    for name in ("small_cnn", "mobilenetv2_cifar"):
        full = n_params(create_model(name))
        half = n_params(create_model(name, width_mult=0.5))
        assert half < 0.45 * full


def test_torchvision_model():
    model = create_model("torchvision:resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_file_spec(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "class WithClasses(torch.nn.Module):\n"
        "    default_input_shape = (3, 16, 16)\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
        "class NoArgs(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 3)\n"
    )
    spec = f"{tmp_path / 'net.py'}:WithClasses"
    assert create_model(spec, num_classes=6).fc.out_features == 6
    assert default_input_shape(spec) == (3, 16, 16)
    assert create_model(f"{tmp_path / 'net.py'}:NoArgs").fc.out_features == 3
    with pytest.raises(WgatesError, match="no class 'Missing'.*NoArgs"):
        create_model(f"{tmp_path / 'net.py'}:Missing")
    with pytest.raises(WgatesError, match="does not exist"):
        create_model(f"{tmp_path / 'absent.py'}:Net")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(tmp_path, suffix):
    model = create_model("resnet20", num_classes=4)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    loaded = create_model("resnet20", num_classes=4, weights=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_weights_mismatch_names_file_and_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("resnet20", num_classes=4).state_dict(), path)
    with pytest.raises(WgatesError, match=r"w\.pt.*fc\.weight"):
        create_model("resnet20", num_classes=10, weights=str(path))
    with pytest.raises(WgatesError, match=r"w\.pt.*missing"):
        create_model("resnet32", num_classes=4, weights=str(path))


def test_bad_weights_files(tmp_path):
    with pytest.raises(WgatesError, match="does not exist"):
        create_model("resnet20", weights=str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(WgatesError, match="junk.safetensors"):
        create_model("resnet20", weights=str(junk))


def test_bad_specs():
    with pytest.raises(WgatesError, match="resnet20"):  # lists the registered names
        create_model("resnet21")
    with pytest.raises(WgatesError, match="torchvision has no model"):
        create_model("torchvision:not_a_net")
    with pytest.raises(WgatesError, match="options"):
        create_model("resnet20", bogus=1)
    with pytest.raises(WgatesError):
        default_input_shape("nonsense")


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        register_model("resnet20")(lambda num_classes=10: torch.nn.Identity())
