"""The gated model: the user's network (copied, never modified) with one gate per channel group.

Gates act through hooks, in two places per group:
- at each *gate point* (a producer's BatchNorm output, or the producer's output when no
  BatchNorm follows it), as in the paper, so training sees the channel vanish where it is made;
- at the input of each *consumer* (every conv or linear that reads the channel). This second
  multiplication changes nothing when the channel is already zero, but it makes the gated
  network compute exactly what the extracted one does even where a non-zero-preserving op sits
  between producer and consumer (DenseNet's BN-ReLU-Conv after a concatenation).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from wgates.depth import capture, common_ancestors, fits, skip_form
from wgates.errors import WgatesError
from wgates.gates import binarize, make_gate, top_k
from wgates.groups import ChannelGroup, Ignore, as_input_tuple, find_groups, resolve_ignore


class GroupView:
    """What `GatedModel.groups` shows of one group: name, size, current mask, kept count."""

    def __init__(self, owner: GatedModel, index: int) -> None:
        self._owner, self.index = owner, index
        self.spec: ChannelGroup = owner.channel_groups[index]

    name = property(lambda self: self.spec.name)
    size = property(lambda self: self.spec.size)
    min_channels = property(lambda self: self.spec.min_channels)

    @property
    def mask(self) -> torch.Tensor:
        """Current keep-mask (bool), from the fixed mask or the gate's hard decision."""
        return self._owner.gate_values(self.index)[0].detach() > 0.5

    @property
    def kept(self) -> torch.Tensor:
        """Kept-channel count as a differentiable scalar (what the latency predictor reads)."""
        return self._owner.gate_values(self.index)[0].sum()

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, kept={int(self.mask.sum())})"


