"""The run directory's Markdown report (rendered from a small, consistent fake result)."""

from __future__ import annotations

from torch import nn

from wgates.pipeline import PruneResult
from wgates.report import write_report


def _result(tmp_path, loop):
    return PruneResult(
        model=nn.Identity(), latency_ms=4.0, dense_latency_ms=8.0, latency_ratio=0.5,
        target_ratio=0.5, accuracy=0.9, dense_accuracy=0.95, macs=500, dense_macs=1000,
        params=40, dense_params=100, widths={"a": 8, "b": 16}, sizes={"a": 16, "b": 32},
        run_dir=tmp_path, loop=loop,
    )


STATE = {
    "backend": "torch-cpu", "threads": 1, "input_shapes": [[1, 1, 32, 32]], "proxy": "flops",
    "target_ratio": 0.5,
    "search": [{"epoch": 1, "loss": 2.0, "pred": 0.7, "val_accuracy": 0.5},
               {"epoch": 2, "loss": 1.0, "pred": 0.5, "val_accuracy": 0.8}],
    "finetune": [{"epoch": 1, "loss": 0.5, "val_accuracy": 0.9}],
}


def test_write_report(tmp_path):
    loop = [{"threshold": float("nan"), "predicted": 0.62, "measured": 0.71, "spread": 0.02},
            {"threshold": 0.1, "predicted": 0.45, "measured": 0.49, "spread": 0.01}]
    result = _result(tmp_path, loop)
    path = write_report(tmp_path, result, STATE)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert result.table() in text
    assert "Target: 0.500 of the dense latency on torch-cpu" in text
    assert "| 0 | 0.620 | 0.710 | 0.020 |" in text and "| 1 | 0.450 | 0.490 | 0.010 |" in text
    assert "Cost model: flops proxy." in text
    assert "![widths](widths.png)" in text and "![curves](curves.png)" in text
    for png in ("widths.png", "curves.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


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
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "widths.png").is_file()


def test_curves_with_search_and_finetune_records(tmp_path):
    from wgates.report import plot_curves

    state = {"target_ratio": 0.5,
             "search": [{"epoch": e, "loss": 1.0 / e, "pred": 0.9 - 0.1 * e, "aim": 0.8 - 0.1 * e,
                         "val_accuracy": 0.5} for e in (1, 2, 3)],
             "finetune": [{"epoch": e, "loss": 0.5, "val_accuracy": 0.8} for e in (1, 2)]}
    plot_curves(state, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
