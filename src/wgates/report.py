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
    """Training loss / accuracy of the search and the fine-tune, and the predicted latency."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for stage in ("search", "finetune"):
        records = state.get(stage, [])
        if records:
            axes[0].plot([r["loss"] for r in records], marker="o", label=f"{stage} loss")
            axes[1].plot([r.get("val_accuracy", float("nan")) for r in records], marker="o",
                         label=f"{stage} val accuracy")
    search = state.get("search", [])
    if search and "pred" in search[0]:
        axes[1].plot([r["pred"] for r in search], marker="s", label="predicted latency ratio")
        axes[1].axhline(state["target_ratio"], color="gray", ls="--", label="target")
    for ax in axes:
        ax.set_xlabel("epoch")
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
