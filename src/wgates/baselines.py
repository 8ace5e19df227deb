"""The pruning methods wgates runs, behind one signature, so the pipeline and the benchmark
treat them alike. `wgates methods` lists them; docs/methods.md reads each paper.

Every method in `METHODS` is `(model, example_inputs, train_loader, target, ctx) -> nn.Module`
and returns a plain, physically smaller model (carrying its `PruningPlan`, so it saves and
reloads) whose latency ratio to `model`, measured by `ctx.measure`, lies in
`accepted_band(target, ctx.tolerance)` when some setting of the method reaches it.
Fine-tuning is not part of a method: the pipeline and the benchmark give every method the same.

- `uniform`: every group keeps the same fraction of its channels, the highest L1 norms.
- `l1` (Li et al., 2017): per-group L1 ranking; per-group ratios by *sensitivity-ranked
  allocation*: each group is pruned alone to half width and the loss rise on a calibration
  batch ranks the groups; the least sensitive group is then pruned 3x as much as the most
  sensitive one (pruned fraction = (1 - x) * w, w from 1.5 down to 0.5 by rank), and the one
  scalar x is searched for the target.
- `tp-l1`, `tp-l2`, `tp-taylor`: Torch-Pruning's `BasePruner` with global ranking by
  `GroupMagnitudeImportance(p=1|2)` or `TaylorImportance` (gradients of one calibration
  batch); its `pruning_ratio` is searched for the target.
- `wgates` (ours), `plain` (weight-independent gates), `wgates-flops` (W-Gates with a fitted
  FLOPs proxy instead of LPNet), `wgates-gradient` (widths moved by the latency gradient, the
  paper's form, instead of the knapsack), `gdp` (GDP-style polarised gates, Guo et al. 2021,
  under the same latency term): gate search (`wgates.search.search`) for `ctx.epochs`, then
  the measured closed loop (`wgates.search.closed_loop`). What makes each one differs is its
  `GateSearch`, which `wgates.prune` reads too.
- `functional` (Qin et al., 2018): each group's filters clustered by the correlation of their
  responses on calibration images; every cluster keeps its strongest filter; one distance
  cut for the whole network is searched for the target.

The scalar knobs of the knob methods share one routine, `match_latency`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from wgates.errors import WgatesError
from wgates.gated import GatedModel, gate
from wgates.groups import Ignore, as_input_tuple, resolve_ignore
from wgates.predictor import check_groups, fit_proxy
from wgates.search import (
    Cost,
    accepted_band,
    calibration_batches,
    closed_loop,
    search,
    threshold_masks,
)
from wgates.train import LossFn, classification_loss

Measure = Callable[[nn.Module], tuple[float, float]]  # model -> (latency / dense, spread)
Method = Callable[..., nn.Module]

L1_WEIGHTS = (1.5, 0.5)  # pruned-fraction multiplier of the least / most sensitive group
SENSITIVITY_KEEP = 0.5  # each group is pruned alone to this fraction to rank sensitivity
TP_MAX_RATIO = 0.95  # Torch-Pruning's per-layer cap, so no layer is removed entirely
GDP_EPS = (1e-2, 1e-4)  # eps of g = x^2 / (x^2 + eps), annealed geometrically over the search
GDP_T = 0.1  # t of the polariser R = t * g - |g - mean(g)|: a mild pull towards 0
GDP_WEIGHT = 1.0  # weight of R (averaged over channels) next to the task and latency terms


@dataclass
class Context:
    """What the methods share: how latency is measured, the latency predictor, the budgets."""

    measure: Measure
    cost: Cost | None = None  # kept counts -> latency ratio (LPNet), for the gate methods
    epochs: int = 1  # gate-search epochs
    lr: float = 0.01
    gate_lr: float = 0.05
    tolerance: float = 0.05
    seed: int = 0
    ignore: Ignore = ()
    calib_batches: int = 1  # batches for the L1 sensitivities and Taylor gradients
    proxy_samples: int = 48  # configurations the FLOPs proxy is fitted on
    bisect_steps: int = 12
    progress: bool = False
    distill: bool = False  # gate searches distil from the dense model (as the fine-tune does)
    allocation: str = "knapsack"  # how a gate search sets the widths (wgates.search)
    ramp: float | None = None  # fraction of the search over which the aim reaches the target
    floor: float = 0.0  # no group below this fraction of its width during the search
    importance: str = "taylor"  # what a unit is worth to a knapsack search (wgates.search)
    blocks: tuple[int, ...] = ()  # a gate method's closed loop widens to these (widen_to_blocks)
    val_loader: Iterable | None = None  # a gate search reports its accuracy per epoch on it
    loss_fn: LossFn = classification_loss  # the task's loss, for sensitivities and gradients
    channel_multiple: int = 1  # widths delivered in multiples of it (`GatedModel.snapped`)
    channel_block: int | None = None  # ... and of this above it (`wgates.gated.allowed_widths`)
    depth: bool = False  # a gate search may drop residual blocks (`wgates.depth`)
    notes: dict = field(default_factory=dict)  # what a method reports beside its model


Regulariser = Callable[[], tuple[torch.Tensor, dict]]  # once per search step: (term, stats)


@dataclass(frozen=True)
class GateSearch:
    """What makes a gate method: its gates, and what it changes in the shared search. The
    benchmark (`gate_method`) and `wgates.prune` both read it, so a method is defined once."""

    kind: str = "wgates"  # `wgates.gate(kind=...)`
    proxy: str | None = None  # a fitted cost proxy instead of the run's cost model
    allocation: str | None = None  # fixed by the method (GDP: the latency gradient)
    regulariser: Callable[[GatedModel, int], Regulariser] | None = None  # (gated, steps)

    def settings(self, proxy: str, allocation: str) -> tuple[str, str]:
        """The run's (proxy, allocation), with what this method fixes put in."""
        return self.proxy or proxy, self.allocation or allocation


