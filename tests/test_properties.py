"""Property test: randomly generated small CNNs gate and extract exactly.

Hypothesis draws an architecture (a stem conv, then a few blocks: plain / grouped / depthwise
convs, residual adds, concatenations, squeeze-excitation, pooling; a global-pool or
flatten -> linear head), gates it with `wgates.gate(verify=True)`, draws a random width per
group and random scores (which channels go), extracts, and checks that
- the extracted model computes what the gated model computes under those masks (eval mode,
  random BatchNorm statistics, random input);
- every conv / linear in it has exactly the widths the masks ask for, and it has fewer
  parameters than the dense model when anything was pruned;
- the saved model, loaded into a fresh instance of the architecture, computes the same;
- a group that `gate` leaves dense (or a model it refuses) is named with a reason that holds
  for the model (a grouped conv tying channels across groups, a concatenation inside a
  residual add, ...): nothing is skipped silently, and nothing inexact gets through.
Examples are derandomized (the same on every run); `settings(max_examples=...)` below sets
how many. When one fails, Hypothesis prints the shrunk spec of the failing architecture.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import wgates
from wgates.errors import WgatesError

pytestmark = pytest.mark.usefixtures("one_thread")

settings.register_profile(
    "wgates-properties",
    derandomize=True,  # the same examples on every run and machine: CI is reproducible
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("wgates-properties")
MAX_WIDTH = 16
SIDE = 16
CLASSES = 3
TOL = 1e-4

# -- the architecture -------------------------------------------------------------------
# A model is described by a list of plain tuples (printed by Hypothesis when an example fails)
# and built from it by `Net`.


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hswish": nn.Hardswish(),
            "none": nn.Identity()}[name]


def conv_unit(cin: int, cout: int, k: int, groups: int, bn: bool, act: str) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(_act(act))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + body(x) (identity shortcut: couples body's last producer with x's group), or
    body(x) + shortcut(x) (projection: couples the two new producers)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: str):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, _act(act)

    def forward(self, x):
        return self.act(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))


class Concat(nn.Module):
    """cat(x or maxpool(x) (DenseNet, GoogLeNet), branch_1(x), ...) on the channel dim."""

    def __init__(self, branches: list[nn.Module], identity: str):
        super().__init__()
        self.branches, self.identity = nn.ModuleList(branches), identity

    def forward(self, x):
        first = {"none": [], "x": [x],
                 "pool": [nn.functional.max_pool2d(x, 3, stride=1, padding=1)]}[self.identity]
        return torch.cat(first + [b(x) for b in self.branches], 1)


class CatPair(nn.Module):
    """cat(a(x), b(x)) as one body: a residual over a concatenation."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class SqueezeExcite(nn.Module):
    """global pool -> reduce -> act -> expand -> sigmoid -> scale the features."""

    def __init__(self, c: int, mid: int, linear: bool, act: str, hard: bool):
        super().__init__()
        self.linear = linear
        if linear:
            self.reduce, self.expand = nn.Linear(c, mid), nn.Linear(mid, c)
        else:
            self.reduce, self.expand = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)
        self.act = _act(act)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=not self.linear)
        s = self.gate(self.expand(self.act(self.reduce(s))))
        return x * (s[:, :, None, None] if self.linear else s)


class Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "max":
            return nn.functional.max_pool2d(x, 2)
        if self.kind == "max3":
            return nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        return nn.functional.avg_pool2d(x, 2)


class Net(nn.Module):
    def __init__(self, spec: list[tuple]):
        super().__init__()
        self.spec = spec
        blocks = []
        for op, *args in spec[:-1]:
            blocks.append(_BUILD[op](*args))
        self.blocks = nn.Sequential(*blocks)
        _, c, side, hidden = spec[-1]
        self.side = side
        cin = c * side * side
        self.head = (nn.Linear(cin, CLASSES) if not hidden else
                     nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.blocks(x), self.side)
        return self.head(x.flatten(1))


