"""From masks to a physically smaller plain model, and back from disk without pickle.

Torch-Pruning removes the channels (it knows every coupled parameter: BN statistics, the
consumers' input channels, flatten -> linear index expansion). We check the result: the
extracted model must compute what the gated model computes under the same masks.
The pruning is described by `PruningPlan` (kept channel indices per group + the example
input shapes + the residual blocks dropped), which is all `load_pruned` needs to rebuild the
architecture from a fresh instance of the original model before loading safetensors weights.

A group that keeps no channel drops its block (`wgates.depth`): Torch-Pruning cannot take a
conv to zero channels, so the group keeps one, its consumers' weights for it are zeroed (the
branch then reads zeros, as in the gated model), and the block is replaced by the `Skip` its
output fits.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wgates.depth import Skip, capture, skip_form
from wgates.errors import WgatesError
from wgates.groups import build_graph

PLAN_ATTR = "wgates_plan"
TOLERANCE = 1e-4


@dataclass
class PruningPlan:
    """Kept channel indices per group, with what is needed to re-trace the original model."""

    kept: dict[str, list[int]]
    sizes: dict[str, int]
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    # group -> {"block": the residual block its removal drops, "consumers": the layers that
    # read the group}; its `kept` is empty
    dropped: dict[str, dict] = field(default_factory=dict)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
            for shape, dtype in zip(self.input_shapes, self.input_dtypes)
        )


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the channels `plan` does not keep from `model`, in place."""
    inputs = plan.example_inputs()
    graph = build_graph(model, inputs)
    for name, kept in plan.kept.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise WgatesError(
                f"the pruning plan names layer {name!r}, which this model does not have: "
                "pass a fresh instance of the architecture the pruned model was made from"
            ) from None
        size = plan.sizes[name]
        if getattr(module, "out_channels", getattr(module, "out_features", None)) != size:
            raise WgatesError(
                f"layer {name!r} has a different width than when it was pruned ({size}): "
                "pass a fresh, unpruned instance of the original architecture"
            )
        keep = set(kept) or ({0} if name in plan.dropped else set())
        pruned = [c for c in range(size) if c not in keep]
        if pruned:
            pruner = graph.get_pruner_of_module(module)
            graph.get_pruning_group(module, pruner.prune_out_channels, pruned).prune()
    for drop in plan.dropped.values():
        _drop_block(model, drop["block"], drop["consumers"], inputs)
    setattr(model, PLAN_ATTR, plan)
    return model


def _drop_block(model: nn.Module, block: str, consumers: list[str], inputs: tuple) -> None:
    """Replace `block` of the pruned `model` by its `Skip`, in place: the one channel left of
    the dropped group is zeroed at its consumers' inputs, so the block computes act(x + c)."""
    with torch.no_grad():
        for name in consumers:
            model.get_submodule(name).weight[:, 0] = 0
    mode = model.training
    model.eval()
    try:
        seen = capture(model, block, lambda: model(*inputs))
        module = model.get_submodule(block)
        form = None if seen is None else skip_form(_float64(module), seen[0])
    finally:
        model.train(mode)
    if form is None:
        raise WgatesError(f"block {block!r} does not reduce to its shortcut once its group is "
                          "pruned whole: was the model changed since it was gated?")
    skip = Skip(seen[1].shape[1], form[0]).to(seen[1].device)
    skip.constant.copy_(form[1])
    parent, _, child = block.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, skip)


def _float64(module: nn.Module):
    """`module` as a function computed in float64 (on a copy)."""
    clone = copy.deepcopy(module).double().eval()
    return lambda x: clone(x.double())


