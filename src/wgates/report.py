"""The run directory's report: a Markdown page with the measured tables and its pictures.

Each `plot_*` saves one PNG and returns its (closed) figure, so a caller or a test can read
what was drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from wgates.baselines import INFO  # noqa: E402

THREADS_WHY = (
    "Only the pruned-for setting is what the search optimised: at another thread count every "
    "layer shares its work differently (a narrowed layer has less to split between threads), "
    "so the same model is another fraction of the dense one there (a CIFAR ResNet pruned to "
    "0.50 at 1 thread measured 0.57 at 2)."
)


@dataclass(frozen=True)
class Point:
    """One model on the accuracy-vs-latency picture (a benchmark adds its baselines)."""

    label: str
    latency: float  # measured latency / dense latency
    accuracy: float  # fraction


def _save(fig: Figure, path: Path) -> Figure:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_widths(widths: dict[str, int], sizes: dict[str, int], path: Path) -> Figure:
    """Kept width per group against the dense width: where the search cut."""
    names = list(sizes)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    xs = range(len(names))
    ax.bar(xs, [sizes[n] for n in names], color="#d0d0d0", label="dense")
    ax.bar(xs, [widths[n] for n in names], color="#1f77b4", label="kept")
    ax.set_xticks(list(xs), names, rotation=75, fontsize=7)
    ax.set_ylabel("channels")
    ax.legend()
    return _save(fig, path)


def result_points(result) -> list[Point]:
    """The dense and the delivered model (and the latter before its fine-tune, when known:
    same architecture, so same latency) for `plot_accuracy_latency`."""
    points = [Point("dense", 1.0, result.dense_accuracy),
              Point("pruned", result.latency_ratio, result.accuracy)]
    if result.accuracy_before_finetune == result.accuracy_before_finetune:  # not nan
        points.insert(1, Point("pruned, before fine-tune", result.latency_ratio,
                               result.accuracy_before_finetune))
    return points


def plot_accuracy_latency(points: Sequence[Point], path: Path,
                          target: float | None = None) -> Figure:
    """Accuracy against measured latency, one labelled marker per point: what the latency
    bought and cost, beside any baselines the caller adds."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        ax.scatter([p.latency], [100 * p.accuracy], s=40, label=p.label, zorder=3)
    if target is not None:
        ax.axvline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("latency / dense (measured)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(state: dict, path: Path) -> Figure:
    """Per epoch, training loss and validation accuracy, each on its own panel: the search's
    epochs, then the fine-tune's."""
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    after = len(state.get("search", []))  # the fine-tune's epochs follow the search's
    for stage, color, offset in (("search", "#1f77b4", 0), ("finetune", "#ff7f0e", after)):
        records = state.get(stage, [])
        if not records:
            continue
        epochs = [offset + r["epoch"] for r in records]
        loss.plot(epochs, [r["loss"] for r in records], marker="o", color=color, label=stage)
        scored = [(e, r["val_accuracy"]) for e, r in zip(epochs, records) if "val_accuracy" in r]
        if scored:
            acc.plot([e for e, _ in scored], [100 * a for _, a in scored], marker="o",
                     color=color, label=stage)
    for ax, title in ((loss, "training loss"), (acc, "validation accuracy (%)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch after the dense model")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_search_trace(trace: list[dict], path: Path, target: float | None = None) -> Figure:
    """The search per step: its loss, the predicted latency against the aim (and target),
    and the latency weight when the search has one (`allocation="gradient"`)."""
    panels = ["loss", "latency"] + (["lam"] if any("lam" in r for r in trace) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))

    def series(key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in trace if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    axes["loss"].plot(*series("loss"), lw=1)
    axes["latency"].plot(*series("pred"), lw=1, label="predicted")
    axes["latency"].plot(*series("aim"), ls=":", label="aim")
    if target is not None:
        axes["latency"].axhline(target, color="gray", ls="--", lw=1, label="target")
    axes["latency"].legend(fontsize=8)
    if "lam" in axes:
        axes["lam"].plot(*series("lam"), lw=1)
        axes["lam"].set_yscale("log")
    titles = {"loss": "training loss", "latency": "latency / dense (cost model)",
              "lam": "latency weight"}
    for key, ax in axes.items():
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("search step")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_latency_check(loop: list[dict], calibration: list[dict], path: Path,
                       target: float | None = None) -> Figure:
    """The cost model's prediction against the measurement for every width decision that was
    measured: the search's calibration when its ramp ended, then the closed loop's steps
    (numbered). The diagonal is a perfect cost model. Steps without a prediction (a knob
    method's bisection) are not drawn."""
    loop = [r for r in loop if "predicted" in r]
    fig, ax = plt.subplots(figsize=(5, 5))
    for rows, label, marker in ((calibration, "search, ramp end", "s"),
                                (loop, "closed loop", "o")):
        if rows:
            ax.scatter([r["measured"] for r in rows], [r["predicted"] for r in rows],
                       marker=marker, s=40, label=label, zorder=3)
    for i, r in enumerate(loop):
        ax.annotate(str(i), (r["measured"], r["predicted"]), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    values = [r[k] for r in loop + calibration for k in ("measured", "predicted")]
    if values:
        lo, hi = 0.95 * min(values), 1.05 * max(values)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    if target is not None:
        ax.axvline(target, color="gray", ls=":", lw=1, label="target")
    ax.set_xlabel("measured latency / dense")
    ax.set_ylabel("predicted latency / dense")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(run_dir: Path, result, state: dict, points: Sequence[Point] = ()) -> Path:
    """report.md and its pictures in `run_dir`; `points` are extra models (baselines) for
    the accuracy-vs-latency picture."""
    target = state.get("target_ratio")
    searched = INFO[result.method].gates is not None  # a knob method has no cost model
    plot_widths(result.widths, result.sizes, run_dir / "widths.png")
    plot_curves(state, run_dir / "curves.png")
    plot_accuracy_latency([*result_points(result), *points], run_dir / "accuracy_latency.png",
                          target)
    calibration = state.get("calibration", [])
    plot_latency_check(result.loop, calibration, run_dir / "latency_check.png", target)
    trace = state.get("search_trace", [])
    if trace:
        plot_search_trace(trace, run_dir / "search_trace.png", target)
    measured = [(f"ramp end, step {r['step']}", r) for r in calibration]
    measured += [(f"loop {i}", r) for i, r in enumerate(result.loop)]
    rows = "\n".join(
        f"| {label} | {format(r['predicted'], '.3f') if 'predicted' in r else '-'} | "
        f"{r['measured']:.3f} | {r['spread']:.3f} |" for label, r in measured)
    lpnet = state.get("lpnet")
    fit = (
        f"LPNet held-out MAPE {lpnet['mape']:.3%} (FLOPs {lpnet['flops_mape']:.3%}, lookup "
        f"table {lpnet['lut_mape']:.3%}, noise CV {lpnet['noise_cv']:.3%})\n\n"
        "![LPNet fit](lpnet_fit.png)\n"
        if lpnet else f"Cost model: {state.get('proxy')} proxy.\n" if searched else
        "None: the method's knob was bisected on measured latencies (the loop rows above).\n"
    )
    threads = f"""The delivered model at each thread count measured (batch {result.batch}), as a
fraction of the dense model timed at that same count:

```
{result.threads_table()}
```

{THREADS_WHY}
""" if len(result.at_threads) > 1 else "Measured at the pruned-for setting only.\n"
    search = ("![search per step](search_trace.png)\n" if trace
              else "No per-step trace in this run's state.\n" if searched
              else "This method does not search: it sets its widths in one shot.\n")
    text = f"""# wgates run

Method: `{result.method}`, {INFO[result.method].paper}.
Pruned for and measured on {result.deployment()} (input {state['input_shapes']}).
Target: {result.target_ratio:.3f} of the dense latency. Latencies measured, interleaved with
the dense model.

```
{result.table()}
```

![accuracy against latency](accuracy_latency.png)

## Deployment settings

{threads}
## Search, per step

{search}
## Predicted against measured latency

The cost model's prediction for each measured width decision: the search's calibration when
its ramp ended, then the closed loop's steps (numbered as in the picture).

| stage | predicted | measured | spread |
|---|---|---|---|
{rows}

![predicted against measured](latency_check.png)

## Cost model

{fit}
## Kept width per group

![widths](widths.png)

## Training

![curves](curves.png)
"""
    path = run_dir / "report.md"
    path.write_text(text)
    return path