def _build_conv(cin, cout, k, groups, bn, act):
    return conv_unit(cin, cout, k, groups, bn, act)


def _build_res(c, mid, g1, g2, bn, act):
    body = nn.Sequential(conv_unit(c, mid, 3, g1, bn, act), conv_unit(mid, c, 3, g2, bn, "none"))
    return Residual(body, None, act)


def _build_res_dw(c, bn, act):  # MobileNet-style: depthwise then pointwise, identity shortcut
    body = nn.Sequential(conv_unit(c, c, 3, c, bn, act), conv_unit(c, c, 1, 1, bn, "none"))
    return Residual(body, None, act)


def _build_res_proj(cin, cout, g, bn, act):
    return Residual(conv_unit(cin, cout, 3, g, bn, "none"), conv_unit(cin, cout, 1, 1, bn, "none"),
                    act)


def _build_res_cat(c, wa, bn, act):
    body = CatPair(conv_unit(c, wa, 3, 1, bn, "none"), conv_unit(c, c - wa, 1, 1, bn, "none"))
    return Residual(body, None, act)


def _build_res_se(c, mid, se_mid, linear, bn, act):  # MobileNetV3 / EfficientNet block
    body = nn.Sequential(conv_unit(c, mid, 1, 1, bn, act), conv_unit(mid, mid, 3, mid, bn, act),
                         SqueezeExcite(mid, se_mid, linear, "relu", True),
                         conv_unit(mid, c, 1, 1, bn, "none"))
    return Residual(body, None, "none")


def _build_bn(c, act):  # BatchNorm -> act on its own: DenseNet's BN-ReLU after a concat
    return nn.Sequential(nn.BatchNorm2d(c), _act(act))


def _build_cat(cin, widths, identity, bn, act):
    return Concat([conv_unit(cin, w, 3, 1, bn, act) for w in widths], identity)


_BUILD = {
    "conv": _build_conv,
    "res": _build_res,
    "res_dw": _build_res_dw,
    "res_proj": _build_res_proj,
    "res_cat": _build_res_cat,
    "cat": _build_cat,
    "res_se": _build_res_se,
    "bn": _build_bn,
    "se": lambda c, mid, linear, act, hard: SqueezeExcite(c, mid, linear, act, hard),
    "pool": Pool,
}


def _divisors(*ns: int) -> list[int]:
    return [d for d in range(1, min(ns) + 1) if all(n % d == 0 for n in ns)]