@dataclass(frozen=True)
class MethodInfo:
    """A registered method's paper (one line, for `wgates methods`) and, for a gate method,
    its search; a method without one decides its widths itself, most by a knob bisected on
    measurements. `needs_cost`: it reads the latency predictor (`Context.cost`) too."""

    paper: str
    gates: GateSearch | None = None
    needs_cost: bool = False

    @property
    def kind(self) -> str:
        """The gates the method trains; a knob method's groups are read from plain ones."""
        return self.gates.kind if self.gates else "plain"


METHODS: dict[str, Method] = {}
INFO: dict[str, MethodInfo] = {}
SEARCH_METHODS: set[str] = set()  # methods that train (a gate search): epochs count for them


def register_method(name: str, fn: Method | None = None, *, paper: str,
                    gates: GateSearch | None = None, trains: bool = False,
                    needs_cost: bool = False):
    """Add `fn` (or the decorated function) to `METHODS` under `name`, with its paper; a
    method with `gates`, or one that `trains` otherwise (SCOP's control factors,
    MetaPruning's PruningNet), trains for `Context.epochs`, which a fixed training budget
    counts; one that `needs_cost` is given the latency predictor."""
    def add(f: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = f
        INFO[name] = MethodInfo(paper, gates, needs_cost or gates is not None)
        if gates is not None or trains:
            SEARCH_METHODS.add(name)
        return f

    return add if fn is None else add(fn)


def method_info(name: str) -> MethodInfo:
    """The registered method `name`, or a one-line error listing the choices."""
    if name not in INFO:
        raise WgatesError(f"unknown method {name!r}: choose from {', '.join(INFO)} "
                          "(`wgates methods` says where each comes from)")
    return INFO[name]


# -- the shared knob search ----------------------------------------------------------------
def match_latency(
    build: Callable[[float], nn.Module],
    measure: Measure,
    target: float,
    lo: float = 0.0,
    hi: float = 1.0,
    tolerance: float = 0.05,
    steps: int = 12,
) -> tuple[nn.Module, float, float]:
    """Bisect a knob in [lo, hi] on which latency grows, for a model whose *measured* ratio
    lies in `accepted_band(target, tolerance)`, as the closed loop's. Returns (model, knob,
    ratio): the first model in the band, else the slowest one under its ceiling, else
    (unreachable) the fastest seen."""
    low, ceiling = accepted_band(target, tolerance)
    under: tuple[nn.Module, float, float] | None = None
    over: tuple[nn.Module, float, float] | None = None
    for _ in range(steps):
        knob = (lo + hi) / 2
        model = build(knob)
        ratio = measure(model)[0]
        if ratio <= ceiling:
            if under is None or ratio > under[2]:
                under = (model, knob, ratio)
            if ratio >= low:
                break
            lo = knob
        else:
            if over is None or ratio < over[2]:
                over = (model, knob, ratio)
            hi = knob
    return under or over


# -- channel-ranking methods ---------------------------------------------------------------
def _calibration(loader: Iterable, ctx: Context) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return calibration_batches(loader, ctx.calib_batches)


def _loss(model: nn.Module, batches: list, loss_fn: LossFn) -> torch.Tensor:
    device = next(model.parameters()).device
    return sum(loss_fn(model(x.to(device)), y.to(device)) for x, y in batches)


def l1_ranked(model: nn.Module, inputs: tuple, ignore: Ignore = (),
              channel_multiple: int = 1, channel_block: int | None = None) -> GatedModel:
    """A gated copy whose per-channel scores are the group's L1 norms (each coupled layer's
    filters RMS-normalised, so one layer's scale does not dominate), for `masks_for_widths`."""
    gated = gate(model, inputs, ignore=ignore, kind="plain", channel_multiple=channel_multiple,
                 channel_block=channel_block)
    with torch.no_grad():
        for i, g in enumerate(gated.gates):
            g.value.copy_(gated._filter_rows(i).abs().sum(1))
    return gated.eval()


def extract_at(gated: GatedModel, fractions: dict[str, float]) -> nn.Module:
    """Extract keeping `fractions[name]` of each group (clipped to its valid widths)."""
    widths = {
        g.name: min(g.size, max(g.min_channels, round(fractions[g.name] * g.size)))
        for g in gated.groups
    }
    gated.set_masks(gated.masks_for_widths(widths))
    return gated.extract(verify=False)


def _bisect(build: Callable[[float], nn.Module], target: float, ctx: Context,
            lo: float = 0.0, hi: float = 1.0) -> nn.Module:
    return match_latency(build, ctx.measure, target, lo, hi, ctx.tolerance, ctx.bisect_steps)[0]


@register_method("uniform", paper="uniform width scaling (every layer keeps the same "
                 "fraction; its filters by L1 norm)")
def uniform(model, example_inputs, train_loader, target: float, ctx: Context) -> nn.Module:
    """The same kept fraction in every group, searched for the target."""
    gated = l1_ranked(model, as_input_tuple(example_inputs), ctx.ignore, ctx.channel_multiple,
                      ctx.channel_block)
    return _bisect(lambda x: extract_at(gated, dict.fromkeys(gated.widths(), x)), target, ctx)


def sensitivity_weights(gated: GatedModel, batches: list,
                        loss_fn: LossFn = classification_loss) -> dict[str, float]:
    """Pruned-fraction multipliers by sensitivity rank (least sensitive: `L1_WEIGHTS[0]`)."""
    rise = {}
    with torch.no_grad():
        for g in gated.groups:
            gated.clear_masks()
            gated.set_masks(gated.masks_for_widths(
                {g.name: max(g.min_channels, round(SENSITIVITY_KEEP * g.size))}))
            rise[g.name] = float(_loss(gated, batches, loss_fn))
    gated.clear_masks()
    order = sorted(rise, key=rise.get)
    steps = torch.linspace(*L1_WEIGHTS, len(order)).tolist()
    return dict(zip(order, steps))


@register_method("l1", paper='Li et al., ICLR 2017, "Pruning Filters for Efficient '
                 'ConvNets" (L1 filter norms, sensitivity-ranked layer ratios)')
def l1(model, example_inputs, train_loader, target: float, ctx: Context) -> nn.Module:
    """Li et al. (2017): L1 filter ranking, per-group ratios by sensitivity rank (see top)."""
    gated = l1_ranked(model, as_input_tuple(example_inputs), ctx.ignore, ctx.channel_multiple,
                      ctx.channel_block)
    weights = sensitivity_weights(gated, _calibration(train_loader, ctx), ctx.loss_fn)
    # x = -1 takes every group to its minimum (every weight is >= 0.5), x = 1 prunes none.
    return _bisect(
        lambda x: extract_at(gated, {n: 1 - (1 - x) * w for n, w in weights.items()}),
        target, ctx, lo=-1.0,
    )


def _classifier(model: nn.Module) -> str:
    """The last linear layer (else conv), whose outputs are the classes: never pruned."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = last or [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not last:
        raise WgatesError(f"{type(model).__name__} has no linear or conv layer to keep")
    return last[-1]


def torch_pruning(model, example_inputs, train_loader, target: float, ctx: Context,
                  importance: Callable[[], tp.importance.Importance],
                  gradients: bool = False) -> nn.Module:
    """Torch-Pruning's BasePruner, global ranking; its pruning ratio searched for the target.
    Torch-Pruning chooses the channels; they are removed by wgates' extraction (the same
    Torch-Pruning calls underneath), so the model carries its plan like every other method's."""
    inputs = as_input_tuple(example_inputs)
    keep = sorted({_classifier(model)} | resolve_ignore(model, ctx.ignore))
    batches = _calibration(train_loader, ctx) if gradients else []
    # ranked by L1 only where channels are added or dropped to a multiple (`snapped`)
    gated = l1_ranked(model, inputs, ctx.ignore, ctx.channel_multiple,
                      ctx.channel_block)

    def build(kept_fraction: float) -> nn.Module:
        clone = copy.deepcopy(model).eval()
        if gradients:
            clone.zero_grad(set_to_none=True)
            _loss(clone, batches, ctx.loss_fn).backward()
        pruner = tp.pruner.BasePruner(
            clone, inputs, importance=importance(), global_pruning=True,
            pruning_ratio=1 - kept_fraction, max_pruning_ratio=TP_MAX_RATIO,
            ignored_layers=[clone.get_submodule(n) for n in keep],
        )
        names = {module: name for name, module in clone.named_modules()}
        pruned: dict[str, list[int]] = {}
        for group in pruner.step(interactive=True):  # global: every choice is made up front
            for dep, idxs in group:
                name = names.get(dep.target.module)  # None: an operation (add, concat...)
                if name is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    pruned[name] = [int(i) for i in idxs]
        masks = {}
        for g in gated.groups:
            mask = torch.ones(g.size, dtype=torch.bool)
            mask[pruned.get(g.name, [])] = False
            masks[g.name] = mask
        gated.clear_masks()
        gated.set_masks(masks)
        return gated.extract(verify=False)

    return _bisect(build, target, ctx)


