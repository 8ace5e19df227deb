"""`wgates.prune`: the whole job in one call, each stage checkpointed in a run directory.

dense latency -> cost model (LPNet from measured samples, or a FLOPs / params proxy) ->
gate search -> extract + closed loop on the hardware -> fine-tune -> measure, save, export.
A stage whose output is already in the run directory is skipped, so `resume` continues a
killed run from its last finished stage (and the search / fine-tune from their last epoch).

`method` picks any method of `wgates.baselines.METHODS`: a gate method changes the search
(its `GateSearch`); a knob method (uniform, L1, Torch-Pruning) replaces the cost model, the
search and the closed loop by its knob, bisected on this run's measurements. The rest (the
fine-tune, the measured result, the run directory and the report) is the same for all.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from wgates import distributed
from wgates.allocate import lowest_units
from wgates.baselines import METHODS, Context, method_info
from wgates.defaults import PRUNE, deployment_threads, depth_for
from wgates.errors import WgatesError
from wgates.export import export_onnx
from wgates.extract import PLAN_ATTR, PruningPlan, apply_plan, load_pruned, save_pruned
from wgates.files import load_checkpoint, save_checkpoint, write_json
from wgates.gated import gate
from wgates.groups import as_input_tuple
from wgates.latency import Protocol, check_readings, get_backend, profile, settled
from wgates.latency.grid import AUTO, BlockProbe, check_block, probe_block
from wgates.macs import MacsModel
from wgates.models import check_forward
from wgates.parts import PROXIES, LatencyMeter, LatencyTerm, measure_threads
from wgates.predictor import (
    LatencyPredictor,
    check_fingerprint,
    check_groups,
    count,
    fit_file,
    fit_proxy,
)
from wgates.search import (
    ALLOCATIONS,
    Cost,
    check_blocks,
    confirmed,
    parse_target,
    search,
    search_optimizers,
)
from wgates.train import (
    LossFn,
    StepTrace,
    classification_loss,
    evaluate,
    finetune,
    make_optimizer,
    place,
)

TRACE_POINTS = 500  # at most about this many steps of the search go into its per-step trace


@dataclass
class PruneResult:
    """What `prune` delivers; every latency here was measured on the backend."""

    model: nn.Module
    latency_ms: float
    dense_latency_ms: float
    latency_ratio: float
    target_ratio: float
    accuracy: float
    dense_accuracy: float
    macs: int
    dense_macs: int
    params: int
    dense_params: int
    widths: dict[str, int]
    sizes: dict[str, int]
    run_dir: Path
    method: str = PRUNE.method
    loop: list[dict] = field(default_factory=list)  # the closed loop's (or knob's) measurements
    accuracy_before_finetune: float = float("nan")  # right after the search and closed loop
    backend: str = "torch-cpu"  # the deployment the model was pruned for
    threads: int = PRUNE.threads
    batch: int = 1
    at_threads: list[dict] = field(default_factory=list)  # `measure_threads`, pruned-for first

    def deployment(self) -> str:
        return f"{self.backend}, batch {self.batch}, {self.threads} thread(s)"

    def table(self) -> str:
        rows = [
            ("", "dense", "pruned", "ratio"),
            ("latency (ms)", f"{self.dense_latency_ms:.3f}", f"{self.latency_ms:.3f}",
             f"{self.latency_ratio:.3f}"),
            ("accuracy", f"{self.dense_accuracy:.4f}", f"{self.accuracy:.4f}",
             f"{self.accuracy - self.dense_accuracy:+.4f}"),
            ("  before f-t", "", f"{self.accuracy_before_finetune:.4f}", ""),
            ("MACs", f"{self.dense_macs:,}", f"{self.macs:,}",
             f"{self.macs / self.dense_macs:.3f}"),
            ("params", f"{self.dense_params:,}", f"{self.params:,}",
             f"{self.params / self.dense_params:.3f}"),
        ]
        return "\n".join(f"{a:<14}{b:>14}{c:>14}{d:>10}" for a, b, c, d in rows)

    def threads_table(self) -> str:
        """The delivered model at each measured thread count, as a ratio to the dense model
        timed at that same count; the pruned-for count is marked."""
        lines = [f"{'threads':<16}{'latency / dense':>16}{'spread':>8}{'dense ms':>10}"]
        for row in self.at_threads:
            mark = " (pruned for)" if row["threads"] == self.threads else ""
            lines.append(f"{str(row['threads']) + mark:<16}{row['ratio']:>16.3f}"
                         f"{row['spread']:>8.3f}{row['dense_ms']:>10.3f}")
        by_threads = sorted(self.at_threads, key=lambda r: r["threads"])
        if any(a["dense_ms"] < b["dense_ms"] for a, b in zip(by_threads, by_threads[1:])):
            lines.append("the dense model ran slower with more threads: they had no free "
                         "cores here, so those rows are\nnot deployment figures (re-measure on "
                         "a quiet machine with `wgates measure`)")
        return "\n".join(lines)


class _Run:
    """The run directory: JSON state plus one file per finished stage. `settings` are what
    the run was started with; resuming with different ones is refused before any work."""

    def __init__(self, path: Path, resume: bool, settings: dict) -> None:
        self.path = path
        self.state_file = path / "state.json"
        self.state = distributed.once("open the run directory",
                                      lambda: self._open(resume, settings))

    @staticmethod
    def check_free(path: Path, resume: bool) -> None:
        """Refuse a run directory that holds something unless the run is resumed."""
        if path.exists() and any(path.iterdir()) and not resume:
            raise WgatesError(f"run directory {path} is not empty: pass resume=True (--resume) "
                              "to continue it, or choose another directory")

    def _open(self, resume: bool, settings: dict) -> dict:
        path = self.path
        self.check_free(path, resume)
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        before = state.get("settings", settings)
        differ = [f"{k} was {before.get(k)!r}, now {v!r}" for k, v in settings.items()
                  if before.get(k) != v]
        if differ:
            raise WgatesError(f"resuming {path} with other settings than it was made with: "
                              + "; ".join(differ) + ": use the same ones, or another run "
                              "directory")
        path.mkdir(parents=True, exist_ok=True)
        state["settings"] = settings
        write_json(self.state_file, state)
        return state

    def save(self, **values) -> None:
        """Every rank updates its copy of the state (they agree); rank 0 writes it."""
        self.state.update(values)
        if distributed.is_main():
            write_json(self.state_file, self.state)


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    train_loader,
    val_loader,
    target_latency: float | str = 0.5,
    backend: str = "torch-cpu",
    epochs: int = PRUNE.epochs,
    finetune_epochs: int = PRUNE.finetune_epochs,
    run_dir: str | Path = "runs/prune",
    proxy: str = "latency",
    method: str = PRUNE.method,
    samples: int = PRUNE.samples,
    predictor: str | Path | None = None,
    threads: int = PRUNE.threads,
    tolerance: float = PRUNE.tolerance,
    lr: float = PRUNE.lr,
    gate_lr: float = PRUNE.gate_lr,
    finetune_lr: float = PRUNE.finetune_lr,
    distill: bool = PRUNE.distill,
    allocation: str = PRUNE.allocation,
    ramp: float = PRUNE.ramp,
    floor: float = PRUNE.floor,
    importance: str = PRUNE.importance,
    depth: bool | None = PRUNE.depth,
    resume: bool = False,
    export: bool = True,
    progress: bool = True,
    seed: int = 0,
    force_predictor: bool = False,
    loss_fn: LossFn = classification_loss,
    check_threads: Sequence[int] = PRUNE.check_threads,
    kind: str | None = None,
    channel_multiple: int | None = None,
    channel_block: int | str | None = None,
    blocks: Sequence[int] = PRUNE.blocks,
    isolated: bool = PRUNE.isolated,
    readings: str | Path | None = None,
    device: torch.device | str | None = None,
) -> PruneResult:
    """Prune `model` to `target_latency` (a fraction of its measured latency, or '8ms') on
    `backend`, keeping as much accuracy as the given epochs allow. See the module docstring.

    `method`: a name in `wgates.baselines.METHODS` (`wgates methods`); what a gate method
    fixes (GDP's gates and latency gradient, the FLOPs proxy of `wgates-flops`) overrides
    `proxy` and `allocation`, and a knob method reads none of the search's settings;
    `allocation`, `ramp`, `floor`, `importance`: how the search sets the widths
    (`wgates.search`);
    `depth`: a gate method may also drop residual blocks, a block's inner group going to no
    channel (`wgates.depth`; where latency is overhead-bound a block costs more than its
    channels); default (None): at batch 1, or where widths move in channel blocks
    (`wgates.defaults.depth_for`);
    `distill`: the dense model teaches the search and the fine-tune;
    `loss_fn`: the task's loss for the search and the fine-tune, `loss_fn(output, target)`,
    called as `loss_fn(output, target, teacher_output)` when distilling (default: cross-entropy
    on the logits, distilled as in `wgates.train.distillation_loss`); `accuracy` stays
    top-1 (per pixel for a segmentation target);
    `threads` and the batch of `example_inputs`: the deployment the widths are searched and
    measured for; `check_threads`: other thread counts the delivered model is measured at
    too, against the dense model at the same count (`measure_threads`; () for none);
    `force_predictor`: use a `predictor` file measured on another machine, backend, thread
    count or batch (refused by default, naming what differs);
    `channel_multiple`: deliver every width as a multiple of it (default: the backend's
    `width_grid`: on onnxruntime-cpu multiples of 8 up to its kernels' channel block, 16 on
    an AVX-512 host, and whole blocks above, where other widths run slower; any width
    elsewhere);
    `channel_block`: deliver widths above this many channels in whole multiples of it
    (default: the backend's grid), where measurements (`benchmarks/width_steps.py`) show a
    runtime computing channels in blocks, e.g. torch-cpu at batch 32 on an AVX-512 host, whose
    convs cost the same at 17 to 32 channels (docs/design.md, "torch-cpu's blocks at batch
    32"); "auto": the block this model's latency steps in here, measured before anything
    else (`wgates.latency.grid.probe_block`; kept in the run directory for a resume), or the
    backend's own grid where none is found;
    `blocks` (e.g. (16, 8)): once the closed loop has delivered a gate method's widths, widen
    each group to the end of its block of that many channels where the measured latency stays
    in the band (`wgates.search.widen_to_blocks`: CPU kernels compute channels in blocks, and
    at batch 32 the widths up to a block's end are nearly free);
    `isolated`: latency is measured in a process of its own that never trains
    (`LatencyMeter`): after training pruned shapes, this process reads them ~2% slow;
    `readings`: the latency file where every measurement of a pruned model is kept and
    pooled with the earlier ones of the same architecture (`LatencyMeter.remember`; default
    the run directory's latency.sqlite): give runs on one machine the same file, and a
    repeated run reads what the earlier ones did instead of deciding on its own noise;
    `device`: where the search and the fine-tune train (the model is moved there, in
    channels_last on CUDA, and trains in bf16 autocast; default: where its parameters are);
    latency is measured on `backend`'s own device, on a copy;
    `kind`: the earlier name of `method` for the gate kinds ("wgates", "plain", "gdp"), kept
    so that existing calls go on working.

    Bad input is refused before the run directory is made (`preflight`); a target the model
    cannot reach here (below the latency with every group at its narrowest, or a time at or
    above the dense latency) right after measuring, before profiling, and a run directory
    this call made is then removed."""
    if kind is not None:
        warnings.warn("wgates.prune(kind=...) is now method=...", DeprecationWarning,
                      stacklevel=2)
        method = kind
    info = method_info(method)
    if proxy not in PROXIES:
        raise WgatesError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    if allocation not in ALLOCATIONS:
        raise WgatesError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if info.gates:
        proxy, allocation = info.gates.settings(proxy, allocation)
    check_block(channel_block)
    torch.manual_seed(seed)
    if device is not None:
        place(model, device)
    here = next(model.parameters()).device
    inputs = tuple(x.to(here) for x in as_input_tuple(example_inputs))
    probed = None
    if channel_block == AUTO:  # what would refuse the run after the probe, refused before it
        check_forward(model, inputs)
        _Run.check_free(Path(run_dir), resume)
        probed = _probed_block(model, inputs, backend, threads, Path(run_dir), resume,
                               channel_multiple)
        channel_block = probed.channel_block
    multiple, block = get_backend(backend, threads).width_grid(channel_multiple, channel_block)
    depth = depth_for(depth, inputs[0].shape[0], multiple, block)
    dense = model.eval()
    preflight(dense, inputs, target_latency=target_latency, backend=backend, threads=threads,
              method=method, predictor=predictor, force_predictor=force_predictor,
              channel_multiple=channel_multiple, channel_block=channel_block, blocks=blocks,
              readings=readings, depth=depth)
    path = Path(run_dir)
    # a run directory this call makes (or finds empty) is emptied again if the target is
    # refused after measuring: it would hold nothing but block the next run
    made_here = distributed.is_main() and (not path.exists() or not any(path.iterdir()))
    keep_dir = path.is_dir()
    run = _Run(path, resume, {
        "model": f"{type(model).__name__} {weights_digest(model)}",
        "input_shapes": [list(x.shape) for x in inputs], "target_latency": str(target_latency),
        "backend": backend, "threads": threads, "method": method, "proxy": proxy,
        "predictor": None if predictor is None else str(predictor), "samples": samples,
        "allocation": allocation, "ramp": ramp, "floor": floor, "importance": importance,
        "distill": distill, **({"depth": True} if depth and info.gates else {}),
        "epochs": epochs, "finetune_epochs": finetune_epochs, "lr": lr, "gate_lr": gate_lr,
        "finetune_lr": finetune_lr, "tolerance": tolerance, "seed": seed,
        **({"channel_multiple": multiple} if multiple > 1 else {}),
        **({"channel_block": block} if block > multiple else {}),
        **({"blocks": list(blocks)} if blocks else {}),
    })
    if probed is not None:
        run.save(grid_probe=probed.state())

    measure = LatencyMeter(dense, inputs, backend, threads, Protocol(),  # used on rank 0 only
                           isolated=isolated)

    try:  # what needs a measurement: a target this model cannot reach is refused here
        if "dense_ms" not in run.state:
            dense_ms = distributed.once("measure the dense model", measure.dense_ms)
            run.save(dense_ms=dense_ms, dense_accuracy=evaluate(dense, val_loader),
                     backend=backend, threads=threads,
                     input_shapes=[list(x.shape) for x in inputs])
        target = parse_target(target_latency, run.state["dense_ms"])
        run.save(target_ratio=target, target_latency=str(target_latency),
                 proxy=proxy if info.gates else None, method=method, kind=info.kind,
                 allocation=allocation, ramp=ramp, floor=floor, importance=importance,
                 distill=distill)

        torch.manual_seed(seed)  # the gates' first weights, whatever ran before (a resumed
        gated = gate(model, inputs, kind=info.kind,  # run skips the measurements above)
                     channel_multiple=multiple, channel_block=block,
                     depth=depth and info.gates is not None)
        lowest = lowest_floor(method, allocation, floor)
        if "min_ratio" not in run.state:
            run.save(min_ratio=distributed.once("measure the narrowest model", lambda: (
                smallest_ratio(gated, measure, lowest, target, tolerance))))
        refuse_unreachable(target_latency, target, run.state["min_ratio"],
                           run.state["dense_ms"], lowest, backend)
    except WgatesError:
        if made_here:
            _discard(path, keep_dir)
        raise
    teacher = dense if distill else None
    cost = (_cost_model(gated, proxy, predictor, run, inputs, backend, threads, samples,
                        progress, force_predictor) if info.needs_cost else None)
    if distributed.is_main() and (run.path / "latency.sqlite").is_file():
        measure.seed_quiet(run.path / "latency.sqlite")  # the host at rest, as profiled
    measure.remember(run.path / "latency.sqlite" if readings is None else readings)
    if info.gates is None:
        def choose() -> tuple[nn.Module, list[dict], dict]:
            return _knob_method(method, dense, inputs, train_loader, target, measure,
                                tolerance, seed, loss_fn, (multiple, block), epochs, cost,
                                distill)
    else:
        total = epochs * len(train_loader)
        optimizers = search_optimizers(gated, total, lr, gate_lr)
        trace = StepTrace(every=max(1, total // TRACE_POINTS))
        term = LatencyTerm(gated, cost, target, total, measure=measure, tolerance=tolerance,
                           allocation=allocation, ramp=ramp, floor=floor,
                           importance=importance, loader=train_loader, loss_fn=loss_fn)
        regulariser = (info.gates.regulariser(gated, total) if info.gates.regulariser
                       else None)
        parts = {"model": gated, "loss": term, "trace": trace,
                 **{f"optimizer{i}": o for i, o in enumerate(optimizers)},
                 **({"regulariser": regulariser} if regulariser else {})}
        _resumable_stage(
            run, "search", parts, epochs,
            lambda **resume: search(gated, cost, term.aim, train_loader, epochs,
                                    progress=progress, optimizers=optimizers, loss=term.control,
                                    regulariser=regulariser, teacher=teacher,
                                    val_loader=val_loader, loss_fn=loss_fn, on_step=trace,
                                    seed=seed, **resume))
        run.save(search_trace=trace.steps)

        def choose() -> tuple[nn.Module, list[dict], dict]:
            small, steps = term.close_loop(loader=train_loader, blocks=blocks)
            return small, [asdict(s) for s in steps], {"calibration": term.calibration}

    pruned_dir = run.path / "pruned"

    def close_the_loop() -> dict:
        """On rank 0: the widths measured into the band (the closed loop, or a knob
        method's bisection), the pruned model saved; the state's new entries."""
        if (pruned_dir / "pruning.json").exists():
            return {}
        small, loop, more = choose()
        save_pruned(small, pruned_dir)
        return {"loop": loop, **more, "accuracy_before_finetune": evaluate(small, val_loader)}

    run.save(**distributed.once("closed loop on the hardware", close_the_loop))
    small = place(_shared_pruned(gated.plain_copy(), pruned_dir), here)  # dense, re-pruned

    optimizer = make_optimizer(small.parameters(), finetune_lr)
    _resumable_stage(run, "finetune", {"model": small, "optimizer": optimizer}, finetune_epochs,
                     lambda **resume: finetune(
                         small, train_loader, finetune_epochs, val_loader=val_loader,
                         optimizers=[optimizer], teacher=teacher, loss_fn=loss_fn,
                         progress=progress, seed=seed, **resume))

    def measure_delivered() -> tuple[float, float, list[dict]]:
        """The delivered figure at the pruned-for thread count, then the other counts."""
        ratio, spread = settled(measure, small)
        others = [t for t in deployment_threads(threads, check_threads) if t != threads]
        return ratio, spread, [
            {"threads": threads, "ratio": ratio, "spread": spread,
             "dense_ms": measure.meter.quiet_ms},
            *measure_threads(dense, small, inputs, others, backend, Protocol(),
                             isolated=measure.isolated)]

    final_ratio, spread, at_threads = distributed.once("measure the pruned model",
                                                       measure_delivered)
    macs, params = count(small, inputs)
    dense_macs, dense_params = count(dense, inputs)
    widths = {n: len(k) for n, k in small.wgates_plan.kept.items()}
    result = PruneResult(
        model=small.eval(), latency_ms=final_ratio * run.state["dense_ms"],
        dense_latency_ms=run.state["dense_ms"], latency_ratio=final_ratio, target_ratio=target,
        accuracy=evaluate(small, val_loader), dense_accuracy=run.state["dense_accuracy"],
        macs=macs, dense_macs=dense_macs, params=params, dense_params=dense_params,
        widths=widths, sizes=dict(small.wgates_plan.sizes), run_dir=run.path, method=method,
        loop=run.state.get("loop", []),
        accuracy_before_finetune=run.state.get("accuracy_before_finetune", float("nan")),
        backend=backend, threads=threads, batch=int(inputs[0].shape[0]), at_threads=at_threads,
    )
    run.save(result={k: v for k, v in asdict(result).items() if k != "model"},
             final_spread=spread, finished=time.strftime("%Y-%m-%d %H:%M:%S"))

    def deliver() -> None:
        from wgates.report import write_report

        save_pruned(small, run.path / "model")
        if export:
            export_onnx(small, inputs, run.path / "model.onnx")
        write_report(run.path, result, run.state)

    distributed.once("write the pruned model", deliver)
    return result


def preflight(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    *,
    target_latency: float | str = 0.5,
    backend: str = "torch-cpu",
    threads: int = PRUNE.threads,
    method: str = PRUNE.method,
    predictor: str | Path | None = None,
    force_predictor: bool = False,
    allocation: str = PRUNE.allocation,
    floor: float = PRUNE.floor,
    tolerance: float = PRUNE.tolerance,
    measure: bool = False,
    channel_multiple: int | None = None,
    channel_block: int | str | None = None,
    blocks: Sequence[int] = PRUNE.blocks,
    readings: str | Path | None = None,
    depth: bool | None = PRUNE.depth,
) -> None:
    """The checks `prune` makes before any work, each refusing in one line: the method's
    name; the target's form and range; that the model runs on the inputs (`check_forward`);
    that it has channel groups to prune (`gate`); that a `predictor` file was measured for
    this model on this machine, backend, thread count and batch (unless `force_predictor`);
    that each of `blocks` is a multiple of the delivered channel multiple (`check_blocks`);
    that a `readings` file is a latency file, or can be made (`check_readings`).
    With `measure` (the command line, before it trains a dense model) the untrained model's
    dense latency and the latency with every group at its narrowest are measured too, and
    a target they put out of reach is refused: latency does not depend on the weights'
    values.

    The global random state is left as it was (the gates made here are thrown away)."""
    info = method_info(method)
    parse_target(target_latency)  # its form and range, before any work or run directory
    check_block(channel_block)
    meter_backend = get_backend(backend, threads)
    # "auto" is measured by `prune` itself: checked here on the grid without a block
    multiple, block = meter_backend.width_grid(
        channel_multiple, None if channel_block == AUTO else channel_block)
    check_blocks(blocks, multiple)
    if readings is not None:
        check_readings(readings)
    inputs = as_input_tuple(example_inputs)
    check_forward(model, inputs)
    depth = depth_for(depth, inputs[0].shape[0], multiple, block)
    with torch.random.fork_rng(devices=[]):
        modes = [(m, m.training) for m in model.modules()]
        try:
            # droppable blocks matter only to the narrowest model measured below and to
            # whether a given predictor has seen them dropped
            gated = gate(model.eval(), inputs, kind=info.kind, channel_multiple=multiple,
                         channel_block=block, depth=depth and info.gates is not None
                         and (measure or predictor is not None))
        except WgatesError as err:
            if "no prunable channel group" not in str(err):
                raise
            raise WgatesError(
                f"{err}: wgates prunes the output channels of convolutions (and linear layers) "
                "that feed other layers; give a model with such layers, and check what it "
                "finds with `wgates inspect --model ...`") from None
        finally:
            for module, training in modes:
                module.training = training
        if predictor is not None:
            expected = meter_backend.fingerprint_at(inputs[0].shape)
            names = [g.name for g in gated.groups]
            distributed.once("check the latency predictor", lambda: _check_predictor(
                predictor, expected, names, force_predictor, bool(gated.droppable)))
        if measure:
            distributed.once("measure the dense and the narrowest model", lambda: (
                _measure_reachable(gated, inputs, threads, target_latency, backend,
                                   lowest_floor(method, allocation, floor), tolerance)))



def _probed_block(model: nn.Module, inputs: tuple, backend: str, threads: int, path: Path,
                  resume: bool, multiple: int | None) -> BlockProbe:
    """`channel_block="auto"`: the block `probe_block` finds for this model here, or the one
    a resumed run found (a second probe could read otherwise and refuse the resume)."""
    state = path / "state.json"
    if resume and state.exists():
        recorded = json.loads(state.read_text()).get("grid_probe")
        if recorded is not None:
            return BlockProbe.from_state(recorded)
    found = distributed.once("probe the channel block", lambda: probe_block(
        model, inputs, backend, threads, multiple=multiple))
    if distributed.is_main():
        print(found.summary())
    return found


def _check_predictor(path, expected: dict, names: list[str], force: bool,
                     drops: bool) -> None:
    """Refuse a predictor from elsewhere or for other groups; warn when the search may drop
    blocks (`drops`) and the predictor's profile never did: its MACs prior's layers term was
    fitted at one value, so it prices a dropped block by its MACs alone, and at batch 1 a
    block costs more than that (docs/design.md, "Depth")."""
    net = LatencyPredictor.load(path)
    check_fingerprint(net, expected, path, force=force)
    check_groups(net, names)
    profiled = net.fingerprint.get("groups")
    if drops and profiled and all(low > 0 for *_, low in profiled):
        warnings.warn(f"wgates: {path} was profiled without dropping residual blocks, and this "
                      "search may drop them: it prices a dropped block by its MACs alone. "
                      "Profile with `wgates profile --depth` and fit again, or prune with "
                      "--no-depth (depth=False)", stacklevel=2)


def _measure_reachable(gated, inputs, threads, target_latency, backend, floor,
                       tolerance) -> None:
    measure = LatencyMeter(gated.plain_copy().eval(), inputs, backend, threads, Protocol())
    dense_ms = measure.dense_ms()
    target = parse_target(target_latency, dense_ms)
    low = smallest_ratio(gated, measure, floor, target, tolerance)
    refuse_unreachable(target_latency, target, low, dense_ms, floor, backend)


def lowest_floor(method: str, allocation: str, floor: float) -> float:
    """The floor `method` keeps to: the knapsack's `floor`; none for the latency gradient
    (groups may fall to their minimum channels) or a knob method (its knob's low end takes
    the groups to their minimum)."""
    gates = method_info(method).gates
    if gates is None:
        return 0.0
    return floor if gates.settings("latency", allocation)[1] == "knapsack" else 0.0


def _knob_method(method: str, dense: nn.Module, inputs: tuple, loader, target: float,
                 measure: LatencyMeter, tolerance: float, seed: int,
                 loss_fn: LossFn, grid: tuple[int, int] = (1, 1), epochs: int = 1,
                 cost: Cost | None = None,
                 distill: bool = False) -> tuple[nn.Module, list[dict], dict]:
    """A knob method's model (`wgates.baselines`): its knob bisected on this run's
    measurements, a reading near the band settled as the closed loop settles its own (so
    both land in the same band by the same test). Every measurement is a step of `loop`.
    `grid`: (multiple, block) of the delivered widths (`Backend.width_grid`);
    `epochs`, `cost`, `distill`: for a method that trains (SCOP, MetaPruning) or reads the
    latency predictor (MetaPruning)."""
    steps: list[dict] = []

    def measured(model: nn.Module) -> tuple[float, float]:
        ratio, spread = confirmed(measure, model, (1 - tolerance) * target,
                                  (1 + tolerance) * target)
        steps.append({"measured": ratio, "spread": spread})
        return ratio, spread

    torch.manual_seed(seed)
    ctx = Context(measure=measured, tolerance=tolerance, seed=seed, loss_fn=loss_fn,
                  channel_multiple=grid[0], channel_block=grid[1], epochs=epochs, cost=cost,
                  distill=distill)
    small = METHODS[method](dense, inputs, loader, target, ctx)
    return small, steps, ctx.notes


def smallest_ratio(gated, measure, floor: float, target: float = math.nan,
                   tolerance: float = PRUNE.tolerance) -> float:
    """The measured latency ratio of the narrowest model the search may deliver: every group
    at `floor` of its width (at least its minimum channels; a droppable block dropped,
    `wgates.depth`). A reading near `target` is
    confirmed by `settled` (noise must not decide). The global random state is untouched."""
    n_units = [g.n_units for g in gated.channel_groups]
    min_units = [gated._min_units(i) for i in range(len(gated.channel_groups))]
    units = [0 if m == 0 else u for m, u in zip(min_units, lowest_units(n_units, min_units,
                                                                           floor))]
    widths = {g.name: u * g.size // g.n_units
              for g, u in zip(gated.channel_groups, units, strict=True)}
    with torch.random.fork_rng(devices=[]):
        gated.clear_masks()
        gated.set_masks(gated.masks_for_widths(widths))
        try:
            narrow = gated.extract(verify=False).eval()
        finally:
            gated.clear_masks()
        ratio = measure(narrow)[0]
        if (1 - tolerance) * target <= ratio <= (1 + tolerance) * target:
            ratio = settled(measure, narrow)[0]
    return float(ratio)


def refuse_unreachable(target_latency, target: float, min_ratio: float, dense_ms: float,
                       floor: float, backend: str) -> None:
    """Refuse a target under `min_ratio`, the measured latency of the narrowest model."""
    if target >= min_ratio:
        return
    narrowest = (f"{floor:g} of its width (--floor {floor:g})" if floor > 0
                 else "its minimum channels")
    least = math.ceil(min_ratio * 100) / 100
    raise WgatesError(
        f"target latency {target_latency!r} is {target:.3f} of the dense latency, below the "
        f"fastest this model gets on {backend}: {min_ratio:.3f} of the dense {dense_ms:.3f} ms, "
        f"measured with every channel group at {narrowest}; give a target of at least "
        f"{least:.2f}" + (", or a lower --floor" if floor > 0 else "")
    )


def _discard(path: Path, keep_dir: bool) -> None:
    """Empty a run directory this call made or found empty; remove it if it made it."""
    if not distributed.is_main() or not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if not keep_dir:
        path.rmdir()


def weights_digest(model: nn.Module) -> str:
    """A short digest of the model's parameters and buffers: which dense model a run prunes."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _resumable_stage(run: _Run, name: str, parts: dict, epochs: int, fit) -> None:
    """Run `fit(start_epoch=..., on_epoch_end=...)`, checkpointing every part (the model, its
    optimizers, the latency weight: anything with state_dict / load_state_dict) after every
    epoch to `<run>/<name>.pt`, and continuing from there when the file exists. A part the
    file lacks (the search's step trace, in a run begun before it was recorded) starts empty."""
    file = run.path / f"{name}.pt"
    start = 0
    blob = distributed.once(f"read {file.name}",
                            lambda: load_checkpoint(file) if file.exists() else None)
    if blob is not None:  # every rank continues from rank 0's copy
        for key, part in parts.items():
            if key in blob["state"]:
                part.load_state_dict(blob["state"][key])
        start = int(blob["epoch"])
    if start >= epochs:
        return

    def checkpoint(epoch: int, record: dict) -> None:
        if distributed.is_main():
            state = {key: part.state_dict() for key, part in parts.items()}
            save_checkpoint({"state": state, "epoch": epoch + 1}, file)
        run.save(**{name: run.state.get(name, [])[:epoch] + [record]})

    fit(start_epoch=start, on_epoch_end=checkpoint)


def _shared_pruned(base: nn.Module, path: Path) -> nn.Module:
    """`load_pruned(base, path)` of rank 0's saved model, on every rank (no shared disk
    needed: rank 0 reads it and sends plan and weights)."""
    loaded: list[nn.Module] = []  # rank 0's model, read once

    def read() -> tuple[dict, dict]:
        loaded.append(load_pruned(base, path))
        return asdict(getattr(loaded[0], PLAN_ATTR)), loaded[0].state_dict()

    plan, state = distributed.once(f"read {path}", read)
    if loaded:
        return loaded[0]
    small = apply_plan(base, PruningPlan(**plan))
    small.load_state_dict(state)
    return small


def _cost_model(gated, proxy, predictor, run, inputs, backend, threads, samples, progress,
                force_predictor):
    """A callable kept-counts -> cost ratio, differentiable, for the search and the loop:
    made on rank 0 (profiling measures the hardware) and sent to the others."""
    net = distributed.once("latency predictor", lambda: _fit_cost_model(
        gated, proxy, predictor, run, inputs, backend, threads, samples, progress,
        force_predictor))
    run.state.update(distributed.broadcast({k: run.state[k] for k in ("lpnet",)
                                            if k in run.state}))
    check_groups(net, [g.name for g in gated.groups])
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _fit_cost_model(gated, proxy, predictor, run, inputs, backend, threads, samples, progress,
                    force_predictor):
    lpnet_file = run.path / "lpnet.pt"
    if predictor is not None:
        net = LatencyPredictor.load(predictor)
    elif proxy != "latency":
        net = fit_proxy(gated, proxy)
    elif lpnet_file.exists():  # a resumed run: it may have been moved to another machine
        net = LatencyPredictor.load(lpnet_file)
        check_fingerprint(net, get_backend(backend, threads).fingerprint_at(inputs[0].shape),
                          lpnet_file,
                          force=force_predictor, advice=f"resume it on the machine it began "
                          f"on, or delete {lpnet_file} to profile this one")
    else:
        db = run.path / "latency.sqlite"
        prof = profile(gated.plain_copy(), list(inputs[0].shape), db, samples=samples,
                       backend=backend, threads=threads, progress=progress,
                       channel_multiple=gated.channel_multiple,
                       channel_block=gated.channel_block, depth=bool(gated.droppable))
        comparison = fit_file(db, prof, macs=MacsModel.of(gated))
        net = comparison.predictor
        net.save(lpnet_file)
        run.save(lpnet={k: v for k, v in comparison.metrics.items() if k != "predictors"})
        from wgates.predictor import plot_comparison

        plot_comparison(comparison, run.path / "lpnet_fit.png")
    return net
