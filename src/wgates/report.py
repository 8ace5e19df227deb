"""The run directory's report: a Markdown page with the measured table and three plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_widths(widths: dict[str, int], sizes: dict[str, int], path: Path) -> None:
    """Kept width per group against the dense width: where the search cut."""
    names = list(sizes)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    xs = range(len(names))
    ax.bar(xs, [sizes[n] for n in names], color="#d0d0d0", label="dense")
    ax.bar(xs, [widths[n] for n in names], color="#1f77b4", label="kept")
    ax.set_xticks(list(xs), names, rotation=75, fontsize=7)
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(state: dict, path: Path) -> None:
    """Per epoch: training loss, validation accuracy, and the search's predicted latency
    against its aim and the target, one quantity per panel."""
    fig, (loss, acc, lat) = plt.subplots(1, 3, figsize=(13, 3.5))
    after = len(state.get("search", []))  # the fine-tune's epochs follow the search's
    for stage, color, offset in (("search", "#1f77b4", 0), ("finetune", "#ff7f0e", after)):
        records = state.get(stage, [])
        epochs = [offset + r["epoch"] for r in records]
        if records:
            loss.plot(epochs, [r["loss"] for r in records], marker="o", color=color,
                      label=stage)
        if any("val_accuracy" in r for r in records):
            acc.plot(epochs, [100 * r.get("val_accuracy", float("nan")) for r in records],
                     marker="o", color=color, label=stage)
    search = state.get("search", [])
    if search and "pred" in search[-1]:
        epochs = [r["epoch"] for r in search]
        lat.plot(epochs, [r["pred"] for r in search], marker="s", label="predicted (LPNet)")
        if "aim" in search[-1]:
            lat.plot(epochs, [r["aim"] for r in search], ls=":", label="aim")
    if "target_ratio" in state:
        lat.axhline(state["target_ratio"], color="gray", ls="--", label="target")
    for ax, title in ((loss, "training loss"), (acc, "validation accuracy (%)"),
                      (lat, "latency / dense, end of epoch")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch after the dense model")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, result, state: dict) -> Path:
    plot_widths(result.widths, result.sizes, run_dir / "widths.png")
    plot_curves(state, run_dir / "curves.png")
    loop = "\n".join(
        f"| {i} | {s['predicted']:.3f} | {s['measured']:.3f} | {s['spread']:.3f} |"
        for i, s in enumerate(result.loop)
    )
    lpnet = state.get("lpnet")
    fit = (
        f"LPNet held-out MAPE {lpnet['mape']:.3%} (FLOPs {lpnet['flops_mape']:.3%}, lookup "
        f"table {lpnet['lut_mape']:.3%}, noise CV {lpnet['noise_cv']:.3%})\n\n"
        "![LPNet fit](lpnet_fit.png)\n"
        if lpnet else f"Cost model: {state.get('proxy')} proxy.\n"
    )
    text = f"""# wgates run

Target: {result.target_ratio:.3f} of the dense latency on {state['backend']}
({state['threads']} thread(s), input {state['input_shapes']}). Latencies measured, interleaved
with the dense model.

```
{result.table()}
```

## Closed loop (latency ratio to dense)

| step | predicted | measured | spread |
|---|---|---|---|
{loop}

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