_DEPGRAPH = "Fang et al., CVPR 2023, DepGraph (Torch-Pruning)"
register_method("tp-l1", partial(
    torch_pruning, importance=partial(tp.importance.GroupMagnitudeImportance, p=1)),
    paper=f"{_DEPGRAPH}: global group L1 magnitude")
register_method("tp-l2", partial(
    torch_pruning, importance=partial(tp.importance.GroupMagnitudeImportance, p=2)),
    paper=f"{_DEPGRAPH}: global group L2 magnitude")
register_method("tp-taylor", partial(
    torch_pruning, importance=tp.importance.TaylorImportance, gradients=True),
    paper=f"{_DEPGRAPH}: global Taylor importance, Molchanov et al., CVPR 2019")


# -- gate methods --------------------------------------------------------------------------
def polarisation(gated: GatedModel) -> torch.Tensor:
    """GDP's regulariser, averaged over channels: sum over groups of t*g - |g - mean(g)|."""
    values = gated.gate_values()
    total = sum((GDP_T * v - (v - v.mean()).abs()).sum() for v in values)
    return total / sum(len(v) for v in values)


class Polariser:
    """GDP's polariser as a search regulariser, its eps annealed geometrically over `steps`
    search steps; a part of the search's checkpoint, so a resumed search anneals on."""

    def __init__(self, gated: GatedModel, steps: int) -> None:
        self.gated, self.steps, self.step = gated, max(1, steps), 0

    def _anneal(self) -> float:
        eps = GDP_EPS[0] * (GDP_EPS[1] / GDP_EPS[0]) ** min(1.0, self.step / self.steps)
        for g in self.gated.gates:
            g.eps = eps
        return eps

    def __call__(self) -> tuple[torch.Tensor, dict]:
        self.step += 1
        eps = self._anneal()
        polar = polarisation(self.gated)
        return GDP_WEIGHT * polar, {"polar": polar.item(), "eps": eps}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.step:
            self._anneal()


