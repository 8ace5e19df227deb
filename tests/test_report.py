"""The run directory's Markdown report and its pictures (rendered from a small, consistent
fake result; each plot's figure is read back to check what was drawn)."""

from __future__ import annotations

import numpy as np
from torch import nn

from wgates.pipeline import PruneResult
from wgates.report import (
    THREADS_WHY,
    Point,
    plot_accuracy_latency,
    plot_curves,
    plot_latency_check,
    plot_search_trace,
    result_points,
    write_report,
)

LOOP = [{"threshold": float("nan"), "predicted": 0.62, "measured": 0.71, "spread": 0.02},
        {"threshold": 0.1, "predicted": 0.45, "measured": 0.49, "spread": 0.01}]
CALIBRATION = [{"step": 5, "predicted": 0.48, "measured": 0.55, "spread": 0.03}]
AT_THREADS = [{"threads": 1, "ratio": 0.5, "spread": 0.01, "dense_ms": 8.0},
              {"threads": 2, "ratio": 0.57, "spread": 0.02, "dense_ms": 5.0}]


def _result(tmp_path, loop, **kwargs):
    return PruneResult(
        model=nn.Identity(), latency_ms=4.0, dense_latency_ms=8.0, latency_ratio=0.5,
        target_ratio=0.5, accuracy=0.9, dense_accuracy=0.95, macs=500, dense_macs=1000,
        params=40, dense_params=100, widths={"a": 8, "b": 16}, sizes={"a": 16, "b": 32},
        run_dir=tmp_path, loop=loop, **kwargs,
    )


def _trace(lam: bool) -> list[dict]:
    return [{"step": s, "loss": 2.0 - 0.1 * s, "pred": 1.0 - 0.05 * s, "aim": 1.0 - 0.04 * s,
             **({"lam": 1.0 + s} if lam else {})} for s in range(0, 10, 2)]


STATE = {
    "backend": "torch-cpu", "threads": 1, "input_shapes": [[1, 1, 32, 32]], "proxy": "flops",
    "target_ratio": 0.5, "calibration": CALIBRATION, "search_trace": _trace(lam=False),
    "search": [{"epoch": 1, "loss": 2.0, "pred": 0.7, "val_accuracy": 0.5},
               {"epoch": 2, "loss": 1.0, "pred": 0.5, "val_accuracy": 0.8}],
    "finetune": [{"epoch": 1, "loss": 0.5, "val_accuracy": 0.9}],
}
PICTURES = ("widths.png", "curves.png", "accuracy_latency.png", "search_trace.png",
            "latency_check.png")


def test_write_report(tmp_path):
    result = _result(tmp_path, LOOP, accuracy_before_finetune=0.7, at_threads=AT_THREADS)
    path = write_report(tmp_path, result, STATE)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert result.table() in text
    assert "Pruned for and measured on torch-cpu, batch 1, 1 thread(s)" in text
    assert "Target: 0.500 of the dense latency" in text
    assert "| loop 0 | 0.620 | 0.710 | 0.020 |" in text
    assert "| loop 1 | 0.450 | 0.490 | 0.010 |" in text
    assert "| ramp end, step 5 | 0.480 | 0.550 | 0.030 |" in text
    assert "Cost model: flops proxy." in text
    assert "## Deployment settings" in text and result.threads_table() in text
    assert THREADS_WHY in text
    for png in PICTURES:
        assert f"]({png})" in text, png
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_threads_table_marks_the_pruned_for_count(tmp_path):
    lines = _result(tmp_path, [], at_threads=AT_THREADS, threads=1).threads_table().splitlines()
    assert lines[0].split() == ["threads", "latency", "/", "dense", "spread", "dense", "ms"]
    assert lines[1].split() == ["1", "(pruned", "for)", "0.500", "0.010", "8.000"]
    assert lines[2].split() == ["2", "0.570", "0.020", "5.000"] and len(lines) == 3
    # more threads, a slower dense model: the machine had no core for them, and says so
    busy = [AT_THREADS[0], {**AT_THREADS[1], "ratio": 1.0, "dense_ms": 150.0}]
    text = _result(tmp_path, [], at_threads=busy).threads_table()
    assert "ran slower with more threads" in text and "not deployment figures" in text
    assert _result(tmp_path, [], batch=8, threads=4).deployment() == (
        "torch-cpu, batch 8, 4 thread(s)")


