"""Accuracy against *measured* latency, W-Gates side by side with the alternatives.

Every method in `wgates.baselines.METHODS` prunes the same dense model to the same fraction of
its measured latency, then gets the same fine-tune; accuracy, the re-measured latency ratio,
MACs, parameters and the method's own wall time (without the shared fine-tune and the shared
LPNet profiling) are tabulated and plotted. Latency regimes are `backend@batch` (torch-cpu@1,
torch-cpu@32, onnxruntime-cpu@1), one thread. With `budget_epochs`, every method gets the same
training after the dense model: a gate method's search epochs count against it, a knob
method fine-tunes for all of it. Dense models and latency profiles are cached under
benchmarks/cache/ (not for git).

The data: `--data cifar10:<root>` or the environment variable WGATES_CIFAR10=<root>, a
CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg) or a torchvision root
holding cifar-10-batches-py (https://www.cs.toronto.edu/~kriz/cifar.html).

    python benchmarks/cifar10.py --quick          # ResNet-20, target 0.5, 1 seed, ~10 min
    python benchmarks/cifar10.py --regime --dense-weights \
        resnet20=benchmarks/weights/resnet20_cifar10.safetensors --resume   # issue 11's grid
    python benchmarks/cifar10.py --full           # 3 models x 3 targets x 3 seeds
    python benchmarks/cifar10.py --full --resume     # skip the rows already in results/

Each row also records the accuracy right after pruning (before the fine-tune) and the kept
width of every conv layer, which is where a method's loss shows up first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
from lanes import Lanes
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from wgates.baselines import METHODS, SEARCH_METHODS, Context
from wgates.data import EpochShuffle, loader_on, make_loaders, subset_of
from wgates.extract import PLAN_ATTR, load_pruned, save_pruned
from wgates.gated import gate
from wgates.latency import Protocol, get_backend, profile, settled
from wgates.macs import MacsModel
from wgates.models import create_model
from wgates.parts import LatencyMeter
from wgates.predictor import count, fit_file
from wgates.train import evaluate, recalibrate_bn, train

HERE = Path(__file__).resolve().parent


@dataclass
class Settings:
    """One benchmark configuration; `MODES` holds the two CIFAR ones, imagenet.py its own."""

    models: dict[str, dict]  # label -> {"spec": ..., "weights": ..., "kwargs": {...}}
    targets: list[float]
    methods: list[str]
    seeds: list[int]
    backends: dict[str, list[str]]  # model label -> latency regimes, "backend" or "backend@batch"
    data: str | None = None  # None: cifar10:$WGATES_CIFAR10
    subset: int | None = None  # training samples used (None: all)
    val_subset: int | None = None  # validation samples used (None: all)
    batch_size: int = 128
    workers: int = 0
    image_size: int | None = None
    device: str = "cpu"
    dense_epochs: int = 0  # > 0: train (and cache) a dense model when no weights are given
    dense_lr: float = 0.1
    search_epochs: int = 1
    finetune_epochs: int = 1
    budget_epochs: int | None = None  # training after the dense model, search epochs included
    lr: float = 0.01
    gate_lr: float = 0.05
    finetune_lr: float = 0.01
    distill: bool = False  # distil from the dense model (fine-tune, and gate searches)
    allocation: str = "knapsack"  # how the gate searches set the widths
    ramp: float | None = None
    floor: float = 0.0
    importance: str = "taylor"
    depth: bool = False  # gate searches may drop residual blocks (wgates.depth)
    blocks: list[int] = field(default_factory=list)  # the closed loop widens to these blocks
    tolerance: float = 0.05
    lpnet_samples: int = 150
    prior_decay: float | None = None  # LPNet's decay towards its MACs prior (None: the default)
    protocol_rounds: int = 60
    max_wait_s: float = 300.0  # how long a measurement may wait out a contended machine
    num_classes: int | None = None
    channel_multiple: int | None = None  # widths delivered in multiples of it, blocks of it
    # above one block (None: the backend's `width_grid`)
    channel_block: int | None = None  # ... and in whole blocks of this above one (None: as above)
    isolated: bool = False  # measure in a process that never trains (wgates.latency.worker)
    processes: int = Protocol.processes  # isolated: each model read in this many, mean kept
    remember: bool = False  # pool readings across runs in the profile (LatencyMeter.remember)

    def protocol(self) -> Protocol:
        return Protocol(rounds=self.protocol_rounds, max_wait_s=self.max_wait_s,
                        processes=self.processes)

    def finetune_for(self, method: str) -> int:
        """Fine-tune epochs of `method`: what the budget leaves after its search."""
        if self.budget_epochs is None:
            return self.finetune_epochs
        return self.budget_epochs - (self.search_epochs if method in SEARCH_METHODS else 0)


def regime(spec: str) -> tuple[str, int]:
    """'torch-cpu@32' -> ('torch-cpu', 32); a bare backend name is batch 1."""
    backend, _, batch = spec.partition("@")
    return backend, int(batch or 1)


CIFAR_MODELS = {m: {"spec": m} for m in ("resnet20", "resnet56", "mobilenetv2_cifar")}
MODES = {
    "quick": Settings(
        models={"resnet20": CIFAR_MODELS["resnet20"]}, targets=[0.5], methods=list(METHODS),
        seeds=[0], backends={"resnet20": ["torch-cpu"]}, subset=512, val_subset=512,
        dense_epochs=2,
        search_epochs=1, finetune_epochs=1, lpnet_samples=24, protocol_rounds=20,
        max_wait_s=30.0, tolerance=0.08,
    ),
    "regime": Settings(  # issue 11: a dense model trained properly, full data, equal budgets
        models={"resnet20": CIFAR_MODELS["resnet20"]}, targets=[0.5, 0.7],
        methods=["wgates", "uniform", "l1", "tp-l2", "tp-taylor"], seeds=[0, 1, 2],
        backends={"resnet20": ["torch-cpu@1", "torch-cpu@32", "onnxruntime-cpu@1"]},
        search_epochs=3, budget_epochs=6, distill=True, lpnet_samples=150, floor=0.25,
        blocks=[16, 8], isolated=True, remember=True,
    ),
    "full": Settings(
        models=CIFAR_MODELS, targets=[0.7, 0.5, 0.35], methods=list(METHODS), seeds=[0, 1, 2],
        backends={"resnet20": ["torch-cpu", "onnxruntime-cpu"], "resnet56": ["torch-cpu"],
                  "mobilenetv2_cifar": ["torch-cpu"]},
        dense_epochs=160, search_epochs=10, finetune_epochs=30, lpnet_samples=300,
    ),
}


def fingerprint(settings: Settings) -> dict:
    """The machine and software the numbers come from (latency is only valid there)."""
    import torch_pruning

    backends = sorted({regime(b)[0] for bs in settings.backends.values() for b in bs})
    return {
        **get_backend(backends[0]).fingerprint(),
        "backends": backends,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_pruning": torch_pruning.__version__,
        "load_avg_at_start": os.getloadavg(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def dense_model(label: str, entry: dict, settings: Settings, loaders, num_classes: int,
                cache: Path, weights: str | None) -> nn.Module:
    """The given weights, else a cached dense training, else train now (and cache)."""
    spec, kwargs = entry["spec"], entry.get("kwargs", {})
    weights = weights or entry.get("weights")
    if weights is None and settings.dense_epochs > 0:
        name = f"{label}_e{settings.dense_epochs}_n{settings.subset or 'all'}.safetensors"
        path = cache / name
        if not path.exists():
            model = create_model(spec, num_classes, **kwargs).to(settings.device)
            torch.manual_seed(0)
            train(model, loaders[0], settings.dense_epochs, lr=settings.dense_lr, desc="dense")
            cache.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, path)
        weights = str(path)
    return create_model(spec, num_classes, weights, **kwargs).to(settings.device).eval()


def latency_predictor(dense: nn.Module, shape: list[int], backend: str, settings: Settings,
                      path: Path) -> nn.Module:
    """LPNet for this model and backend, from a (resumable, cached) latency profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run = profile(copy.deepcopy(dense).cpu(), shape, path, samples=settings.lpnet_samples,
                  backend=backend, protocol=settings.protocol(),
                  channel_multiple=settings.channel_multiple,
                  channel_block=settings.channel_block, depth=settings.depth)
    gated = gate(copy.deepcopy(dense).cpu(), (torch.randn(1, *shape[1:]),),
                 depth=settings.depth)
    decay = {} if settings.prior_decay is None else {"prior_decay": settings.prior_decay}
    return fit_file(path, run, macs=MacsModel.of(gated), first=settings.lpnet_samples,
                    **decay).predictor.requires_grad_(False)