def gate_method(model, example_inputs, train_loader, target: float, ctx: Context,
                how: GateSearch) -> nn.Module:
    """Gate search as `how` says, under `ctx.cost` (or `how`'s fitted proxy), then the
    closed loop."""
    torch.manual_seed(ctx.seed)
    gated = gate(model, as_input_tuple(example_inputs), ignore=ctx.ignore, kind=how.kind,
                 channel_multiple=ctx.channel_multiple,
                 channel_block=ctx.channel_block, depth=ctx.depth)
    cost = fit_proxy(gated, how.proxy, ctx.proxy_samples, ctx.seed) if how.proxy else ctx.cost
    if cost is None:
        raise WgatesError(f"gate method {how.kind!r} needs a latency predictor: set "
                          "Context.cost")
    check_groups(cost, [g.name for g in gated.groups])
    if isinstance(cost, nn.Module):
        cost.requires_grad_(False)
    band = accepted_band(target, ctx.tolerance)  # what the closed loop accepts
    steps = ctx.epochs * len(train_loader)
    history, control = search(
        gated, cost, band.middle, train_loader, ctx.epochs, lr=ctx.lr, gate_lr=ctx.gate_lr,
        progress=ctx.progress, allocation=how.allocation or ctx.allocation, ramp=ctx.ramp,
        floor=ctx.floor, importance=ctx.importance, teacher=model if ctx.distill else None,
        measure=ctx.measure, band=band,
        val_loader=ctx.val_loader, loss_fn=ctx.loss_fn,
        regulariser=how.regulariser(gated, steps) if how.regulariser else None)
    small, loop = closed_loop(gated.eval(), cost, ctx.measure, target, ctx.tolerance,
                              propose=getattr(control, "masks_at", None), loader=train_loader,
                              blocks=ctx.blocks)
    ctx.notes.update(search=history.epochs, calibration=getattr(control, "calibration", []),
                     loop=[asdict(s) for s in loop])
    return small