class GatedModel(nn.Module):
    """A copy of `model` with a gate per prunable channel group; see `wgates.gate`."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        ignore: Ignore = (),
        min_channels: int = 1,
        kind: str = "wgates",
        drop: Sequence[str] = (),
        channel_multiple: int = 1,
        channel_block: int | None = None,
    ) -> None:
        super().__init__()
        self.example_inputs = tuple(x.detach().clone() for x in as_input_tuple(example_inputs))
        ignored = resolve_ignore(model, ignore)
        self.model = copy.deepcopy(model)
        self.channel_groups = [
            g
            for g in find_groups(self.model, self.example_inputs, ignored, min_channels)
            if g.name not in drop
        ]
        if not self.channel_groups:
            raise WgatesError(
                f"{type(model).__name__} has no prunable channel group (every group is ignored, "
                "reaches the output, or is at min_channels already)"
            )
        self.kind = kind
        self.gates = nn.ModuleList(
            make_gate(kind, g.size, self._row_dim(g)) for g in self.channel_groups
        )
        self.groups = [GroupView(self, i) for i in range(len(self.channel_groups))]
        # group index -> the residual block pruning it whole drops (`enable_depth`)
        self.droppable: dict[int, str] = {}
        self._min_before: dict[int, int] = {}
        self._fixed: dict[int, torch.Tensor] = {}
        self._kept_units: dict[int, int] = {}
        self.gate_grad_hook: Callable[[int, torch.Tensor], None] | None = None
        self._flat: torch.Tensor | None = None
        self._tiers: list[list[int]] | None = None
        self._hook_ids: dict[str, list[int]] = {}
        self._install_hooks()
        # extract() delivers each group's width as a multiple of `channel_multiple` up to
        # `channel_block` channels, and of `channel_block` above (see `snapped`)
        self.channel_multiple = channel_multiple
        self.channel_block = max(channel_block or channel_multiple, channel_multiple)

    # -- gates ---------------------------------------------------------------------------
    def _row_dim(self, group: ChannelGroup) -> int:
        return sum(self.model.get_submodule(p.module).weight[0].numel() for p in group.producers)

    def _filter_rows(self, i: int) -> torch.Tensor:
        """One row per group channel: all producers' filters for it, each block RMS-scaled."""
        blocks = []
        for k, place in enumerate(self.channel_groups[i].producers):
            w = self.model.get_submodule(place.module).weight.flatten(1)
            order = getattr(self, f"_order_{i}_{k}")
            blocks.append(w[order] / (w.pow(2).mean().sqrt() + 1e-12))
        return torch.cat(blocks, dim=1)

    def scores(self, i: int) -> torch.Tensor:
        """Real-valued gate score per unit of group i (>0 means keep); a unit is a channel,
        or a tie class of channels that a grouped conv forces to be pruned together."""
        gate = self.gates[i]
        raw = gate(self._filter_rows(i)) if gate.needs_weights else gate()
        if self.channel_groups[i].ties is None:
            return raw
        n = self.channel_groups[i].n_units
        return raw.new_zeros(n).index_reduce(0, self._units(i), raw, "mean", include_self=False)

    def _units(self, i: int) -> torch.Tensor:
        return getattr(self, f"_units_{i}")

    def _min_units(self, i: int) -> int:
        g = self.channel_groups[i]
        return -(-g.min_channels * g.n_units // g.size)

    def gate_values(self, *indices: int) -> list[torch.Tensor]:
        """0/1 gate vectors per channel (differentiable through the straight-through estimator)."""
        out = []
        for i in indices or range(len(self.channel_groups)):
            if i in self._fixed:
                out.append(self._fixed[i])
            elif i in self._kept_units:
                out.append(top_k(self.scores(i), self._kept_units[i])[self._units(i)])
            else:
                activate = getattr(self.gates[i], "activate", binarize)
                out.append(activate(self.scores(i), self._min_units(i))[self._units(i)])
        return out

    def kept_counts(self) -> torch.Tensor:
        """Kept channels per group as one differentiable vector, in `groups` order."""
        return torch.stack([v.sum() for v in self.gate_values()])

    def sizes(self) -> torch.Tensor:
        return torch.tensor([g.size for g in self.channel_groups], dtype=torch.float32)

    def masks(self) -> dict[str, torch.Tensor]:
        return {g.name: v.detach() > 0.5 for g, v in zip(self.channel_groups, self.gate_values())}

    def widths(self) -> dict[str, int]:
        return {name: int(m.sum()) for name, m in self.masks().items()}

    def set_masks(self, masks: Mapping[str, torch.Tensor | Sequence[bool]]) -> None:
        """Fix the masks of the named groups (others follow their gates); validates each."""
        index = {g.name: i for i, g in enumerate(self.channel_groups)}
        fixed = {}
        for name, mask in masks.items():
            if name not in index:
                raise WgatesError(f"set_masks: no group named {name!r}; groups: {list(index)}")
            group = self.channel_groups[index[name]]
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or mask.shape != (group.size,):
                raise WgatesError(
                    f"set_masks: mask for {name!r} must be a bool tensor of shape "
                    f"({group.size},), got {mask.dtype} {tuple(mask.shape)}"
                )
            if int(mask.sum()) < group.min_channels:
                raise WgatesError(
                    f"set_masks: mask for {name!r} keeps {int(mask.sum())} channels, below "
                    f"min_channels={group.min_channels}"
                )
            units = self._units(index[name]).cpu()
            if not torch.equal(mask, mask[_first_of_unit(units)][units]):
                raise WgatesError(
                    f"set_masks: group {name!r} feeds a grouped conv, so channels at the same "
                    "offset in every conv-group must be kept or pruned together "
                    "(use GatedModel.masks_for_widths to build a valid mask)"
                )
            fixed[index[name]] = mask.float()
        device = next(self.model.parameters()).device
        self._fixed.update({i: m.to(device) for i, m in fixed.items()})

    def clear_masks(self) -> None:
        self._fixed.clear()

    def set_kept_units(self, kept: Sequence[int] | None) -> None:
        """Keep exactly `kept[i]` units of group i, the ones its gate ranks highest, chosen
        anew every forward (gradients still reach the gates); None: the gates decide the
        counts again. Fixed masks (`set_masks`) take precedence."""
        self._kept_units.clear()
        for i, k in enumerate(kept or ()):
            g = self.channel_groups[i]
            if not self._min_units(i) <= int(k) <= g.n_units:
                raise WgatesError(f"{g.name}: {k} units outside [{self._min_units(i)}, "
                                  f"{g.n_units}]")
            self._kept_units[i] = int(k)

    def masks_for_widths(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Masks keeping the `k` highest-scoring channels of each named group."""
        out = {}
        with torch.no_grad():
            for i, g in enumerate(self.channel_groups):
                if g.name not in widths:
                    continue
                k = int(widths[g.name])
                if not g.min_channels <= k <= g.size:
                    raise WgatesError(
                        f"width {k} for {g.name!r} outside [{g.min_channels}, {g.size}]"
                    )
                units = max(self._min_units(i), round(k * g.n_units / g.size))
                keep = torch.zeros(g.n_units, dtype=torch.bool)
                keep[self.scores(i).cpu().topk(units).indices] = True
                out[g.name] = keep[self._units(i).cpu()]
        return out

    # -- forward -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        values = self.gate_values()
        if self.gate_grad_hook is not None and torch.is_grad_enabled():
            for i, v in enumerate(values):  # dL/dg per channel, e.g. for TaylorImportance
                if v.requires_grad:
                    v.register_hook(partial(self.gate_grad_hook, i))
        self._flat = torch.cat([values[0].new_ones(1), *values])
        try:
            return self.model(*args, **kwargs)
        finally:
            self._flat = None

    def _install_hooks(self) -> None:
        """Gather indices into [1, gates of group 0, gates of group 1, ...] per hooked module."""
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        offset = 1
        for i, group in enumerate(self.channel_groups):
            units = torch.tensor(group.ties) if group.ties else torch.arange(group.size)
            self.register_buffer(f"_units_{i}", units, persistent=False)
            for k, place in enumerate(group.producers):
                order = torch.zeros(group.size, dtype=torch.long)
                order[list(place.root_idxs)] = torch.tensor(place.idxs)
                self.register_buffer(f"_order_{i}_{k}", order, persistent=False)
            for places, table, dim in (
                (group.gate_points, outputs, _out_channels),
                (group.consumers, inputs, _in_channels),
            ):
                for place in places:
                    module = self.model.get_submodule(place.module)
                    if place.module not in table:
                        table[place.module] = torch.zeros(dim(module), dtype=torch.long)
                    table[place.module][list(place.idxs)] = offset + torch.tensor(place.root_idxs)
            offset += group.size
        for kind, table in (("out", outputs), ("in", inputs)):
            for n, (name, idx) in enumerate(table.items()):
                buf = f"_gather_{kind}_{n}"
                self.register_buffer(buf, idx, persistent=False)
                module = self.model.get_submodule(name)
                # a Linear's features are its input's last dim (timm's ConvNeXt runs its MLP
                # on channels-last maps); a conv's or BatchNorm's channels are dim 1
                dim = -1 if isinstance(module, nn.Linear) else 1
                if kind == "out":
                    handle = module.register_forward_hook(self._out_hook(buf, dim))
                else:
                    handle = module.register_forward_pre_hook(self._in_hook(buf, dim))
                self._hook_ids.setdefault(name, []).append(handle.id)

    def _scale(self, x: torch.Tensor, buf: str, dim: int) -> torch.Tensor:
        """x with its channels along `dim` multiplied by their gates."""
        mask = self._flat[getattr(self, buf)].to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * mask.view(shape)

    def _out_hook(self, buf: str, dim: int):
        def hook(module, args, output):
            return None if self._flat is None else self._scale(output, buf, dim)

        return hook

    def _in_hook(self, buf: str, dim: int):
        def hook(module, args):
            if self._flat is None:
                return None
            return (self._scale(args[0], buf, dim), *args[1:])

        return hook

    def resolution_tiers(self) -> list[list[int]]:
        """Indices of the groups whose producers' outputs share one spatial size (two or more
        per tier): groups that share the caches and the kernels of one stage, so that a
        latency step can hang on several of them at once. ResNet-20 at batch 32 on an AMD EPYC
        host: 8/16/32 channels per stage run at 0.340 of the dense latency and 9/18/36 at
        0.555; 8/16/48 at 0.366 but 8/24/48 at 0.555 (benchmarks/results/
        width_steps_b32_stage1.txt). `allocate(tiers=)` moves each tier jointly."""
        if self._tiers is None:
            shapes: dict[int, tuple[int, ...]] = {}

            def record(i: int):
                def hook(module, args, out) -> None:
                    shapes.setdefault(i, tuple(out.shape[2:]))
                return hook

            plain = self.plain_copy().eval()
            hooks = [plain.get_submodule(g.producers[0].module).register_forward_hook(record(i))
                     for i, g in enumerate(self.channel_groups) if g.producers]
            with torch.no_grad():
                plain(*self.example_inputs)
            for h in hooks:
                h.remove()
            tiers: dict[tuple[int, ...], list[int]] = {}
            for i, shape in sorted(shapes.items()):
                if shape:  # a linear layer's output has no spatial size
                    tiers.setdefault(shape, []).append(i)
            self._tiers = [t for t in tiers.values() if len(t) > 1]
        return self._tiers

    def plain_copy(self) -> nn.Module:
        """A deep copy of the wrapped model without this wrapper's hooks."""
        clone = copy.deepcopy(self.model)
        for name, ids in self._hook_ids.items():
            module = clone.get_submodule(name)
            for hid in ids:
                module._forward_hooks.pop(hid, None)
                module._forward_pre_hooks.pop(hid, None)
        return clone

    def snap_width(self, i: int, k: int) -> int:
        """The deliverable width nearest to `k` channels for group i (the narrower on a tie;
        `allowed_widths`); a group tied by a grouped conv keeps `k` (its tie classes set its
        step). Only 0 itself drops a block: a few channels never snap to none."""
        allowed = self.unit_grid(i)
        if allowed is None:
            return k
        return min([c for c in allowed if c or not k], key=lambda c: (abs(c - k), c))

    def unit_grid(self, i: int) -> list[int] | None:
        """The unit counts group i may be delivered at (`allowed_widths`), for a search that
        moves between them (`wgates.allocate.allocate`'s `grid`); None: any count."""
        g = self.channel_groups[i]
        if self.channel_block <= 1 or g.ties is not None:
            return None
        return allowed_widths(g.size, g.min_channels, self.channel_multiple, self.channel_block)

    def snapped(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`masks` with each group's kept count moved to the nearest deliverable width
        (`snap_width`), adding the best-scored pruned channels or dropping the worst-scored
        kept ones.

        Why: some runtimes compute channels in blocks. ONNX Runtime's CPU convolutions, measured
        on ResNet-20 (one 64-wide group, every width from 16 to 64): widths that are multiples
        of 8 ran 3-10% faster than their neighbours (5% on average), and 63 channels ran 9%
        slower than the dense 64. On an AVX-512 host its blocks are 16 wide: 24 channels ran
        as slowly as 32, 40 as 48 (`channel_block`; docs/design.md)."""
        out = dict(masks)
        if self.channel_block <= 1:
            return out
        with torch.no_grad():
            for i, g in enumerate(self.channel_groups):
                mask = torch.as_tensor(masks[g.name]).cpu()
                k = int(mask.sum())
                want = self.snap_width(i, k)
                if want != k:  # kept channels first, each side by the gate's score
                    rank = self.scores(i).detach().cpu().argsort(descending=True)
                    order = torch.cat([rank[mask[rank]], rank[~mask[rank]]])
                    mask = torch.zeros(g.size, dtype=torch.bool)
                    mask[order[:want]] = True
                out[g.name] = mask
        return out

    def droppable_block(self, i: int) -> str | None:
        """The innermost residual block that becomes act(x + c) when group i keeps no channel
        (`wgates.depth`), checked in float64 and on random inputs; None if there is none or
        a consumer reads more than this group (its input could not be zeroed alone)."""
        group = self.channel_groups[i]
        if group.ties is not None or not group.consumers:
            return None
        for place in group.consumers:
            module = self.model.get_submodule(place.module)
            if _in_channels(module) != group.size or getattr(module, "groups", 1) != 1:
                return None
        gen = torch.Generator().manual_seed(0)
        inputs = tuple(torch.randn((1, *x.shape[1:]), generator=gen, dtype=torch.float64)
                       .to(x.device)
                       if x.is_floating_point() else x for x in self.example_inputs)
        dtype, mode, fixed = next(self.model.parameters()).dtype, self.training, self._fixed
        self._fixed = {i: inputs[0].new_zeros(group.size)}
        self.to(torch.float64).eval()
        try:  # float64, in place (a deep copy would keep hooks bound to this model)
            for name in common_ancestors(group.modules):
                seen = capture(self.model, name, lambda: self(*inputs))
                if seen is None:
                    continue
                form = skip_form(partial(_run_with_input, self, name, inputs), seen[0])
                if form is not None and fits(*seen, *form):
                    return name
            return None
        finally:
            self._fixed = fixed
            self.to(dtype).train(mode)

    def enable_depth(self) -> list[str]:
        """Let every group with a droppable block (`droppable_block`) keep no channel: such a
        group's minimum becomes 0, and extraction replaces its block by `wgates.depth.Skip`.
        Returns the blocks that may be dropped."""
        for i, group in enumerate(self.channel_groups):
            block = self.droppable_block(i)
            if block is not None:
                self.droppable[i] = block
                self._min_before[i], group.min_channels = group.min_channels, 0
        return [self.droppable[i] for i in sorted(self.droppable)]

    def disable_depth(self) -> None:
        """Undo `enable_depth`: every group keeps its minimum channels again."""
        for i, before in self._min_before.items():
            self.channel_groups[i].min_channels = before
        self.droppable.clear()
        self._min_before.clear()

    def extract(self, verify: bool = True) -> nn.Module:
        """A plain, physically smaller model computing what this one computes under its masks.
        With a channel multiple or block > 1 the masks are first `snapped`, and stay set:
        what `kept_counts()` reads afterwards is what was extracted."""
        from wgates.extract import extract

        if self.channel_block > 1:
            self.set_masks(self.snapped(self.masks()))
        return extract(self, verify=verify)


def allowed_widths(size: int, min_channels: int, multiple: int, block: int) -> list[int]:
    """The widths a group of `size` channels may be delivered at: multiples of `multiple` up
    to `block` channels, multiples of `block` above, and `size` itself (none under
    `min_channels`; 0 where that is 0, a dropped block). Why both: ONNX Runtime's CPU
    kernels (MLAS) run a conv whose channels fill whole blocks in their blocked layout, and
    any other one on a slower path with layout conversions around it; a conv narrower than
    one block is cheap either way."""
    block = max(block, multiple)
    small = range(multiple, min(block, size) + 1, multiple)
    large = range(2 * block, size, block)
    zero = {0} if min_channels == 0 else set()
    return sorted({c for c in (*small, *large) if c >= min_channels and c < size} | {size} | zero)


def _run_with_input(gated: GatedModel, name: str, inputs: tuple, x: torch.Tensor) -> torch.Tensor:
    """What submodule `name` outputs when it is fed `x` inside a forward of `gated`."""
    module = gated.model.get_submodule(name)
    pre = module.register_forward_pre_hook(lambda m, args: (x, *args[1:]))
    try:
        seen = capture(gated.model, name, lambda: gated(*inputs))
    finally:
        pre.remove()
    return seen[1]


def _first_of_unit(units: torch.Tensor) -> torch.Tensor:
    """For each unit, the index of its first channel."""
    first = torch.full((int(units.max()) + 1,), -1, dtype=torch.long)
    for c in range(len(units) - 1, -1, -1):
        first[units[c]] = c
    return first


def _out_channels(module: nn.Module) -> int:
    for attr in ("out_channels", "num_features", "out_features"):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise WgatesError(f"cannot gate the output of {type(module).__name__}")


def _in_channels(module: nn.Module) -> int:
    for attr in ("in_channels", "in_features"):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise WgatesError(f"cannot gate the input of {type(module).__name__}")


def gate(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignore: Ignore = (),
    min_channels: int = 1,
    kind: str = "wgates",
    verify: bool = True,
    strict: bool = False,
    channel_multiple: int = 1,
    channel_block: int | None = None,
    depth: bool = False,
) -> GatedModel:
    """Wrap `model` (left untouched) with one gate per prunable group of coupled channels.
    `depth`: a group that is a residual block's inner width may also keep no channel, which
    drops the block (`GatedModel.enable_depth`).
    `channel_multiple`, `channel_block`: extraction delivers widths in multiples of
    `channel_multiple` up to `channel_block` channels and in multiples of `channel_block`
    above (`allowed_widths`; default block: the multiple; a backend's `width_grid` is the
    one measured to suit it).

    With `verify`, random masks are extracted and the smaller model is checked to compute the
    same function. Groups that fail (a structure Torch-Pruning cannot follow, such as
    ShuffleNet's channel shuffle) are left dense with a warning naming them, or, with `strict`,
    refused with an error. The rest is never extracted wrongly.
    """
    from wgates.extract import verify_groups

    if channel_multiple < 1:
        raise WgatesError(f"channel_multiple must be >= 1, got {channel_multiple}")
    if channel_block is not None and channel_block % channel_multiple:
        raise WgatesError(f"channel_block ({channel_block}) must be a multiple of "
                          f"channel_multiple ({channel_multiple})")
    gated = GatedModel(model, example_inputs, ignore, min_channels, kind,
                       channel_multiple=channel_multiple, channel_block=channel_block)
    bad = verify_groups(gated) if verify else []
    if not bad:
        return _with_depth(gated, verify) if depth else gated
    described = "; ".join(
        f"{g.name} (layers {', '.join(g.modules)}{': ' + g.unsafe if g.unsafe else ''})"
        for g in gated.channel_groups if g.name in bad
    )
    if strict or len(bad) == len(gated.channel_groups):
        raise WgatesError(
            f"{type(model).__name__} cannot be pruned exactly at: {described}. "
            "Pass those layers in ignore=[...] (or strict=False) to prune the rest."
        )
    warnings.warn(
        f"wgates: leaving {len(bad)} channel group(s) unpruned because extraction would not be "
        f"exact there: {described}",
        stacklevel=2,
    )
    gated = GatedModel(model, example_inputs, ignore, min_channels, kind, drop=bad,
                       channel_multiple=channel_multiple, channel_block=channel_block)
    if verify_groups(gated):
        raise WgatesError(f"{type(model).__name__}: extraction is not exact even after "
                          f"leaving out {described}; pass ignore=[...] for the layers at fault")
    return _with_depth(gated, verify) if depth else gated


def _with_depth(gated: GatedModel, verify: bool) -> GatedModel:
    """`gated` with its droppable blocks enabled; with `verify`, every one of them dropped at
    once must extract exactly, else none is (a warning says so)."""
    from wgates.extract import TOLERANCE, extract, max_difference

    if not gated.enable_depth() or not verify:
        return gated
    gated.set_masks({gated.channel_groups[i].name: torch.zeros(gated.channel_groups[i].size,
                                                               dtype=torch.bool)
                     for i in gated.droppable})
    try:
        error = max_difference(gated, extract(gated, verify=False), gated.example_inputs)
    finally:
        gated.clear_masks()
    if error > TOLERANCE:
        warnings.warn(f"wgates: no block will be dropped: with all of them dropped the "
                      f"extracted model differs from the gated one by {error:.3g}", stacklevel=3)
        gated.disable_depth()
    return gated
