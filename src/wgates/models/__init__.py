"""Model registry and `create_model`: one string names any model the pipeline can prune.

A spec is a registered name (`resnet20`), a model of a library (`torchvision:resnet18`,
`timm:convnext_atto`) or a class in a user's file (`path/to/net.py:Net`), so the CLI can take
models as plain strings.
"""

from __future__ import annotations

import importlib.util
import inspect
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wgates.errors import WgatesError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: dict[str, tuple[int, ...]] = {}


@dataclass(frozen=True)
class _Library:
    """A model library behind `<prefix>:<name>` specs, imported only when a spec names it."""

    has: Callable[[str], bool]
    build: Callable[[str, int, str | None, dict], nn.Module]  # name, num_classes, weights, opts
    input_shape: Callable[[str], tuple[int, ...]]
    missing: str  # the refusal of a name the library does not have
    named_weights: bool = False  # `weights` may name the library's own (downloaded) weights


_LIBRARIES: dict[str, _Library] = {}

# torchvision classification models that were trained at a size other than 224.
_TORCHVISION_SIZES = {"inception_v3": 299}


def _torchvision_has(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def _torchvision_build(name: str, num_classes: int, weights: str | None,
                       kwargs: dict) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(
            name, weights=weights, num_classes=num_classes, **kwargs
        )
    except (ValueError, TypeError, KeyError) as err:
        raise WgatesError(
            f"cannot build torchvision:{name} ({err}): check weights and num_classes"
        ) from err


def _timm():
    """timm is an optional extra: say how to get it instead of an ImportError."""
    try:
        import timm
    except ImportError:
        raise WgatesError(
            "'timm:' model specs need timm, which is not installed: pip install 'wgates[timm]'"
        ) from None
    return timm


def _timm_build(name: str, num_classes: int, weights: str | None, kwargs: dict) -> nn.Module:
    # pretrained=False: trained weights come from a file (`weights`), never from a download
    try:
        return _timm().create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise WgatesError(
            f"cannot build timm:{name} with options {kwargs} ({err}): drop or fix them"
        ) from err


def _timm_input_shape(name: str) -> tuple[int, ...]:
    cfg = _timm().models.get_pretrained_cfg(name)
    return tuple(cfg.input_size) if cfg is not None else (3, 224, 224)


_LIBRARIES["torchvision"] = _Library(
    has=_torchvision_has,
    build=_torchvision_build,
    input_shape=lambda name: (3, *[_TORCHVISION_SIZES.get(name, 224)] * 2),
    missing="torchvision has no model {name!r}: see torchvision.models.list_models()",
    named_weights=True,
)
_LIBRARIES["timm"] = _Library(
    has=lambda name: _timm().is_model(name),
    build=_timm_build,
    input_shape=_timm_input_shape,
    missing="timm has no model {name!r}: see timm.list_models()",
)


def _library(spec: str) -> tuple[_Library, str] | None:
    """(library, model name) for a `<prefix>:<name>` spec, checked to exist; None otherwise."""
    prefix, sep, name = spec.partition(":")
    library = _LIBRARIES.get(prefix) if sep else None
    if library is None:
        return None
    if not library.has(name):
        raise WgatesError(library.missing.format(name=name))
    return library, name


def register_model(
    name: str, input_shape: tuple[int, ...] = (3, 32, 32)
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a constructor `(num_classes: int = 10, **kwargs) -> nn.Module` under `name`.

    `input_shape` (C, H, W) is what latency is measured on when the user gives no shape.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _INPUT_SHAPES[name] = tuple(input_shape)
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _split_file_spec(spec: str) -> tuple[Path, str] | None:
    """`path/to/file.py:ClassName` -> (path, class name); None if `spec` is not of that form."""
    path, sep, cls = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        return None
    if not cls:
        raise WgatesError(f"model spec {spec!r} names no class: use 'path/to/file.py:ClassName'")
    return Path(path).expanduser(), cls


USER_MODULE_PREFIX = "wgates_user_model_"  # the modules `path/to/file.py:Class` specs import


def import_file(path: str | Path, module_name: str):
    """Import the Python file `path` as the module `module_name`, registered in sys.modules
    (dataclasses and pickling look modules up there; so does the measurement process, which
    imports the same files under the same names, `wgates.latency.worker`)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise WgatesError(f"cannot import {path} as Python: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise WgatesError(
            f"importing {path} failed ({type(err).__name__}: {err}): fix the file"
        ) from err
    return module


def _load_class(path: Path, cls_name: str) -> type:
    """Import the file at `path` as a fresh module and return its attribute `cls_name`."""
    if not path.is_file():
        raise WgatesError(f"model file {path} does not exist: check the path in the model spec")
    module = import_file(path, f"{USER_MODULE_PREFIX}{abs(hash(str(path.resolve())))}")
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = ", ".join(sorted(n for n, v in vars(module).items() if isinstance(v, type)))
        raise WgatesError(f"{path} has no class {cls_name!r}; classes there: {found or 'none'}")
    return cls


def _accepts_num_classes(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return "num_classes" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def _unknown_model(spec: str) -> WgatesError:
    libraries = ", ".join(f"'{prefix}:<name>'" for prefix in _LIBRARIES)
    return WgatesError(
        f"unknown model {spec!r}: use one of {', '.join(list_models())}, "
        f"{libraries} or 'path/to/file.py:ClassName'"
    )


def _build(spec: str, num_classes: int, lib_weights: str | None, kwargs: dict) -> nn.Module:
    library = _library(spec)
    if library is not None:
        lib, name = library
        return lib.build(name, num_classes, lib_weights, kwargs)
    file_spec = _split_file_spec(spec)
    if file_spec is not None:
        cls = _load_class(*file_spec)
        args = {"num_classes": num_classes} if _accepts_num_classes(cls) else {}
        fn: Callable[..., nn.Module] = cls
    elif spec in _REGISTRY:
        args = {"num_classes": num_classes}
        fn = _REGISTRY[spec]
    else:
        raise _unknown_model(spec)
    try:
        model = fn(**args, **kwargs)
    except TypeError as err:
        raise WgatesError(
            f"cannot build {spec} with options {kwargs} ({err}): drop or fix them"
        ) from err
    if not isinstance(model, nn.Module):
        raise WgatesError(f"{spec} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pt/.pth checkpoint (raw or under state_dict/model)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WgatesError(
            f"{path} holds Python objects, not plain tensors: wgates will not load it "
            "(unpickling can run code); convert it to .safetensors from a source you trust"
        ) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WgatesError(
            f"cannot read weights {path} ({type(err).__name__}: {first}): "
            "give a .safetensors file or a .pt/.pth state_dict"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WgatesError(
            f"weights {path} hold no state_dict: save model.state_dict() "
            "(or a dict with it under 'state_dict' or 'model')"
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """Strict load; a mismatch names the file and the first offending keys."""
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", resized)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise WgatesError(
            f"weights {path} do not fit model {spec!r}: {'; '.join(problems)}. "
            "Check the model spec, num_classes and width options match the checkpoint"
        )
    model.load_state_dict(state, strict=True)


def create_model(
    spec: str, num_classes: int = 10, weights: str | None = None, **kwargs
) -> nn.Module:
    """Build the model named by `spec` and optionally load `weights` (a file path).

    For `torchvision:` specs, `weights` may also be a torchvision weights name
    (e.g. `ResNet18_Weights.IMAGENET1K_V1`), which torchvision may download. `timm:` models
    are built untrained (no download); give trained weights as a file.
    """
    lib_weights = None
    weight_path = None
    if weights is not None:
        weight_path = Path(weights).expanduser()
        looks_like_file = weight_path.suffix in (".safetensors", ".pt", ".pth")
        prefix, sep, _ = spec.partition(":")
        named = bool(sep) and getattr(_LIBRARIES.get(prefix), "named_weights", False)
        if named and not looks_like_file and not weight_path.exists():
            lib_weights, weight_path = weights, None
        elif not weight_path.is_file():
            raise WgatesError(f"weights file {weight_path} does not exist: check the path")
    model = _build(spec, num_classes, lib_weights, kwargs)
    if weight_path is not None:
        _load_weights(model, weight_path, spec)
    return model


def check_spec(spec: str) -> None:
    """Refuse a model spec that names no model, without building it: called before any data
    is loaded, so a typo is reported at once, not after minutes of decoding."""
    if spec in _REGISTRY or _library(spec) is not None:
        return
    file_spec = _split_file_spec(spec)
    if file_spec is None:
        raise _unknown_model(spec)
    _load_class(*file_spec)


def _shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution or linear layer, in definition order (the one that reads the
    input, for the plain feed-forward models this is about)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            return name, module
    return None


def check_forward(model: nn.Module, example_inputs, spec: str | None = None) -> None:
    """Run `model` once on `example_inputs` (eval mode, no gradients; its mode is restored).
    If the model's own code fails (the data's images do not fit it: 1-channel digits into a
    3-channel first conv), refuse in one line naming the shape given and what the model
    expects, before any training or measuring."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
        example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as err:  # noqa: BLE001 - arbitrary user code; reported in one line
        given = ", ".join(_shape_text(x.shape) for x in inputs)
        first = (str(err).strip().splitlines() or [""])[0]
        expects = []
        layer = _first_layer(model)
        if layer is not None and inputs and inputs[0].dim() >= 2:
            name, module = layer
            wanted = getattr(module, "in_channels", getattr(module, "in_features", None))
            kind = "channels" if hasattr(module, "in_channels") else "features"
            if wanted is not None and (kind == "features" or wanted != inputs[0].shape[1]):
                expects.append(f"its first layer {name} ({type(module).__name__}) takes "
                               f"{wanted} input {kind}")
        meant = _meant_shape(model, spec)
        if meant is not None:
            expects.append(f"it is meant for {_shape_text(meant)} inputs")
        what = f"; {' and '.join(expects)}" if expects else ""
        label = spec or type(model).__name__
        raise WgatesError(
            f"model {label} fails on input of shape {given} ({type(err).__name__}: {first})"
            f"{what}: give data of the shape the model expects, or a model made for "
            f"{_shape_text(inputs[0].shape[1:]) if inputs else 'this'} inputs"
        ) from None
    finally:
        for module, training in modes:
            module.training = training


def _meant_shape(model: nn.Module, spec: str | None) -> tuple[int, ...] | None:
    """(C, H, W) the model says it is for: its registration, or its class attribute."""
    if spec in _INPUT_SHAPES:
        return _INPUT_SHAPES[spec]
    meant = getattr(type(model), "default_input_shape", None)
    return tuple(meant) if isinstance(meant, tuple | list) else None


def default_input_shape(spec: str) -> tuple[int, ...]:
    """(C, H, W) a model is meant for: recorded at registration, 224 (or 299) for torchvision,
    timm's pretrained config for timm, or the `default_input_shape` class attribute for file
    specs (else (3, 224, 224))."""
    if spec in _INPUT_SHAPES:
        return _INPUT_SHAPES[spec]
    library = _library(spec)
    if library is not None:
        lib, name = library
        return lib.input_shape(name)
    file_spec = _split_file_spec(spec)
    if file_spec is None:
        raise _unknown_model(spec)
    return tuple(getattr(_load_class(*file_spec), "default_input_shape", (3, 224, 224)))


# Importing the families registers them; kept last since they import register_model.
from wgates.models import cifar_mobilenetv2, cifar_resnet, small_cnn  # noqa: E402, F401