_WGATES = "Li et al., 2020, arXiv 2007.02066, Weight-dependent Gates (W-Gates)"
for _name, _how, _paper in [
    ("wgates", GateSearch("wgates"), f"{_WGATES}, with LPNet and the knapsack allocation"),
    ("plain", GateSearch("plain"),
     f"ablation of {_WGATES}: weight-independent gates (one free value per channel)"),
    ("gdp", GateSearch("gdp", allocation="gradient", regulariser=Polariser),
     "Guo et al., ICCV 2021, arXiv 2109.02220, GDP: Gates with Differentiable "
     "Polarization"),
    ("wgates-flops", GateSearch("wgates", proxy="flops"),
     f"ablation of {_WGATES}: a fitted FLOPs proxy instead of LPNet"),
    ("wgates-gradient", GateSearch("wgates", allocation="gradient"),
     f"{_WGATES}, the paper's form: widths moved by the latency loss's gradient"),
]:
    register_method(_name, partial(gate_method, how=_how), paper=_paper, gates=_how)


# -- functionality-oriented pruning (Qin et al., 2018) -----------------------------------------
FO_POOL = 4  # each channel's response maps are average-pooled to FO_POOL x FO_POOL to compare


def channel_responses(gated: GatedModel, batches: list) -> list[torch.Tensor]:
    """Per group, one row per channel: its responses at the group's gate points (the
    producers' BatchNorm outputs) over the calibration images, pooled: what the filter does."""
    rows: list[list[torch.Tensor]] = [[] for _ in gated.channel_groups]
    handles = []
    for i, group in enumerate(gated.channel_groups):
        for place in group.gate_points:
            def record(module, args, out, i=i, size=group.size, place=place):
                x = out.detach()[:, list(place.idxs)]
                x = F.adaptive_avg_pool2d(x, FO_POOL) if x.dim() == 4 else x
                x = x.transpose(0, 1).flatten(1)  # a row per channel
                block = x.new_zeros(size, x.shape[1])
                block[list(place.root_idxs)] = x
                rows[i].append(block)
            handles.append(gated.model.get_submodule(place.module).register_forward_hook(record))
    device = next(gated.parameters()).device
    try:
        with torch.no_grad():
            for x, _ in batches:
                gated.model(x.to(device))  # the wrapped model: no gate applied
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(r, dim=1).float().cpu() for r in rows]