def profile_path(cache: Path, label: str, backend: str, shape: list[int]) -> Path:
    """Where one (model, backend, input shape)'s latency profile is cached."""
    return cache / f"{label}_{backend}_{tuple(shape)}.sqlite"


def make_measure(dense: nn.Module, inputs: tuple, backend_name: str, protocol: Protocol,
                 alone: Callable[[], AbstractContextManager] = nullcontext,
                 profile: Path | None = None, isolated: bool = False, remember: bool = False):
    """ratio of a model's latency to the dense one's, timed interleaved on `backend_name`,
    each measurement inside `alone()` (`Lanes.alone`: the other benchmark lanes paused);
    the dense model's time of the last measurement is kept as `measure.dense_ms` (rows
    record it: ratios taken in sessions whose dense model timed differently, on another
    host, are not comparable). `profile`: the latency profile of this model and backend,
    whose readings tell the meter the dense model's time at rest (`LatencyMeter.seed_quiet`).
    `isolated`: as `LatencyMeter`'s (after training pruned shapes, this process reads them
    ~2% slower than a new one does). `remember`: keep the readings in `profile` and pool
    them with earlier runs' (`LatencyMeter.remember`); not for a re-measurement, which must
    be independent of the run's own readings."""
    meter = LatencyMeter(dense, inputs, backend_name, protocol=protocol, isolated=isolated)
    if profile is not None:
        meter.seed_quiet(profile)
        if remember:
            meter.remember(profile)

    def measure(model: nn.Module) -> tuple[float, float]:
        with alone():
            m = meter.read(model)
        measure.dense_ms = m.dense_ms
        return m.ratio, m.spread

    measure.dense_ms = float("nan")
    return measure