def test_table_values(tmp_path):
    lines = _result(tmp_path, []).table().splitlines()
    assert lines[1].split() == ["latency", "(ms)", "8.000", "4.000", "0.500"]
    assert lines[2].split() == ["accuracy", "0.9500", "0.9000", "-0.0500"]
    assert lines[3].split() == ["before", "f-t", "nan"]  # not set in this result
    assert lines[4].split() == ["MACs", "1,000", "500", "0.500"]
    assert lines[5].split() == ["params", "100", "40", "0.400"]


def test_report_with_lpnet_and_empty_state(tmp_path):
    state = {"backend": "torch-cpu", "threads": 2, "input_shapes": [[1, 3, 32, 32]],
             "lpnet": {"mape": 0.031, "flops_mape": 0.2, "lut_mape": 0.1, "noise_cv": 0.02}}
    text = write_report(tmp_path, _result(tmp_path, []), state).read_text()
    assert "LPNet held-out MAPE 3.100%" in text and "lpnet_fit.png" in text
    assert "Measured at the pruned-for setting only." in text
    assert "No per-step trace" in text and not (tmp_path / "search_trace.png").exists()
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "widths.png").is_file()


def test_accuracy_latency_one_marker_per_point_with_extra_points(tmp_path):
    result = _result(tmp_path, [], accuracy_before_finetune=0.7)
    points = [*result_points(result), Point("L1 baseline", 0.48, 0.85)]
    fig = plot_accuracy_latency(points, tmp_path / "a.png", target=0.5)
    ax = fig.axes[0]
    offsets = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert offsets == [(1.0, 95.0), (0.5, 70.0), (0.5, 90.0), (0.48, 85.0)]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["dense", "pruned, before fine-tune", "pruned", "L1 baseline", "target"]
    # no accuracy before the fine-tune: that point is left out
    assert [p.label for p in result_points(_result(tmp_path, []))] == ["dense", "pruned"]


def test_curves_accuracy_on_its_own_axis_with_points(tmp_path):
    """The search's validation accuracy is drawn where it was recorded (a legend entry with
    no point was the old fault), on a panel of its own (not beside the latency ratio)."""
    state = {"search": [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5,
                                                     "val_accuracy": 0.6}],
             "finetune": [{"epoch": e, "loss": 0.4, "val_accuracy": 0.8} for e in (1, 2)]}
    fig = plot_curves(state, tmp_path / "curves.png")
    loss, acc = fig.axes
    assert acc.get_title() == "validation accuracy (%)"
    lines = {line.get_label(): line for line in acc.lines}
    assert list(lines["search"].get_xdata()) == [2] and list(lines["search"].get_ydata()) == [60]
    assert list(lines["finetune"].get_xdata()) == [3, 4]
    assert all(np.isfinite(line.get_ydata()).all() for line in acc.lines + loss.lines)
    assert [len(line.get_xdata()) for line in loss.lines] == [2, 2]


def test_search_trace_panels(tmp_path):
    fig = plot_search_trace(_trace(lam=False), tmp_path / "t.png", target=0.5)
    assert [ax.get_title() for ax in fig.axes] == ["training loss",
                                                   "latency / dense (cost model)"]
    latency = fig.axes[1]
    assert [line.get_label() for line in latency.lines] == ["predicted", "aim", "target"]
    assert list(latency.lines[0].get_xdata()) == [0, 2, 4, 6, 8]
    fig = plot_search_trace(_trace(lam=True), tmp_path / "t.png")
    assert fig.axes[2].get_title() == "latency weight" and fig.axes[2].get_yscale() == "log"
    assert list(fig.axes[2].lines[0].get_ydata()) == [1.0, 3.0, 5.0, 7.0, 9.0]


def test_latency_check_points(tmp_path):
    fig = plot_latency_check(LOOP, CALIBRATION, tmp_path / "c.png", target=0.5)
    ax = fig.axes[0]
    calibration, loop = ax.collections
    assert [tuple(p) for p in calibration.get_offsets()] == [(0.55, 0.48)]
    assert [tuple(p) for p in loop.get_offsets()] == [(0.71, 0.62), (0.49, 0.45)]
    assert [t.get_text() for t in ax.texts] == ["0", "1"]  # the loop's steps, numbered
    diagonal = ax.lines[0]
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())
    fig = plot_latency_check(LOOP, [], tmp_path / "c.png")
    assert len(fig.axes[0].collections) == 1