def unit_means(gated: GatedModel, i: int, values: torch.Tensor) -> torch.Tensor:
    """Per-channel `values` of group i ([size, ...], on the CPU) averaged over each unit
    (the channels a grouped conv ties together): [n_units, ...]."""
    units = gated._units(i).cpu()
    n = gated.channel_groups[i].n_units
    counts = torch.bincount(units, minlength=n).view(n, *[1] * (values.dim() - 1))
    return values.new_zeros(n, *values.shape[1:]).index_add_(0, units, values) / counts


class FunctionClusters:
    """Each group's units (channels, or channels a grouped conv ties) clustered by how alike
    their responses are: 1 - correlation, average linkage (Qin et al. compare filters by
    what they respond to, not by their weights). Cut at distance `t`, every cluster keeps
    one representative, the unit that responds most strongly."""

    def __init__(self, gated: GatedModel, responses: list[torch.Tensor]) -> None:
        from scipy.cluster.hierarchy import linkage

        self.gated, self.trees, self.energy = gated, [], []
        for i, r in enumerate(responses):
            n = gated.channel_groups[i].n_units
            r = unit_means(gated, i, r)  # a unit responds as its channels on average
            self.energy.append(r.pow(2).mean(1))
            z = r - r.mean(1, keepdim=True)
            z = z / (z.norm(dim=1, keepdim=True) + 1e-12)
            distance = (1 - z @ z.T).clamp(0, 2).double().numpy()
            condensed = distance[np.triu_indices(n, 1)]
            self.trees.append(linkage(condensed, "average") if n > 1 else None)

    def masks(self, t: float) -> dict[str, torch.Tensor]:
        from scipy.cluster.hierarchy import fcluster

        out = {}
        for i, group in enumerate(self.gated.channel_groups):
            energy = self.energy[i]
            n = len(energy)
            labels = fcluster(self.trees[i], t, "distance") if n > 1 else np.ones(1, int)
            keep = torch.zeros(n, dtype=torch.bool)
            for label in np.unique(labels):
                members = torch.from_numpy(np.flatnonzero(labels == label))
                keep[members[energy[members].argmax()]] = True
            short = self.gated._min_units(i) - int(keep.sum())
            if short > 0:  # below the group's minimum: the strongest of the rest too
                keep[energy.masked_fill(keep, -1).topk(short).indices] = True
            out[group.name] = keep[self.gated._units(i).cpu()]
        return out


@register_method("functional", paper='Qin et al., 2018, arXiv 1810.07322, '
                 '"Functionality-Oriented Convolutional Filter Pruning" (clusters of filters '
                 'with repeated responses keep one each)')