@st.composite
def architectures(draw) -> list[tuple]:
    bn, act = st.booleans(), st.sampled_from(["relu", "relu6", "hswish", "none"])
    width = st.integers(2, MAX_WIDTH)
    c, side = draw(width), SIDE
    spec = [("conv", 3, c, 3, 1, True, "relu")]  # the stem
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["conv", "grouped", "dw", "res", "res", "res_dw", "res_proj",
                                   "res_cat", "res_se", "cat", "cat", "se", "bn", "pool"]))
        if op in ("conv", "grouped"):
            out = draw(width)
            groups = draw(st.sampled_from(_divisors(c, out))) if op == "grouped" else 1
            spec.append(("conv", c, out, draw(st.sampled_from([1, 3])), groups, draw(bn),
                         draw(act)))
            c = out
        elif op == "dw":  # depthwise, with a channel multiplier of 1 or 2
            out = c * draw(st.sampled_from([1, 2] if 2 * c <= MAX_WIDTH else [1]))
            spec.append(("conv", c, out, 3, c, draw(bn), draw(act)))
            c = out
        elif op == "res":
            mid = draw(width)
            spec.append(("res", c, mid, draw(st.sampled_from(_divisors(c, mid))),
                         draw(st.sampled_from(_divisors(c, mid))), draw(bn), draw(act)))
        elif op == "res_dw":
            spec.append(("res_dw", c, draw(bn), draw(act)))
        elif op == "res_proj":
            out = draw(width)
            spec.append(("res_proj", c, out, draw(st.sampled_from(_divisors(c, out))), draw(bn),
                         draw(act)))
            c = out
        elif op == "res_cat" and c >= 4:
            spec.append(("res_cat", c, draw(st.integers(2, c - 2)), draw(bn), draw(act)))
        elif op == "cat":
            identity = draw(st.sampled_from(["none", "x", "pool"]))
            n = draw(st.integers(2 if identity == "none" else 1, 3))
            widths = draw(st.lists(st.integers(2, 8), min_size=n, max_size=n))
            spec.append(("cat", c, tuple(widths), identity, draw(bn), draw(act)))
            c = c * (identity != "none") + sum(widths)
        elif op == "res_se":
            mid = draw(width)
            spec.append(("res_se", c, mid, draw(st.integers(1, mid)), draw(st.booleans()),
                         draw(bn), draw(act)))
        elif op == "bn":
            spec.append(("bn", c, draw(act)))
        elif op == "se":
            spec.append(("se", c, draw(st.integers(1, c)), draw(st.booleans()), draw(act),
                         draw(st.booleans())))
        elif op == "pool" and side >= 4:
            spec.append(("pool", draw(st.sampled_from(["max", "max3", "avg"]))))
            side //= 2
    head_side = draw(st.sampled_from([1, 1, 2]))  # 2: flatten -> linear index expansion
    spec.append(("head", c, head_side, draw(st.sampled_from([0, 0, 6]))))
    return spec


# -- the checks -------------------------------------------------------------------------


@dataclass
class Widths:
    out: int
    inp: int


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (warming up on noise, as
    conftest.warm_batchnorm does, leaves zero statistics behind dead ReLUs): a pruned channel
    then leaves a BatchNorm non-zero, which the extracted model must reproduce."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.weight.copy_(torch.randn(n, generator=gen))
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