def row_key(row: dict) -> tuple:
    return (row["model"], row["backend"], row.get("batch", 1), row["target"], row["method"],
            row["seed"])


def conv_widths(model: nn.Module, dense: nn.Module | None = None) -> list[int]:
    """Output channels of each conv, in module order; with `dense`, one entry per conv of
    `dense`, 0 for a conv that a dropped block took away (`wgates.depth`)."""
    if dense is None:
        return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    have = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return [have.get(n, 0) for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)]


def model_dir(models: Path, row: dict) -> Path:
    """Where a row's pruned model is kept (`save_pruned`), under its run's models folder."""
    return models / (f"{row['model']}_{row['backend']}@{row.get('batch', 1)}_{row['target']}_"
                     f"{row['method']}_{row['seed']}")


def run_model(label: str, dense: nn.Module, loaders, settings: Settings, cache: Path,
              shape: list[int], log=print, on_row=None, done: list[dict] = (),
              models: Path | None = None,
              alone: Callable[[], AbstractContextManager] = nullcontext) -> list[dict]:
    """Every (regime, target, method, seed) of one dense model: one row each; `on_row(rows)`
    after each, so that a long run's results are on disk as they come. Rows in `done` (a
    resumed run's) are kept and not run again. The pruned models are kept in `models`
    (default <cache>/models) for `--remeasure`. Latency is measured inside `alone()`."""
    train_loader, val_loader = loaders
    rows = [r for r in done if r["model"] == label]
    have = {row_key(r) for r in rows}
    regimes = [regime(spec) for spec in settings.backends[label]]
    missing = [(b, n) for b, n in regimes if (label, b, n, 1.0, "dense", 0) not in have]
    if missing:
        dense_inputs = (torch.randn(shape).to(settings.device),)
        dense_macs, dense_params = count(dense, dense_inputs)
        accuracy = evaluate(dense, val_loader)
        rows += [{"model": label, "backend": b, "batch": n, "target": 1.0, "method": "dense",
                  "seed": 0, "accuracy": accuracy, "accuracy_pruned": accuracy, "ratio": 1.0,
                  "macs": dense_macs, "params": dense_params, "wall_s": 0.0,
                  "widths": conv_widths(dense)} for b, n in missing]
    for backend, batch in regimes:
        todo = [(t, m, s) for t in settings.targets for m in settings.methods
                for s in settings.seeds if (label, backend, batch, t, m, s) not in have]
        if not todo:
            continue
        at = [batch, *shape[1:]]
        inputs = (torch.randn(at).to(settings.device),)
        start = time.perf_counter()
        with alone():  # profiling is measuring too: no other lane trains meanwhile
            cost = latency_predictor(dense, at, backend, settings,
                                     profile_path(cache, label, backend, at))
        log(f"{label} {backend}@{batch}: LPNet profile + fit {time.perf_counter() - start:.0f} s")
        measure = make_measure(dense, inputs, backend, settings.protocol(), alone,
                               profile_path(cache, label, backend, at), settings.isolated,
                               remember=settings.remember)
        multiple, block = get_backend(backend).width_grid(settings.channel_multiple,
                                                          settings.channel_block)
        for target, method, seed in todo:
            ctx = Context(measure=measure, cost=cost, epochs=settings.search_epochs,
                          lr=settings.lr, gate_lr=settings.gate_lr,
                          tolerance=settings.tolerance, seed=seed, distill=settings.distill,
                          allocation=settings.allocation, ramp=settings.ramp,
                          floor=settings.floor, importance=settings.importance,
                          blocks=tuple(settings.blocks), val_loader=val_loader,
                          channel_multiple=multiple, channel_block=block,
                          depth=settings.depth)
            torch.manual_seed(seed)
            if isinstance(train_loader.sampler, EpochShuffle):  # the data order is the seed's
                train_loader.sampler.seed = seed
            start = time.perf_counter()
            small = METHODS[method](dense, inputs, train_loader, target, ctx)
            wall = time.perf_counter() - start
            before = evaluate(small, val_loader)
            before_bn = evaluate(recalibrate_bn(copy.deepcopy(small), train_loader), val_loader)
            torch.manual_seed(seed)
            train(small, train_loader, settings.finetune_for(method), lr=settings.finetune_lr,
                  teacher=dense if settings.distill else None, desc=f"fine-tune {method}",
                  progress=False)
            macs, params = count(small, inputs)
            row = {"model": label, "backend": backend, "batch": batch, "target": target,
                   "method": method, "seed": seed, "accuracy": evaluate(small, val_loader),
                   "accuracy_pruned": before, "accuracy_pruned_bn": before_bn,
                   "ratio": settled(measure, small)[0], "dense_ms": measure.dense_ms,
                   "macs": macs,
                   "params": params, "wall_s": wall, "widths": conv_widths(small, dense),
                   "input_shape": at[1:],
                   "finetune_epochs": settings.finetune_for(method), "channel_multiple": multiple,
                   "channel_block": block,
                   **ctx.notes}
            if hasattr(small, PLAN_ATTR):  # kept for re-measuring later (--remeasure)
                save_pruned(small, model_dir(models or cache / "models", row))
            rows.append(row)
            log(json.dumps(row))
            if on_row is not None:
                on_row(rows)
    return rows