def functional(model, example_inputs, train_loader, target: float, ctx: Context) -> nn.Module:
    """One distance cut for the whole network (so a layer with more repeated filters loses
    more), bisected on measurements for the target."""
    gated = gate(model, as_input_tuple(example_inputs), ignore=ctx.ignore, kind="plain",
                 channel_multiple=ctx.channel_multiple,
                 channel_block=ctx.channel_block).eval()
    clusters = FunctionClusters(gated, channel_responses(gated, _calibration(train_loader, ctx)))

    def build(x: float) -> nn.Module:  # x = 1: no cut (dense); x = 0: one cluster per group
        gated.clear_masks()
        gated.set_masks(clusters.masks(2.0 * (1.0 - x)))
        return gated.extract(verify=False)

    return _bisect(build, target, ctx)


# -- SCOP (Tang et al., 2020) ----------------------------------------------------------------
SCOP_LR = 0.004  # Adam on the control factors, betas (0.5, 0.9): the published code's
SCOP_BETAS = (0.5, 0.9)


def _real_half(output, n: int):
    """The first `n` samples of a model output (a tensor, a dict of them, or a tuple)."""
    if isinstance(output, torch.Tensor):
        return output[:n]
    if isinstance(output, dict):
        return {k: v[:n] for k, v in output.items()}
    return type(output)(v[:n] for v in output)


