"""`IsolatedMeter`: the meter in a process of its own."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.latency import Measurement, Protocol
from wgates.latency.worker import IsolatedMeter, process_mean
from wgates.models import create_model

FAST = Protocol(rounds=10, min_block_s=0.0005, retries=0, busy_sleep_s=0.2, max_wait_s=5.0,
                processes=1)
X = torch.randn(1, 1, 32, 32)


def test_measures_in_its_own_process_and_stops():
    torch.manual_seed(0)
    dense = create_model("small_cnn").eval()
    with IsolatedMeter("torch-cpu", 1, dense, (X,), FAST) as meter:
        same = meter.measure(dense)
        half = meter.measure(create_model("small_cnn", width_mult=0.25).eval())
        (process,) = meter.processes
        assert process.poll() is None and process.pid != 0
    assert process.poll() is not None  # stopped with the meter
    assert 0.7 < same.ratio < 1.4 and same.dense_ms > 0
    assert half.ratio < same.ratio


def test_a_model_that_cannot_travel_is_refused_before_a_process_starts():
    class Local(nn.Module):  # a local class: it cannot even be pickled
        def forward(self, x):
            return x

    with pytest.raises(WgatesError, match="Local cannot be sent to the measurement process"):
        IsolatedMeter("torch-cpu", 1, Local(), (X,), FAST)


def test_a_class_of_the_callers_main_is_refused_when_the_worker_starts(monkeypatch):
    """Pickled by reference to `__main__`, which the worker (a new interpreter that does not
    re-run the caller's script) does not have."""
    class Script(nn.Module):
        def forward(self, x):
            return x

    Script.__module__, Script.__qualname__ = "__main__", "Script"
    monkeypatch.setattr(sys.modules["__main__"], "Script", Script, raising=False)
    with pytest.raises(WgatesError, match="could not start .is the dense model's class"):
        IsolatedMeter("torch-cpu", 1, Script(), (X,), FAST)


def test_a_failure_in_the_worker_is_a_wgates_error_and_it_goes_on():
    dense = create_model("small_cnn").eval()
    with IsolatedMeter("torch-cpu", 1, dense, (X,), FAST) as meter:
        with pytest.raises(WgatesError, match="could not measure a model"):
            meter.measure(nn.Linear(3, 3))  # does not take the inputs
        assert meter.measure(dense).ratio > 0


def test_a_model_from_a_users_file_is_measured_in_the_worker(tmp_path):
    """`path/to/file.py:Class` models (the CLI's): the worker imports the same file under
    the same module name, so their pickles load there."""
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))\n")
    dense = create_model(f"{tmp_path / 'net.py'}:Net").eval()
    with IsolatedMeter("torch-cpu", 1, dense, (X,), FAST) as meter:
        assert meter.measure(dense).ratio > 0


def test_each_model_is_read_in_every_process_and_the_mean_kept():
    dense = create_model("small_cnn").eval()
    with IsolatedMeter("torch-cpu", 1, dense, (X,), replace(FAST, processes=2)) as meter:
        assert len({p.pid for p in meter.processes}) == 2
        m = meter.measure(create_model("small_cnn", width_mult=0.25).eval())
        assert m.attempts >= 2 and 0 < m.ratio < 1
    assert all(p.poll() is not None for p in meter.processes)


def test_process_mean_is_the_mean_with_its_standard_error_as_spread():
    low, high = (Measurement(ratio=r, ms=r, dense_ms=1.0, spread=0.001) for r in (0.468, 0.490))
    m = process_mean([low, high, low, high])
    assert m.ratio == pytest.approx(0.479) and m.attempts == 4
    assert m.spread == pytest.approx(0.0127 / 2 / 0.479, rel=0.02)  # std 0.0127, sqrt(4)
    assert process_mean([high]).spread == 0.001  # one reading: its own spread