def regime_label(row: dict) -> str:
    """'torch-cpu@32' for rows that record their batch (older results: the backend alone)."""
    return f"{row['backend']}@{row['batch']}" if "batch" in row else row["backend"]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (and std of accuracy) over seeds per (model, regime, target, method)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], regime_label(r), r["target"], r["method"])].append(r)
    out = []
    for (model, backend, target, method), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        out.append({
            "model": model, "backend": backend, "target": target, "method": method,
            "n": len(rs), "acc": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            **{k: statistics.mean(r.get(f"accuracy_{k[4:]}", float("nan")) for r in rs)
               for k in ("acc_pruned", "acc_pruned_bn")},
            **{k: statistics.mean(r[k] for r in rs) for k in ("ratio", "macs", "params",
                                                              "wall_s")},
            "ratio_quiet": statistics.mean(r.get("ratio_quiet", float("nan")) for r in rs),
        })
    return out


def paired(rows: list[dict], ours: str = "wgates") -> str:
    """Per (model, regime, target): `ours` minus the best alternative (the knob method with
    the highest mean), seed by seed, over the seeds both have; '' when there is none."""
    summary = [s for s in summarise(rows) if s["method"] not in SEARCH_METHODS | {"dense"}]
    lines = []
    for key in sorted({(s["model"], s["backend"], s["target"]) for s in summary}):
        alts = [s for s in summary if (s["model"], s["backend"], s["target"]) == key]
        best = max(alts, key=lambda s: s["acc"])["method"]
        by_seed = {(r["method"], r["seed"]): r["accuracy"] for r in rows
                   if (r["model"], regime_label(r), r["target"]) == key}
        seeds = sorted(s for m, s in by_seed if m == ours and (best, s) in by_seed)
        if not seeds:
            continue
        diffs = [100 * (by_seed[(ours, s)] - by_seed[(best, s)]) for s in seeds]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:.2f} | {best} | {len(seeds)} | "
                     + " / ".join(f"{d:+.2f}" for d in diffs)
                     + f" | {statistics.mean(diffs):+.2f} ± {spread:.2f} |")
    if not lines:
        return ""
    return (f"{ours} minus the best alternative, paired by seed (points):\n\n"
            "| model | regime | target | best alternative | seeds | per seed | mean ± std |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n")