def _layer_widths(model: nn.Module) -> dict[str, Widths]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = Widths(m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            out[name] = Widths(m.out_features, m.in_features)
    return out


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels > 1


def expected_widths(gated: wgates.GatedModel, masks: dict[str, torch.Tensor]) -> dict[str, Widths]:
    """Each conv / linear loses, on its output (input), the positions whose group channel the
    masks drop, over every group that produces (is read by) that layer."""
    widths = _layer_widths(gated.model)
    for g in gated.channel_groups:
        dropped = set((~masks[g.name]).nonzero().flatten().tolist())
        for places, attr in ((g.producers, "out"), (g.consumers, "inp")):
            for p in places:
                w, lost = widths[p.module], sum(r in dropped for r in p.root_idxs)
                setattr(w, attr, getattr(w, attr) - lost)
                if attr == "out" and _depthwise(gated.model.get_submodule(p.module)):
                    w.inp -= lost  # a depthwise conv loses its inputs with its outputs
    return widths


def _justified(model: Net, reason: str) -> bool:
    """Whether a reason wgates gives for leaving a group dense holds for this model."""
    if "writes only" in reason:  # a producer writing part of a group: a concat inside an add
        return any(isinstance(m, CatPair) for m in model.modules())
    if "ties channels across groups" in reason:  # a grouped conv on a concatenation
        name = reason.split("grouped conv ")[1].split(" ")[0]
        return model.get_submodule(name).groups > 1 and any(
            isinstance(m, (Concat, CatPair)) for m in model.modules())
    if "for a depthwise conv" in reason:  # several inputs, one output per conv-group
        name = reason.split("Torch-Pruning takes ")[1].split(" ")[0]
        conv = model.get_submodule(name)
        return 1 < conv.groups == conv.out_channels != conv.in_channels
    if "tie all its channels" in reason:  # the named grouped convs leave one tie class
        named = reason.split("grouped convolutions (")[1].split(")")[0].split(", ")
        return all(model.get_submodule(name).groups > 1 for name in named)
    return False


def check_refusal(model: Net, message: str) -> None:
    """A group left dense (a warning) or a model refused (WgatesError) is named, with a reason
    that holds for this model: verify's random trial finds nothing the structure did not."""
    if "no prunable channel group" in message:
        return
    if "unpruned because extraction would not be exact" in message:
        described = message.split("exact there: ")[1]
    elif "cannot be pruned exactly at: " in message:
        described = message.split("exactly at: ")[1].split(". Pass those")[0]
    else:  # a single group, left out by find_groups
        assert message.startswith("wgates: leaving ") and " unpruned: " in message, message
        described = "(: " + message.split(" unpruned: ")[1]
    for part in described.split("; "):
        assert ": " in part, f"no reason given for {part!r} in {message!r}"
        assert _justified(model, part.split(": ", 1)[1]), message


def _gate(model: Net, x: torch.Tensor, min_channels: int):
    """gate(verify=True); returns the gated model (None when refused) and its refusals."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gated = wgates.gate(model, x, min_channels=min_channels)
        except WgatesError as err:
            return None, [str(err)]
    return gated, [str(w.message) for w in caught if "wgates: leaving" in str(w.message)]


@settings(PROFILE, max_examples=300)
@given(spec=architectures(), data=st.data())
def test_generated_cnns_gate_and_extract_exactly(spec, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    model = randomize_batchnorm(Net(spec), seed).eval()
    x = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    min_channels = data.draw(st.sampled_from([1, 1, 2]), label="min_channels")
    for op in sorted({op for op, *_ in spec[1:-1]}):
        event(f"block {op}")
    gated, refusals = _gate(model, x, min_channels)
    for message in refusals:
        event("left dense: " + next((k for k in ("writes only", "across groups",
                                                 "for a depthwise conv", "tie all")
                                         if k in message), message[:60]))
    for message in refusals:
        check_refusal(model, message)
    if gated is None:
        return

    # random scores (which channels go) and a random width per group
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gated.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    widths = {g.name: data.draw(st.integers(g.min_channels, g.size), label=g.name)
              for g in gated.groups}
    masks = gated.masks_for_widths(widths)
    gated.set_masks(masks)
    small = gated.extract(verify=False)

    gated.eval(), small.eval()
    with torch.no_grad():
        trial = torch.randn(2, 3, SIDE, SIDE, generator=gen) * 1.5 + 0.2
        want, got = gated(trial), small(trial)
    assert got.shape == want.shape
    scale = max(1.0, want.abs().max().item())
    assert (want - got).abs().max().item() <= TOL * scale

    # the widths are the requested kept counts, layer by layer
    for g in gated.channel_groups:
        kept = int(masks[g.name].sum())
        if g.ties is None:
            assert kept == widths[g.name]
        else:  # a grouped conv ties channels: whole tie classes go, the count is rounded
            assert abs(kept - widths[g.name]) <= math.ceil(g.size / g.n_units)
        assert _layer_widths(small)[g.name].out == kept
    assert _layer_widths(small) == expected_widths(gated, masks)

    dense_params = sum(p.numel() for p in model.parameters())
    small_params = sum(p.numel() for p in small.parameters())
    assert small_params <= dense_params
    pruned = sum(int(m.sum()) < m.numel() for m in masks.values())
    if pruned:
        assert small_params < dense_params
    with torch.no_grad():
        changed = (want - model(trial)).abs().max().item() > 10 * TOL * scale
    event(f"groups pruned: {'none' if not pruned else 'all' if pruned == len(masks) else 'some'}"
          f"{', output changed' if changed else ''}")

    # saved, then loaded into a fresh instance: the same model
    with tempfile.TemporaryDirectory() as tmp:
        wgates.save_pruned(small, tmp)
        loaded = wgates.load_pruned(Net(spec), tmp).eval()
    with torch.no_grad():
        assert torch.equal(loaded(trial), got)