def extract(gated, verify: bool = True) -> nn.Module:
    """The plain, smaller model for `gated`'s current masks (see `GatedModel.extract`)."""
    masks = gated.masks()
    plan = PruningPlan(
        kept={n: m.nonzero().flatten().tolist() for n, m in masks.items()},
        sizes={g.name: g.size for g in gated.channel_groups},
        input_shapes=[list(x.shape) for x in gated.example_inputs],
        input_dtypes=[str(x.dtype) for x in gated.example_inputs],
        dropped={g.name: {"block": gated.droppable[i],
                          "consumers": sorted({p.module for p in g.consumers})}
                 for i, g in enumerate(gated.channel_groups)
                 if i in gated.droppable and not masks[g.name].any()},
    )
    small = apply_plan(gated.plain_copy(), plan)
    if verify:
        error = max_difference(gated, small, gated.example_inputs)
        if error > TOLERANCE:
            raise WgatesError(
                f"the extracted model differs from the gated one by {error:.3g} (> {TOLERANCE}): "
                "an architecture feature was not handled; run wgates.gate(..., verify=True) to "
                "find the group, and pass its layers in ignore=[...]"
            )
    return small


def max_difference(a: nn.Module, b: nn.Module, inputs: tuple) -> float:
    """Largest |a(x) - b(x)| over all outputs, both in eval mode, on `inputs` and noise,
    divided by max(1, largest |a(x)|): float32 summation order differs between the two
    models, so large logits of a trained model differ in absolute terms by more than 1e-4."""
    modes = a.training, b.training
    a.eval(), b.eval()
    device = next(b.parameters()).device
    try:
        with torch.no_grad():
            worst = 0.0
            for trial in (inputs, tuple(torch.randn_like(x) if x.is_floating_point() else x
                                        for x in inputs)):
                trial = tuple(x.to(device) for x in trial)
                for u, v in zip(_flat_outputs(a(*trial)), _flat_outputs(b(*trial))):
                    scale = max(1.0, u.float().abs().max().item())
                    worst = max(worst, (u.float() - v.float()).abs().max().item() / scale)
            return worst
    finally:
        a.train(modes[0]), b.train(modes[1])


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat_outputs(o)]


def verify_groups(gated, seed: int = 0) -> list[str]:
    """Names of the groups that do not extract exactly under random masks (empty: all fine)."""
    gen = torch.Generator().manual_seed(seed)

    def error(indices) -> float:
        masks = {}
        for i in indices:
            g = gated.channel_groups[i]
            keep = torch.rand(g.n_units, generator=gen) < 0.5
            keep[torch.randperm(g.n_units, generator=gen)[: gated._min_units(i)]] = True
            masks[g.name] = keep[gated._units(i).cpu()]
        gated.clear_masks()
        gated.set_masks(masks)
        try:
            return max_difference(gated, extract(gated, verify=False), gated.example_inputs)
        except Exception:  # Torch-Pruning failing on a group is the same verdict: not exact
            return float("inf")
        finally:
            gated.clear_masks()

    # known from the structure (a grouped conv tying channels across groups, ...): only some
    # masks fail, so a random draw could miss them
    unsafe = [g.name for g in gated.channel_groups if g.unsafe]
    every = [i for i, g in enumerate(gated.channel_groups) if not g.unsafe]
    if not every or error(every) <= TOLERANCE:
        return unsafe
    return unsafe + [gated.channel_groups[i].name for i in every if error([i]) > TOLERANCE]


def save_pruned(model: nn.Module, path: str | Path) -> Path:
    """Write `path` (a directory): model.safetensors + pruning.json. No pickle anywhere."""
    plan: PruningPlan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise WgatesError(
            "save_pruned needs a model returned by GatedModel.extract() or load_pruned(); "
            "for a dense model use safetensors.torch.save_file(model.state_dict(), ...)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / "pruning.json").write_text(json.dumps(asdict(plan), indent=1))
    return path


def load_pruned(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Re-apply the saved pruning to a fresh `base_model` (in place) and load its weights."""
    path = Path(path)
    plan_file, weights = path / "pruning.json", path / "model.safetensors"
    for f in (plan_file, weights):
        if not f.is_file():
            raise WgatesError(f"{f} not found: expected a directory written by save_pruned")
    plan = PruningPlan(**json.loads(plan_file.read_text()))
    model = apply_plan(base_model, plan)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise WgatesError(
            f"{weights} does not match the pruned architecture (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}): was base_model the same architecture?"
        )
    return model