def widths_table(rows: list[dict]) -> str:
    """Kept conv widths per row, where a method's allocation shows, with the dense model's
    time in the run and alone (which host and conditions the ratios belong to)."""
    nan = float("nan")
    lines = [f"| {r['model']} | {regime_label(r)} | {r['target']:.2f} | {r['method']} | "
             f"{r['seed']} | {' '.join(map(str, r['widths']))} | "
             f"{r.get('dense_ms', nan):.3f} / {r.get('dense_ms_quiet', nan):.3f} |"
             for r in rows if "widths" in r]
    return ("Kept conv widths per row:\n\n| model | regime | target | method | seed | widths "
            "| dense ms (run / alone) |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines)
            + "\n\n") if lines else ""


def table(summary: list[dict]) -> str:
    head = ("| model | backend | target | method | seeds | accuracy (%) | before fine-tune (%) "
            "| before f-t, BN re-estimated (%) | measured latency ratio | re-measured alone "
            "| MMACs | params (K) | method wall (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {s['model']} | {s['backend']} | {s['target']:.2f} | {s['method']} | {s['n']} | "
        f"{100 * s['acc']:.2f} ± {100 * s['acc_std']:.2f} | {100 * s['acc_pruned']:.2f} | "
        f"{100 * s['acc_pruned_bn']:.2f} | "
        f"{s['ratio']:.3f} | {s['ratio_quiet']:.3f} | "
        f"{s['macs'] / 1e6:.2f} | {s['params'] / 1e3:.1f} | {s['wall_s']:.0f} |\n"
        for s in summary
    )