class KnockoffControl(nn.Module):
    """SCOP's control factors: per group one beta per channel in [0, 1], 0.5 at first. The
    batch runs twice, real images then their knockoffs; at each of the group's gate points
    the real half carries beta * real + (1 - beta) * knockoff (the knockoff half goes on as
    it is). Trained on the task loss of the real half, the network frozen, a channel whose
    real feature serves the task better than its knockoff ends with beta > 0.5."""

    def __init__(self, gated: GatedModel, model: nn.Module) -> None:
        super().__init__()
        device = next(model.parameters()).device
        self.points = [group.gate_points for group in gated.channel_groups]
        self.beta = nn.ParameterList(
            nn.Parameter(torch.full((group.size,), 0.5, device=device))
            for group in gated.channel_groups)
        self.handles = [
            model.get_submodule(place.module).register_forward_hook(
                partial(self._mix, i, list(place.idxs), list(place.root_idxs)))
            for i, points in enumerate(self.points) for place in points]

    def _mix(self, i: int, idxs: list[int], roots: list[int], module, args, out):
        n = out.shape[0] // 2
        beta = self.beta[i][roots].view(1, -1, *([1] * (out.dim() - 2)))
        real = out[:n].clone()
        real[:, idxs] = beta * out[:n, idxs] + (1 - beta) * out[n:, idxs]
        return torch.cat([real, out[n:]])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def knockoff_scores(gated: GatedModel, model: nn.Module, loader: Iterable, epochs: int,
                    loss_fn: LossFn = classification_loss) -> list[torch.Tensor]:
    """Per group, each channel's score 2 * beta - 1 in [-1, 1] (> 0: the real feature beat its
    knockoff) after `epochs` of training the control factors alone on `loader`. `model`:
    a frozen copy with the gated model's module names. Knockoff images: each image's
    neighbour in the batch (see docs/methods.md)."""
    control = KnockoffControl(gated, model)
    model.eval()  # BatchNorm keeps its running statistics: the knockoff half must not move them
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(control.parameters(), lr=SCOP_LR, betas=SCOP_BETAS)
    device = next(model.parameters()).device
    try:
        for _ in range(max(1, epochs)):
            for x, y in loader:
                x, n = x.to(device), x.shape[0]
                output = model(torch.cat([x, x.roll(1, 0)]))
                loss = loss_fn(_real_half(output, n), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for beta in control.beta:
                        beta.clamp_(0, 1)
    finally:
        control.remove()
    return [(2 * b.detach() - 1).cpu() for b in control.beta]


@register_method("scop", trains=True, paper='Tang et al., NeurIPS 2020, arXiv 2010.10732, '
                 '"SCOP: Scientific Control for Reliable Neural Network Pruning" (knockoff '
                 'features as a control group)')
def scop(model, example_inputs, train_loader, target: float, ctx: Context) -> nn.Module:
    """Control factors learned for `ctx.epochs` (`knockoff_scores`), then one global cut on
    the scores (a filter below it does not beat its knockoff by enough), bisected on
    measurements for the target."""
    torch.manual_seed(ctx.seed)
    gated = gate(model, as_input_tuple(example_inputs), ignore=ctx.ignore, kind="plain",
                 channel_multiple=ctx.channel_multiple,
                 channel_block=ctx.channel_block).eval()
    scores = knockoff_scores(gated, gated.plain_copy(), train_loader,
                             ctx.epochs, ctx.loss_fn)
    per_unit = [unit_means(gated, i, s) for i, s in enumerate(scores)]
    with torch.no_grad():  # a unit (channels a grouped conv ties) scores as its channels do
        for g, u in zip(gated.gates, per_unit, strict=True):
            g.value.copy_(u.to(g.value.device))  # the ranking within the group
    ctx.notes["scop_beats_knockoff"] = {  # per group, the share of filters scoring above 0
        g.name: float((s > 0).float().mean()) for g, s in zip(gated.groups, scores, strict=True)}

    def build(x: float) -> nn.Module:  # x = 0: every score under the cut; x = 1: none
        gated.clear_masks()
        gated.set_masks(threshold_masks(gated, 1.0 - 2.001 * x, per_unit))
        return gated.extract(verify=False)

    return _bisect(build, target, ctx)


# -- MetaPruning (Liu et al., 2019) -----------------------------------------------------------
@register_method("metapruning", trains=True, needs_cost=True,
                 paper='Liu et al., ICCV 2019, arXiv 1903.10258, "MetaPruning: Meta Learning '
                 'for Automatic Neural Network Channel Pruning" (a PruningNet generates the '
                 'weights; evolutionary search under LPNet)')
def metapruning(model, example_inputs, train_loader, target: float, ctx: Context) -> nn.Module:
    """PruningNet trained for `ctx.epochs` on random encodings, an evolutionary search under
    `ctx.cost`, then the best encoding measured and its widths corrected by the measurement
    (the closed loop's rule: the predicted goal scaled by aim / measured), up to 4 times."""
    from wgates.metapruning import (
        LOWEST,
        SCORE_BATCHES,
        PruningNet,
        evolve,
        on_band,
        predicted_cost,
        widths_from,
    )

    if ctx.cost is None:
        raise WgatesError("metapruning needs a latency predictor: set Context.cost")
    torch.manual_seed(ctx.seed)
    gated = l1_ranked(model, as_input_tuple(example_inputs), ctx.ignore, ctx.channel_multiple,
                      ctx.channel_block)
    groups, grid = gated.channel_groups, (gated.channel_multiple, gated.channel_block)
    net = PruningNet(gated)
    rng = np.random.default_rng(ctx.seed)

    def sample() -> dict[str, int]:  # MetaPruning's random structure: a fraction per group
        return widths_from(rng.uniform(LOWEST, 1.0, len(groups)), groups, grid)

    losses = net.fit(train_loader, ctx.epochs, sample, teacher=model if ctx.distill else None,
                     loss_fn=ctx.loss_fn)
    batches = calibration_batches(train_loader, 2 * SCORE_BATCHES)
    low, ceiling = band = accepted_band(target, ctx.tolerance)
    aim = band.middle

    ranked = evolve(lambda w: net.score(w, batches[:SCORE_BATCHES], batches[SCORE_BATCHES:]),
                    groups, lambda f: on_band(f, groups, ctx.cost, aim, grid), ctx.seed)
    widths = ranked[0][1]
    fractions = np.array([widths[g.name] / g.size for g in groups])
    steps = []
    for _ in range(4):
        small = net.materialise(widths, train_loader)
        ratio = ctx.measure(small)[0]
        steps.append({"predicted": predicted_cost(ctx.cost, groups, widths), "measured": ratio})
        if low <= ratio <= ceiling:
            break
        goal = predicted_cost(ctx.cost, groups, widths) * aim / ratio
        widths = on_band(fractions, groups, ctx.cost, goal, grid)
    ctx.notes.update(pruningnet_loss=losses, evolution=[s for s, _ in ranked[:8]],
                     metapruning_loop=steps)
    return small
