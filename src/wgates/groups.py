"""Channel groups: which output channels of a network are coupled and must go together.

Torch-Pruning's DependencyGraph does the hard part (residual adds, depthwise convs,
concatenation, split, flatten -> linear). Here each of its groups becomes a `ChannelGroup`
that records, for every module the group touches, which of that module's channel positions
belong to which of the group's channels ("root" channels). Gating needs exactly that: the
*producers* whose filters the W-Gate reads, the *gate points* whose outputs the gate
multiplies, and the *consumers* whose inputs must not see a pruned channel.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from wgates.errors import WgatesError

_OUT_FNS = {
    tp.prune_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_depthwise_conv_out_channels,
}
_IN_FNS = {tp.prune_conv_in_channels, tp.prune_linear_in_channels}
Ignore = Iterable[str | nn.Module | type]


def _tolerant(mapping_fn):
    """Torch-Pruning divides by zero on 5-D channel-shuffle reshapes (ShuffleNet); leave such a
    reshape unmapped instead, and let `wgates.extract.verify_groups` drop the groups crossing it."""

    def wrapped(graph, node):
        try:
            return mapping_fn(graph, node)
        except ZeroDivisionError:
            return None

    return wrapped


def _channel_concat_through_flatten(mapping_fn):
    """Torch-Pruning checks a concatenation's width against the input width of the layer it
    reaches, to tell a channel concat from one along another dim. After a flatten that is a
    Linear's C*H*W inputs, so a channel concat followed by flatten -> linear got no index
    mapping, and each of its inputs was mapped onto every concatenated channel. When the
    autograd node records the dim as 1 (channels), skip that check (no width to compare)."""

    def wrapped(graph, node):
        if getattr(node.grad_fn, "_saved_dim", None) != 1:
            return mapping_fn(graph, node)
        shape_infer = tp.dependency.index_mapping.shape_infer
        infer = shape_infer.infer_in_channels_recursively
        shape_infer.infer_in_channels_recursively = lambda *args, **kwargs: None
        try:
            return mapping_fn(graph, node)
        finally:
            shape_infer.infer_in_channels_recursively = infer

    return wrapped


def _split_spans(node) -> list[tuple[int, int]] | None:
    """For a split along dim 1: the channel range (start, end) of the chunk that each entry of
    `node.outputs` reads; None for another dim, or when the chunks cannot be told.

    Torch-Pruning takes the i-th output node for the i-th chunk, which is wrong as soon as one
    chunk is read twice (CSPNet's `x1, x2 = x.split(n, 1)` then `x1 + blocks(x1)`), and for
    `split(int)` / `chunk` it infers the sizes from the readers, counting such a chunk twice.
    Autograd knows both: the split's sizes, and which chunk (`output_nr`) each reader reads.
    """
    fn = node.grad_fn
    shape = getattr(fn, "_saved_self_sym_sizes", None)
    if shape is None or _split_dim(node) != 1:
        return None
    if hasattr(fn, "_saved_split_sizes"):
        sizes = [int(n) for n in fn._saved_split_sizes]
    elif hasattr(fn, "_saved_split_size"):
        total, step = int(shape[1]), int(fn._saved_split_size)
        sizes = [min(step, total - start) for start in range(0, total, step)]
    else:
        return None
    offsets = [0, *itertools.accumulate(sizes)]
    chunks: dict[int, list[int]] = {}  # reader node id -> chunks it reads, in its input order
    spans = []
    for out in node.outputs:
        read = chunks.setdefault(
            id(out), [nr for f, nr in getattr(out.grad_fn, "next_functions", ()) if f is fn])
        if not read:
            return None
        nr = read.pop(0)
        spans.append((offsets[nr], offsets[nr + 1]))
    return spans


def _split_dim(node) -> int | None:
    """The dim a split node cuts, made non-negative (autograd saves `dim=-3` as 2**64 - 3);
    None when autograd did not save it."""
    dim = getattr(node.grad_fn, "_saved_dim", None)
    if dim is None:
        return None
    dim = dim - 2**64 if dim >= 2**63 else dim
    rank = len(getattr(node.grad_fn, "_saved_self_sym_sizes", ()))
    return dim + rank if dim < 0 and rank else dim


def _split_sizes_per_reader(init_fn):
    """Torch-Pruning's shape inference reads `split_sizes[i]` as the width of the split's i-th
    output node: give it exactly that (a concatenation of a chunk with another branch, as in
    CSPNet, was otherwise given wrong offsets)."""

    def wrapped(graph):
        init_fn(graph)
        for node in graph.module2node.values():
            spans = _split_spans(node) if node.type == tp.ops.OPTYPE.SPLIT else None
            if spans:
                node.module.split_sizes = [end - start for start, end in spans]

    return wrapped


def _split_by_chunk(update_fn):
    """Map each reader of a split along the channels onto the chunk it reads (`_split_spans`),
    after Torch-Pruning's own mappings: its split mapping is applied before a concatenation's
    (slots 0 and 1 of a dependency), which is right from a split into a concatenation, but not
    back from a concatenation into a split (CSPNet's `cat([x1, blocks(x2)])`), where the
    concatenation's offsets must come off before the chunk's offset goes on. A split along
    another dim passes the channels through unchanged (Torch-Pruning took `dim=-1` for one
    along the channels)."""

    def wrapped(graph):
        update_fn(graph)
        mapping = tp.dependency.index_mapping._SplitIndexMapping
        concat = tp.dependency.index_mapping._ConcatIndexMapping
        for node in graph.module2node.values():
            if node.type != tp.ops.OPTYPE.SPLIT or not node.enable_index_mapping:
                continue
            readers = list({id(o): o for o in node.outputs}.values())
            forward = [d for d in node.dependencies if any(d.target is o for o in readers)]
            back = {id(o): [d for d in o.dependencies if d.target is node] for o in readers}
            if _split_dim(node) not in (1, None):
                for dep in forward + [d for deps in back.values() for d in deps]:
                    dep.index_mapping[0] = None
                continue
            spans = _split_spans(node)
            if spans is None:
                continue
            # the split's dependencies on its readers were made in `node.outputs` order, and
            # each reader's on the split in its input order, the order `_split_spans` follows
            for dep, span in zip(forward, spans):
                dep.index_mapping[0] = mapping(offset=list(span), reverse=False)
            for out in readers:
                mine = [span for o, span in zip(node.outputs, spans) if o is out]
                for dep, span in zip(back[id(out)], mine):
                    # [concatenation -> its input, chunk -> the split tensor]; this runs again
                    # for every group, so only a concatenation's own mapping goes first
                    first = dep.index_mapping[1]
                    first = first if isinstance(first, concat) else None
                    dep.index_mapping = [first, mapping(offset=list(span), reverse=True)]

    return wrapped


tp.dependency.index_mapping.update_reshape_index_mapping = _tolerant(
    tp.dependency.index_mapping.update_reshape_index_mapping
)
tp.dependency.index_mapping.update_concat_index_mapping = _channel_concat_through_flatten(
    tp.dependency.index_mapping.update_concat_index_mapping
)
tp.dependency.index_mapping.update_index_mapping = _split_by_chunk(
    tp.dependency.index_mapping.update_index_mapping
)
tp.dependency.shape_infer.init_shape_information = _split_sizes_per_reader(
    tp.dependency.shape_infer.init_shape_information
)


@dataclass(frozen=True)
class Placement:
    """Positions `idxs` of a module's channel dim that carry group channels `root_idxs`."""

    module: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass
class ChannelGroup:
    """One prunable set of coupled output channels, named after its root layer."""

    name: str
    size: int
    min_channels: int
    producers: list[Placement] = field(default_factory=list)
    gate_points: list[Placement] = field(default_factory=list)
    consumers: list[Placement] = field(default_factory=list)
    channelwise: list[Placement] = field(default_factory=list)
    ties: tuple[int, ...] | None = None
    # why some valid masks of this group would not extract (exactly), or None; such groups
    # are left dense by gate(verify=True) (see `wgates.extract.verify_groups`)
    unsafe: str | None = None

    @property
    def n_units(self) -> int:
        """Independently prunable units: channels, or tie classes where a grouped conv binds."""
        return self.size if self.ties is None else max(self.ties) + 1

    @property
    def modules(self) -> list[str]:
        return sorted({p.module for p in self.producers + self.consumers + self.channelwise})


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    """Normalise example inputs to a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and example_inputs:
        return tuple(example_inputs)
    raise WgatesError(
        "example_inputs must be a tensor (e.g. torch.randn(1, 3, 32, 32)) or a tuple of "
        f"the model's positional inputs, got {type(example_inputs).__name__}"
    )


def build_graph(model: nn.Module, example_inputs: tuple) -> tp.DependencyGraph:
    """Trace `model` with Torch-Pruning (needs autograd on; keeps the model's train/eval mode)."""
    was_training = model.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # forward_fn: without it Torch-Pruning retries model(inputs) when model(*inputs)
            # fails, and reports that second, misleading error instead of the real one.
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, verbose=False,
                forward_fn=lambda m, x: m(*x),
            )
    except Exception as err:  # tracing failures come from arbitrary user code
        first_line = (str(err).strip().splitlines() or [""])[0]  # the CLI prints one line
        raise WgatesError(
            f"could not trace {type(model).__name__} with the given example inputs "
            f"({err.__class__.__name__}: {first_line}); check that model(*example_inputs) runs"
        ) from err
    finally:
        model.train(was_training)


def resolve_ignore(model: nn.Module, ignore: Ignore) -> set[str]:
    """Turn names, module instances or module types into the set of module names to exclude."""
    names = {m: n for n, m in model.named_modules()}
    known = set(names.values())
    out: set[str] = set()
    for item in ignore:
        if isinstance(item, str):
            if item not in known:
                raise WgatesError(f"ignore: no module named {item!r} in the model")
            out |= {n for n in known if n == item or n.startswith(item + ".")}
        elif isinstance(item, nn.Module):
            if item not in names:
                raise WgatesError(f"ignore: module {type(item).__name__} is not part of the model")
            out |= {n for n, m in item.named_modules(prefix=names[item])}
        elif isinstance(item, type):
            out |= {n for m, n in names.items() if isinstance(m, item)}
        else:
            raise WgatesError(f"ignore: expected module names, modules or types, got {item!r}")
    return out


def find_groups(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignore: Ignore = (),
    min_channels: int = 1,
    graph: tp.DependencyGraph | None = None,
) -> list[ChannelGroup]:
    """Every prunable group of coupled output channels, in the order the network runs them.

    A group is left out when any of its layers is ignored, when its channels reach the model's
    output (the classifier's outputs), or when `min_channels` leaves nothing to prune.
    """
    if min_channels < 1:
        raise WgatesError(f"min_channels must be >= 1, got {min_channels}")
    inputs = as_input_tuple(example_inputs)
    graph = graph or build_graph(model, inputs)
    ignored = resolve_ignore(model, ignore)
    name_of = {m: n for n, m in model.named_modules()}
    groups: list[ChannelGroup] = []
    seen: set[nn.Module] = set()
    for module in model.modules():  # definition order, so a group is named by its first layer
        if module not in graph.module2node or module in seen:
            continue
        if not isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            continue
        pruner = graph.get_pruner_of_module(module)
        size = pruner.get_out_channels(module) if pruner else None
        if not size:
            continue
        try:
            tp_group = graph.get_pruning_group(module, pruner.prune_out_channels, range(size))
        except (IndexError, ValueError) as err:  # Torch-Pruning cannot follow this structure
            warnings.warn(
                f"wgates: leaving {name_of[module]} unpruned: its channel coupling could not "
                f"be traced ({err.__class__.__name__}: {err})",
                stacklevel=3,
            )
            seen.add(module)
            continue
        group = _to_channel_group(graph, tp_group, name_of, name_of[module], size, min_channels)
        seen |= {graph.model.get_submodule(p.module) for p in group.producers}
        if _reaches_output(tp_group) or size <= min_channels:
            continue
        if ignored & set(group.modules):
            continue
        problem = _channel_split(tp_group, name_of) or _unprunable(graph.model, group)
        if problem:
            warnings.warn(f"wgates: leaving {group.name} unpruned: {problem}", stacklevel=3)
            continue
        group.unsafe = _unsafe(graph.model, group)
        groups.append(group)
    return groups


def _channel_split(tp_group: tp.dependency.Group, name_of: dict[nn.Module, str]) -> str | None:
    """Why a group read through `torch.split` / `chunk` along the channels cannot be pruned:
    the chunk sizes are numbers in the model's code (CSPNet's `x.split(n // 2, dim=1)`), which
    pruning cannot change, so the smaller model would cut its channels in the wrong places."""
    for item in tp_group:
        node = item.dep.target
        if (node.type != tp.ops.OPTYPE.SPLIT or _split_dim(node) not in (1, None)
                or not item.idxs):  # reached with no channels: through a concat's other input
            continue
        writer, todo, seen = None, list(node.inputs), set()
        while todo and writer is None:  # the nearest named module before the split
            prev = todo.pop(0)
            if id(prev) not in seen:
                seen.add(id(prev))
                writer = name_of.get(prev.module)
                todo += prev.inputs
        return (f"the model's forward splits the channels of {writer or 'a layer'} with "
                "torch.split/chunk at sizes fixed in its code, which pruning cannot change")
    return None


def _unprunable(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why this group cannot be gated at all, or None.

    - a LayerNorm or GroupNorm normalizing over the group's channels (ConvNeXt's residual
      stream): the statistics of the kept channels would change with the pruned ones;
    - a conv with groups == out_channels < in_channels, which Torch-Pruning prunes as a
      depthwise conv (inputs and outputs together);
    - a placement outside its module's channels: Torch-Pruning mis-mapped the coupling;
    - grouped convs whose ties join all the channels (e.g. a depthwise conv with a channel
      multiplier reading the group) leave nothing to prune.
    """
    for place in group.channelwise:
        module = model.get_submodule(place.module)
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            return (f"{place.module} ({type(module).__name__}) normalizes over its channels, "
                    "so removing some would change what the others compute")
    for place in group.producers:
        module = model.get_submodule(place.module)
        groups = getattr(module, "groups", 1)
        if 1 < groups == module.out_channels != module.in_channels:
            return (f"Torch-Pruning takes {place.module} (groups = out_channels = {groups}, "
                    f"in_channels = {module.in_channels}) for a depthwise conv, which it is "
                    "not, and would prune its inputs with its outputs")
    for places, attrs in ((group.producers, ("out_channels", "out_features")),
                          (group.consumers, ("in_channels", "in_features")),
                          (group.channelwise, ("num_features",))):
        for place in places:
            module = model.get_submodule(place.module)
            dim = next((getattr(module, a) for a in attrs if hasattr(module, a)), None)
            if dim is not None and (len(set(place.idxs)) != len(place.idxs)
                                    or any(not 0 <= i < dim for i in place.idxs)):
                return (f"Torch-Pruning mapped its channels onto positions "
                        f"{list(place.idxs)} of {place.module}, which has {dim}")
    if group.n_units == 1:
        grouped = sorted({p.module for p in group.producers + group.consumers
                          if getattr(model.get_submodule(p.module), "groups", 1) > 1})
        return (f"grouped convolutions ({', '.join(grouped)}) tie all its channels together, "
                "so none can be removed alone")
    return None


def _unsafe(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why some valid masks of this group would not extract (exactly), or None.

    - a producer that writes only some of the group's channels (a concatenation inside a
      residual add) loses all of them under some masks, and a layer with no output channels
      cannot exist in the extracted model;
    - a grouped conv that ties channels of this group to channels outside it (it reads or
      writes a concatenation): per-group ties cannot express that constraint.
    """
    for place in group.producers:
        if len(set(place.root_idxs)) <= group.size - group.min_channels:
            return (f"{place.module} writes only {len(set(place.root_idxs))} of its "
                    f"{group.size} coupled channels and would lose all of them under some "
                    "masks")
    positions: dict[tuple[str, str], set[int]] = {}
    for places, attr in ((group.producers, "out_channels"), (group.consumers, "in_channels")):
        for place in places:
            positions.setdefault((place.module, attr), set()).update(place.idxs)
    for (name, attr), idxs in positions.items():
        module = model.get_submodule(name)
        groups, dim = getattr(module, "groups", 1), getattr(module, attr, 0)
        if groups <= 1 or (attr == "out_channels" and groups == dim):
            continue
        period = dim // groups
        if any(q not in idxs for p in idxs for q in range(p % period, dim, period)):
            return (f"grouped conv {name} (groups={groups}) ties channels across groups: its "
                    f"{attr} at the same offset in every conv-group must go together, and "
                    "some of them are not in this group")
    return None


def _reaches_output(tp_group: tp.dependency.Group) -> bool:
    """True when a node carrying these channels (not merely reading them) ends the graph."""
    return any(
        not item.dep.target.outputs for item in tp_group if item.dep.handler not in _IN_FNS
    )


def _to_channel_group(
    graph: tp.DependencyGraph,
    tp_group: tp.dependency.Group,
    name_of: dict[nn.Module, str],
    name: str,
    size: int,
    min_channels: int,
) -> ChannelGroup:
    group = ChannelGroup(name=name, size=size, min_channels=min_channels)
    by_module: dict[str, Placement] = {}
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in name_of:
            continue  # functional ops (add, cat, ...) and the output node carry no weights
        place = Placement(name_of[module], tuple(item.idxs), tuple(item.root_idxs))
        fn = item.dep.handler
        if fn in _OUT_FNS:
            group.producers.append(place)
        elif fn in _IN_FNS:
            group.consumers.append(place)
        else:
            group.channelwise.append(place)
            by_module[place.module] = place
    for prod in group.producers:
        group.gate_points.append(_gate_point(graph, prod, by_module))
    group.ties = _grouped_conv_ties(graph.model, group)
    return group


def _grouped_conv_ties(model: nn.Module, group: ChannelGroup) -> tuple[int, ...] | None:
    """Tie classes of root channels imposed by grouped convs (1 < groups < channels).

    A grouped conv stays valid only if every one of its conv-groups loses the same channel
    offsets, so channels at the same offset in different conv-groups are pruned together.
    """
    parent = list(range(group.size))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tied = False
    for place, attr in [(p, "out_channels") for p in group.producers] + [
        (p, "in_channels") for p in group.consumers
    ]:
        module = model.get_submodule(place.module)
        groups = getattr(module, "groups", 1)
        # a depthwise conv (groups == out_channels, Torch-Pruning's definition) is channelwise
        # and needs no tie; a conv *reading* the group never is, even with groups ==
        # in_channels (a depthwise conv with a channel multiplier): its inputs are tied too
        if groups <= 1 or (attr == "out_channels" and groups == module.out_channels):
            continue
        period = getattr(module, attr) // groups
        first: dict[int, int] = {}
        for idx, root in zip(place.idxs, place.root_idxs):
            other = first.setdefault(idx % period, root)
            parent[find(root)] = find(other)
            tied = True
    if not tied:
        return None
    labels: dict[int, int] = {}
    return tuple(labels.setdefault(find(r), len(labels)) for r in range(group.size))


def _gate_point(
    graph: tp.DependencyGraph, producer: Placement, channelwise: dict[str, Placement]
) -> Placement:
    """Where a producer's channels are gated: after its BatchNorm when one follows directly."""
    node = graph.module2node[graph.model.get_submodule(producer.module)]
    if len(node.outputs) == 1 and node.outputs[0].type == tp.ops.OPTYPE.BN:
        bn = node.outputs[0].module
        for name, m in graph.model.named_modules():
            if m is bn and name in channelwise:
                return channelwise[name]
    return producer