def pivot(summary: list[dict]) -> str:
    """One line per method, one column per target: 'accuracy (measured ratio)', the view the
    README shows; '' when there is a single target."""
    targets = sorted({s["target"] for s in summary if s["method"] != "dense"}, reverse=True)
    if len(targets) < 2:
        return ""
    cells = {(s["model"], s["backend"], s["method"], s["target"]): s for s in summary}
    lines = ["| model | backend | method | " + " | ".join(f"target {t:.2f}" for t in targets)
             + " |", "|---|---|---|" + "---|" * len(targets)]
    for model, backend, method in dict.fromkeys(
            (s["model"], s["backend"], s["method"]) for s in summary if s["method"] != "dense"):
        row = [cells.get((model, backend, method, t)) for t in targets]
        lines.append(f"| {model} | {backend} | {method} | " + " | ".join(
            f"{100 * c['acc']:.2f} ({c['ratio']:.3f})" if c else "" for c in row) + " |")
    return ("Accuracy % (measured latency ratio) by target:\n\n" + "\n".join(lines)
            + "\n\n")


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Accuracy against measured latency ratio, one line per method across targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for s in summary:
        by_method[s["method"]].append(s)
    for method, points in sorted(by_method.items()):
        points.sort(key=lambda s: s["ratio"])
        ax.errorbar([p["ratio"] for p in points], [100 * p["acc"] for p in points],
                    yerr=[100 * p["acc_std"] for p in points], marker="*" if method == "dense"
                    else "o", capsize=3, label=method, lw=2.5 if method == "wgates" else 1)
    ax.set_xlabel("measured latency / dense latency (batch 1)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recorded_run(out: Path, names: list[str]) -> tuple[Settings, str] | None:
    """The settings and command that made the results files `names` (<name>.run.json), when
    they all share them: a re-measurement or a merge reports the run, not itself."""
    records = [json.loads(p.read_text()) if (p := out / f"{n}.run.json").exists() else None
               for n in names]
    if records[0] is None or any(r != records[0] for r in records):
        return None
    unknown = sorted(set(records[0]["settings"]) - set(Settings.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"{out / names[0]}.run.json has settings this script no longer "
                         f"knows ({', '.join(unknown)}): remove them from the file, or "
                         "re-measure with the version of this script that made it")
    return Settings(**records[0]["settings"]), records[0]["command"]


def write_results(rows: list[dict], settings: Settings, out: Path, name: str,
                  command: str, dataset: str, then: str | None = None) -> Path:
    """<name>.md (table, fingerprint, command, settings), <name>.json (raw rows),
    <name>.run.json (command and settings, for `recorded_run`) and one plot per (model,
    backend). `then`: the command that re-measured or merged the rows afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    plots = []
    for model, backend in sorted({(s["model"], s["backend"]) for s in summary}):
        png = out / f"{name}_{model}_{backend}.png"
        plot([s for s in summary if (s["model"], s["backend"]) == (model, backend)], png,
             f"{model} on {dataset}, {backend}")
        plots.append(png)
    settings_json = json.dumps(settings.__dict__, indent=1, default=str)
    text = (
        f"# {dataset}: accuracy vs measured latency ({name})\n\n"
        f"Command: `{command}`\n\n" + (f"Then: `{then}`\n\n" if then else "")
        + f"{pivot(summary)}{table(summary)}\n"
        "Accuracy after the same fine-tune for every method; mean ± std over seeds; 'before "
        "fine-tune': right after the method (for the gate methods, after their search and "
        "closed loop); 'BN re-estimated': the same model after its BatchNorm statistics are "
        "re-estimated on 50 training batches, no training (the gate methods do this themselves "
        "when the closed loop changed the searched widths). Latency "
        "ratio: re-measured after fine-tuning, interleaved with the dense model; 're-measured "
        "alone': the kept model measured again afterwards with nothing else running "
        "(`--remeasure`; nan: not kept or not re-measured). Method wall "
        "time excludes the shared fine-tune and the shared LPNet profiling. "
        + ("" if settings.budget_epochs is None else
           f"Budget: {settings.budget_epochs} epochs after the dense model for every method "
           f"({settings.search_epochs} of them search epochs for the gate methods). ")
        + f"Distillation from the dense model: {'on' if settings.distill else 'off'}.\n\n"
        + paired(rows) + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        + f"\n{widths_table(rows)}## Machine\n\n"
        f"```json\n{json.dumps(fingerprint(settings), indent=1)}\n```\n"
        f"\n## Settings\n\n```json\n{settings_json}\n```\n"
    )
    md = out / f"{name}.md"
    md.write_text(text)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.run.json").write_text(
        json.dumps({"command": command, "settings": settings.__dict__}, indent=1, default=str))
    return md


def limited(loader: DataLoader, n: int | None, shuffle: bool) -> DataLoader:
    """`loader` over `n` of its samples, spread evenly (so every class shows up)."""
    if n is None:
        return loader
    return DataLoader(subset_of(loader.dataset, n), batch_size=loader.batch_size,
                      shuffle=shuffle, num_workers=loader.num_workers,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


def run(settings: Settings, weights: dict[str, str], out: Path, name: str, cache: Path,
        dataset: str, resume: bool = False,
        alone: Callable[[], AbstractContextManager] = nullcontext) -> Path:
    """Every model of `settings`; with `resume`, the rows already in <out>/<name>.json are
    kept and not run again (the results files are rewritten after every row). Latency is
    measured inside `alone()`."""
    train_loader, val_loader, info = make_loaders(
        settings.data, settings.batch_size, settings.workers, None, settings.image_size)
    train_loader = limited(train_loader, settings.subset, shuffle=True)
    val_loader = limited(val_loader, settings.val_subset, shuffle=False)
    if torch.device(settings.device).type == "cuda":  # the images held and augmented there
        train_loader, val_loader = (loader_on(x, settings.device)
                                    for x in (train_loader, val_loader))
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    previous = out / f"{name}.json"
    done = json.loads(previous.read_text()) if resume and previous.exists() else []
    rows: list[dict] = [r for r in done if r["model"] not in settings.models]
    for label, entry in settings.models.items():
        dense = dense_model(label, entry, settings, (train_loader, val_loader),
                            settings.num_classes or info.num_classes, cache, weights.get(label))
        before = list(rows)
        rows = before + run_model(
            label, dense, (train_loader, val_loader), settings, cache, [1, *info.input_shape],
            done=done, models=cache / "models" / name, alone=alone,
            on_row=lambda new, before=before:
            write_results(before + new, settings, out, name, command, dataset))
    return write_results(rows, settings, out, name, command, dataset)


def at_widths(dense: nn.Module, widths: list[int], inputs: tuple) -> nn.Module | None:
    """`dense` pruned to the per-conv output `widths` of a results row (`conv_widths`; which
    channels it keeps does not matter for latency); None where they do not map onto its groups.
    Why: a row's latency depends on its architecture only, so a row whose kept model is gone
    (another machine, a cleared cache) can still be re-measured."""
    convs = [n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    if len(widths) != len(convs):
        return None
    gated = gate(dense, inputs, verify=False, depth=0 in widths)
    wanted = {}
    for group in gated.channel_groups:
        at = [convs.index(p.module) for p in group.producers if p.module in convs]
        if at:
            wanted[group.name] = widths[at[0]]
    gated.set_masks(gated.masks_for_widths(wanted))
    small = gated.extract(verify=False).eval()
    return small if conv_widths(small, dense) == list(widths) else None


def remeasure(settings: Settings, weights: dict[str, str], out: Path, names: list[str],
              cache: Path, repeats: int = 5,
              alone: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Re-measure every kept pruned model of the results files `names` against its dense
    model, one after another, each in new processes that never trained (`IsolatedMeter`:
    `settings.processes` of them, new for each row; run it with nothing else on the
    machine), and add the figure to each row as `ratio_quiet` (and the dense model's time,
    `dense_ms_quiet`).
    Why: a row's ratio is measured while the run goes on, often beside another run, and
    ratios from another session (another host) are not comparable; a figure taken alone, with
    the host's dense time beside it, says which latency the rows really compare at. With
    benchmark lanes, `alone` pauses them while each figure is taken."""
    for name in names:
        rows = json.loads((out / f"{name}.json").read_text())
        for label in sorted({r["model"] for r in rows}):
            entry = settings.models[label]
            build = partial(create_model, entry["spec"], settings.num_classes or 10,
                            **entry.get("kwargs", {}))
            dense = build(weights.get(label) or entry.get("weights")).eval()
            for row in rows:
                if row["model"] != label or row["method"] == "dense":
                    continue
                found = [d for d in (model_dir(cache / "models" / name, row),
                                     model_dir(cache / "models", row)) if d.exists()]
                if found:
                    small = load_pruned(build(), found[0]).eval()
                    shape = getattr(small, PLAN_ATTR).input_shapes[0][1:]
                else:  # the kept model is gone: latency needs only its architecture
                    shape = row.get("input_shape", [3, 32, 32])  # older rows: CIFAR images
                    small = at_widths(dense, row["widths"], (torch.randn(1, *shape),))
                    if small is None:
                        print(f"{name}: {label} {row['method']} seed {row['seed']}: no kept "
                              "model and its widths do not map onto the groups; skipped")
                        continue
                row["quiet_from"] = "model" if found else "widths"
                inputs = (torch.randn(row.get("batch", 1), *shape),)
                measure = make_measure(dense, inputs, row["backend"], settings.protocol(),
                                       alone, profile_path(cache, label, row["backend"],
                                                           list(inputs[0].shape)),
                                       isolated=True)
                row["ratio_quiet"] = settled(measure, small, repeats=repeats)[0]
                row["dense_ms_quiet"] = measure.dense_ms
                print(f"{name}: {label} {row['method']} seed {row['seed']}: "
                      f"{row['ratio']:.3f} in the run, {row['ratio_quiet']:.3f} alone")
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))


def merged(files: list[Path]) -> list[dict]:
    """The rows of several results files, each (model, regime, target, method, seed) once
    (the first file that has it wins)."""
    rows, seen = [], set()
    for file in files:
        for row in json.loads(file.read_text()):
            if row_key(row) not in seen:
                seen.add(row_key(row))
                rows.append(row)
    return rows


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`--set key=JSON` items applied to a dict of Settings fields; a value that is not JSON
    is taken as a string (`--set importance=loss`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in Settings.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: give key=JSON with a key of Settings")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def profile_all(settings: Settings, cache: Path) -> None:
    """The latency profile of every (model, regime), on untrained weights: the cache that
    `run_model` reads, so a grid started afterwards skips the profiling."""
    for label, entry in settings.models.items():
        model = create_model(entry["spec"], settings.num_classes or 10, **entry.get("kwargs", {}))
        for backend, batch in (regime(spec) for spec in settings.backends[label]):
            at = [batch, 3, 32, 32]  # CIFAR images
            start = time.perf_counter()
            latency_predictor(model.eval(), at, backend, settings,
                              profile_path(cache, label, backend, at))
            print(f"{label} {backend}@{batch}: profile + fit {time.perf_counter() - start:.0f} s")


def data_spec(given: str | None, parser: argparse.ArgumentParser) -> str:
    """--data, else cifar10:$WGATES_CIFAR10; neither: say where the data comes from."""
    if given:
        return given
    root = os.environ.get("WGATES_CIFAR10")
    if root:
        return f"cifar10:{os.path.expanduser(root)}"
    parser.error("no data: pass --data cifar10:<root> or set WGATES_CIFAR10=<root> (a CIFAR-10 "
                 "ImageFolder tree or a torchvision root with cifar-10-batches-py; see the "
                 "README, 'Benchmarks')")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke: ResNet-20, 0.5, 1 seed")
    mode.add_argument("--regime", action="store_true",
                      help="issue 11: ResNet-20, 3 latency regimes, 0.5 and 0.7, 3 seeds, "
                      "6 epochs after the dense model")
    mode.add_argument("--full", action="store_true", help="3 models x 3 targets x 3 seeds")
    parser.add_argument("--data", default=None,
                        help="data spec, e.g. cifar10:~/cifar10 (default: cifar10:"
                        "$WGATES_CIFAR10)")
    parser.add_argument("--dense-weights", action="append", default=[], metavar="MODEL=PATH",
                        help="reuse a trained dense model (repeatable)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of "
                        + ",".join(METHODS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a setting of the mode, e.g. --set finetune_epochs=3")
    parser.add_argument("--name", help="results file name (default cifar10_<mode>)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in <out>/<name>.json and run only the rest")
    parser.add_argument("--profile-only", action="store_true",
                        help="only measure (or resume) the latency profiles of every model and "
                        "regime, into --cache: they depend on the architecture, not the weights, "
                        "so they can run beside the dense training")
    parser.add_argument("--remeasure", nargs="+", default=[], metavar="NAME",
                        help="re-measure the kept pruned models of these results files one by "
                        "one (run it alone on the machine), add the figures to their rows and "
                        "rewrite the file (several files: combined into --name)")
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="run as one of several benchmark processes on this machine that "
                        "share DIR: every latency measurement pauses the other lanes "
                        "(benchmarks/lanes.py), so no figure is taken beside a training")
    parser.add_argument("--merge", nargs="+", default=[], metavar="NAME",
                        help="only combine the rows of these results files (e.g. of two runs "
                        "side by side, one thread each) into <name>, and write it")
    args = parser.parse_args(argv)
    name = "full" if args.full else "regime" if args.regime else "quick"
    settings = Settings(**apply_overrides(dict(vars(copy.deepcopy(MODES[name]))), args.set))
    if not (args.merge or args.remeasure or args.profile_only):  # the only modes that read it
        settings.data = data_spec(args.data or settings.data, parser)
    if args.methods:
        settings.methods = args.methods.split(",")
        unknown = set(settings.methods) - set(METHODS)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    if len(args.remeasure) > 1 and not args.name:  # before any measuring: where would it go?
        parser.error("--remeasure with several results files writes them as one: name it with "
                     "--name (or re-measure one file at a time, each rewritten in place)")
    weights = dict(w.split("=", 1) for w in args.dense_weights)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    run_command, run_settings = None, settings
    if args.remeasure or args.merge:  # the run's own settings (with --set on top), if recorded
        recorded = recorded_run(args.out, args.remeasure or args.merge)
        if recorded:
            run_settings, run_command = recorded
            settings = Settings(**apply_overrides(dict(vars(run_settings)), args.set))
    if args.remeasure:
        remeasure(settings, weights, args.out, args.remeasure, args.cache, alone=alone)
        args.merge = args.merge or args.remeasure
    if args.merge:
        rows = merged([args.out / f"{n}.json" for n in args.merge])
        default = args.remeasure[0] if args.remeasure else f"cifar10_{name}"
        # the files keep the run's settings: --set here changed only the re-measurement,
        # which the "Then:" line records
        md = write_results(rows, run_settings, args.out, args.name or default,
                           run_command or command, "CIFAR-10", then=run_command and command)
        print(md.read_text())
        return
    if args.profile_only:
        profile_all(settings, args.cache)
        return
    md = run(settings, weights, args.out, args.name or f"cifar10_{name}", args.cache, "CIFAR-10",
             args.resume, alone)
    print(md.read_text())


if __name__ == "__main__":
    main()
