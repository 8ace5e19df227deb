"""Latency measurement: sampling, store, protocol, profiling and resuming after a kill."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.latency import (
    LatencyStore,
    Meter,
    Protocol,
    Sample,
    describe,
    get_backend,
    probe_widths,
    profile,
    profiled_quiet_ms,
    sample_widths,
)

TINY_NET = '''
from torch import nn


class Tiny(nn.Module):
    default_input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))
'''

FAST = Protocol(rounds=6, chunks=2, retries=0, max_wait_s=0)
GROUPS = [SimpleNamespace(name=f"g{i}", size=s, min_channels=2) for i, s in enumerate((8, 16, 64))]


@pytest.fixture()
def tiny_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_NET)
    return path


def tiny_model(path) -> nn.Module:
    from wgates.models import create_model

    return create_model(f"{path}:Tiny")


def test_sampling_is_deterministic_covers_extremes_and_respects_bounds():
    assert sample_widths(GROUPS, 0)[1] == {"g0": 8, "g1": 16, "g2": 64}
    assert sample_widths(GROUPS, 1)[1] == {"g0": 2, "g1": 2, "g2": 2}
    draws = [sample_widths(GROUPS, i, seed=3) for i in range(2, 200)]
    assert draws == [sample_widths(GROUPS, i, seed=3) for i in range(2, 200)]
    assert draws != [sample_widths(GROUPS, i, seed=4) for i in range(2, 200)]
    assert {kind for kind, _ in draws} == {"uniform", "near_uniform", "random"}
    for _, widths in draws:
        assert all(2 <= widths[g.name] <= g.size for g in GROUPS)
    ratios = [w["g2"] / 64 for _, w in draws]
    assert min(ratios) < 0.1 and max(ratios) > 0.9
    assert probe_widths(GROUPS, 1) == {"g0": 4, "g1": 8, "g2": 32}


def _sample(idx: int, ratio: float = 0.5) -> Sample:
    return Sample(idx, "uniform", {"g0": 4}, [["k", 4, 4]], 0.3, ratio, 1.0, 2.0, 0.01)


def test_store_keeps_fingerprints_apart_and_refuses_duplicates(tmp_path):
    store = LatencyStore(tmp_path / "l.sqlite")
    a = store.run_for({"backend": "torch-cpu", "model": "a"})
    b = store.run_for({"backend": "onnxruntime-cpu", "model": "a"})
    assert a != b and store.run_for({"model": "a", "backend": "torch-cpu"}) == a
    store.add_sample(a, _sample(0))
    store.add_sample(a, _sample(1), repeat=(0, get_measurement(0.4)))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_sample(a, _sample(1))
    assert store.next_index(a) == 2 and store.next_index(b) == 0
    assert store.repeats(a) == {0: [0.4]}
    assert store.select_run().id == a
    store.add_sample(b, _sample(0))
    with pytest.raises(WgatesError, match="several runs"):
        store.select_run()
    assert store.select_run(store.runs()[1].key[:6]).id == b
    store.close()
    with pytest.raises(WgatesError, match="does not exist"):
        LatencyStore(tmp_path / "missing.sqlite", create=False)


def get_measurement(ratio: float):
    from wgates.latency import Measurement

    return Measurement(ratio, 1.0, 2.0, 0.01)


def test_meter_measures_a_double_workload_at_about_twice_the_reference():
    backend = get_backend("torch-cpu")
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 32, 32)
    once = backend.prepare(conv, (x,))

    def twice():
        once()
        once()

    m = Meter(backend, once, Protocol(rounds=20, chunks=4)).measure(twice)
    assert 1.6 < m.ratio < 2.5
    assert m.ms > 0 and m.dense_ms > 0 and m.spread >= 0 and m.attempts >= 1


def _scripted_meter(monkeypatch, readings, quiet_ms: float | None = None, **protocol) -> Meter:
    """A Meter whose readings are (ratio, reference ms) in this order (any iterable); unless
    `quiet_ms` seeds the quiet time, the first reading only sets it."""
    from wgates.latency import Measurement

    script = (Measurement(r, r * d, d, 0.0) for r, d in readings)
    meter = Meter(get_backend("torch-cpu"), lambda: None,
                  Protocol(**{"busy_sleep_s": 0.0, **protocol}), quiet_ms or math.inf)
    monkeypatch.setattr(meter, "_once", lambda candidate: next(script))
    if quiet_ms is None:
        assert meter.measure(lambda: None).slowdown == 1.0
    return meter


def test_meter_retakes_a_reading_taken_while_the_reference_ran_slow(monkeypatch):
    meter = _scripted_meter(monkeypatch, [(1.0, 2.5), (0.72, 3.8), (0.69, 2.6)])
    m = meter.measure(lambda: None)
    assert (m.ratio, m.attempts) == (0.69, 2)


def test_meter_keeps_the_quickest_reference_reading_when_the_spell_lasts(monkeypatch):
    slow = [(0.74, 3.9), (0.71, 3.2), (0.73, 3.6), (0.72, 3.4)]
    meter = _scripted_meter(monkeypatch, [(1.0, 2.5), *slow], calm_wait_s=0.0)
    m = meter.measure(lambda: None)
    assert (m.ratio, m.attempts) == (0.71, 1 + Protocol().slow_retries)
    assert m.slowdown == pytest.approx(3.2 / 2.5)


def test_a_seeded_quiet_time_catches_a_spell_the_meter_started_in(monkeypatch):
    # unseeded, the first reading (3.4 ms) would be taken for the host at rest
    spell = [(0.72, 3.4)] * 6
    meter = _scripted_meter(monkeypatch, [*spell, (0.69, 2.6)], quiet_ms=2.5)
    m = meter.measure(lambda: None)
    assert (m.ratio, m.attempts) == (0.69, 7)


def test_a_spell_that_outlasts_the_wait_becomes_the_quiet_time(monkeypatch):
    spell = iter(lambda: (0.72, 3.4), None)  # never ends
    meter = _scripted_meter(monkeypatch, spell, quiet_ms=2.5, calm_wait_s=0.05,
                            busy_sleep_s=0.01)
    m = meter.measure(lambda: None)
    assert m.ratio == 0.72 and m.attempts > 1 + Protocol().slow_retries
    assert meter.quiet_ms == 3.4
    assert meter.measure(lambda: None).attempts == 1  # no second wait inside the same spell


def test_a_pace_waited_out_once_is_not_waited_for_again_after_quicker_readings(monkeypatch):
    """A process whose reference alternates between two levels (the heap's, not the host's)
    waits once for the slow one, not at every return to it."""
    then = [(0.49, 1.72), (0.47, 1.86), (0.47, 2.2), (0.46, 1.9)]
    waiting = [True]  # the slow level until the first measurement has waited it out
    levels = iter(lambda: (0.47, 1.86) if waiting[0] else then.pop(0), None)
    meter = _scripted_meter(monkeypatch, levels, quiet_ms=1.72, calm_wait_s=0.05,
                            busy_sleep_s=0.01, slow_retries=1)
    assert meter.measure(lambda: None).attempts > 2  # waited: the pace was new
    waiting[0] = False
    assert meter.measure(lambda: None).ratio == 0.49  # quicker: the quiet time falls
    assert meter.quiet_ms == 1.72 and meter.waited_ms == 1.86
    m = meter.measure(lambda: None)
    assert (m.ratio, m.attempts) == (0.47, 1)  # back at the slow level: no wait
    m = meter.measure(lambda: None)  # a spell beyond it is still retaken
    assert (m.ratio, m.attempts) == (0.46, 2)


def test_describe_counts_macs_and_flags_depthwise(tiny_file):
    report = describe(tiny_model(tiny_file), (torch.randn(1, 3, 16, 16),))
    assert report.flops == 256 * (16 * 27 + 16 * 9 + 24 * 16) + 24 * 10
    dw = [s for s in report.convs.values() if s.depthwise]
    assert len(dw) == 1 and all(c == o for c, o in dw[0].grid())
    assert len(report.convs["body.6"].grid()) == 25


def test_unknown_backend_and_missing_gpu_are_user_errors():
    with pytest.raises(WgatesError, match="unknown backend"):
        get_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(WgatesError, match="CUDA"):
            get_backend("torch-cuda")


def test_width_grid_follows_mlas_block_on_onnx_runtime(monkeypatch):
    """ONNX Runtime's grid is multiples of 8 up to MLAS's NCHWc block (16 with AVX-512F,
    8 otherwise) and whole blocks above; a requested multiple is used throughout."""
    import wgates.latency.backends as backends

    assert get_backend("torch-cpu").width_grid() == (1, 1)
    for avx512, block in [(True, 16), (False, 8)]:
        monkeypatch.setattr(backends, "has_avx512f", lambda avx512=avx512: avx512)
        assert get_backend("onnxruntime-cpu").width_grid() == (8, block)
    assert get_backend("onnxruntime-cpu").width_grid(4) == (4, 4)


def test_width_grid_takes_a_requested_block_with_or_without_a_multiple():
    """A block alone keeps the backend's multiple (torch-cpu at batch 32 on an AVX-512 host:
    single channels up to 16, whole blocks of 16 above); a block under the multiple is
    raised to it."""
    torch_cpu = get_backend("torch-cpu")
    assert torch_cpu.width_grid(None, 16) == (1, 16)
    assert torch_cpu.width_grid(8, 16) == (8, 16)
    assert torch_cpu.width_grid(8, 4) == (8, 8)
    assert get_backend("onnxruntime-cpu").width_grid(None, 32) == (8, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_backend_times_with_events():
    backend = get_backend("torch-cuda")
    run = backend.prepare(nn.Conv2d(8, 8, 3), (torch.randn(1, 8, 16, 16),))
    assert backend.timer(run)(3) > 0


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_profile_resumes_and_extends(tiny_file, tmp_path, backend):
    out = tmp_path / "lat.sqlite"
    kwargs = dict(backend=backend, protocol=FAST, repeat_every=3, progress=False)
    first = profile(tiny_model(tiny_file), (1, 3, 16, 16), out, samples=4, **kwargs)
    store = LatencyStore(out)
    assert len(store.calm_samples(first.id)) == 4 and first.fingerprint["backend"] == backend
    again = profile(tiny_model(tiny_file), (1, 3, 16, 16), out, samples=7, **kwargs)
    assert again.key == first.key and len(store.calm_samples(again.id)) == 7
    samples = store.samples(again.id)  # more than 7 if the host's load spoiled some
    assert [s.idx for s in samples] == list(range(again.n_samples))
    assert samples[0].kind == "dense" and 0.7 < samples[0].ratio < 1.4
    assert samples[1].flops < samples[0].flops == 1.0
    assert sum(len(r) for r in store.repeats(again.id).values()) == again.n_samples // 3
    assert store.lut(again.id)
    quiet = np.quantile([s.dense_ms for s in samples], 0.05)
    assert store.quiet_ms(again.id) == pytest.approx(quiet)
    assert profiled_quiet_ms(out, {"backend": backend}) == pytest.approx(quiet)
    assert profiled_quiet_ms(out, {"backend": "torch-cuda"}) == math.inf  # no such run
    assert profiled_quiet_ms(tmp_path / "none.sqlite", {}) == math.inf


def _count(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet, or locked by the writer
        return 0
    finally:
        db.close()


def test_killed_profile_resumes_without_losing_or_doubling_samples(tiny_file, tmp_path):
    out = tmp_path / "lat.sqlite"
    cmd = [
        sys.executable, "-m", "wgates", "profile", "--model", f"{tiny_file}:Tiny",
        "--input-shape", "1,3,16,16", "--samples", "20", "--repeat-every", "4", "--rounds", "10",
        "--max-wait", "0",
        "--out", str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _count(out)
    assert 5 <= killed_at < 20, "the run should have been killed mid-way"
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    store = LatencyStore(out)
    (run,) = store.runs()
    samples = store.samples(run.id)
    assert [s.idx for s in samples] == list(range(run.n_samples))
    assert len(store.calm_samples(run.id)) == 20  # the load may have spoiled more
    groups = [SimpleNamespace(name=n, size=k, min_channels=m)
              for n, k, m in run.fingerprint["groups"]]
    assert all(s.widths == sample_widths(groups, s.idx)[1] for s in samples)
    assert sum(len(r) for r in store.repeats(run.id).values()) == run.n_samples // 4


def _contended_meter(monkeypatch, spoiled) -> None:
    """Profiles measure with a stand-in whose n-th reading comes from a contended host (the
    reference at 5x its quiet time) where `spoiled(n)`."""
    from wgates.latency import Measurement, sampling

    count = iter(range(10**6))

    class Spoiled:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def measure(self, candidate) -> Measurement:
            dense = 5.0 if spoiled(next(count)) else 1.0
            return Measurement(0.5, 0.5 * dense, dense, 0.01)

    monkeypatch.setattr(sampling, "Meter", Spoiled)


def _profile_tiny(tiny_file, out, samples: int):
    return profile(tiny_model(tiny_file), (1, 3, 16, 16), out, samples=samples, protocol=FAST,
                   repeat_every=100, progress=False, lookup_table=False)


def test_profile_replaces_samples_the_load_spoiled(tiny_file, tmp_path, monkeypatch):
    _contended_meter(monkeypatch, lambda n: n % 3 == 2)
    run = _profile_tiny(tiny_file, tmp_path / "lat.sqlite", samples=10)
    store = LatencyStore(tmp_path / "lat.sqlite")
    assert len(store.calm_samples(run.id)) == 10 and run.n_samples == 14
    assert all(s.dense_ms == 1.0 for s in store.calm_samples(run.id))
    assert store.counts(run.id) == (14, 10)  # counted, not read


def test_a_host_too_busy_to_profile_stops_and_the_fit_says_why(tiny_file, tmp_path,
                                                                monkeypatch):
    from wgates.predictor import fit_file

    _contended_meter(monkeypatch, lambda n: n >= 2)
    run = _profile_tiny(tiny_file, tmp_path / "lat.sqlite", samples=10)
    assert run.n_samples == 10 * 3 // 2 + 10  # the cap on replacements
    with pytest.raises(WgatesError, match=r"only 2 .* calm machine \(23 more .* contended\)"):
        fit_file(tmp_path / "lat.sqlite", run)


PAGE_FAULTS = """
import ctypes, resource, sys, torch
from wgates.latency import Meter, get_backend
from wgates.latency.backends import M_MMAP_THRESHOLD
# glibc's own default (128 KiB), fixed: what a process's history would otherwise decide
ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
if sys.argv[1] == "meter":  # a meter pins the allocator before it times anything
    backend = get_backend("torch-cpu", 1)
    Meter(backend, backend.prepare(torch.nn.Linear(1, 1), (torch.zeros(1, 1),)))
x = torch.randn(32, 16, 32, 32)  # 2 MB, a batch-32 ResNet-20 activation
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        y = torch.relu(x) + 1
        del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_meter_pins_the_allocator_so_large_tensors_stop_faulting_in():
    """glibc returns 2 MB blocks to the kernel after each use in a new process, and the next
    forward faults them in again (the batch-32 dense reference's slow pace); a meter pins the
    thresholds, after which the same loop takes no page faults at all."""
    def run(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], check=True,
                             capture_output=True, text=True).stdout
        return int(out.split()[-1])

    assert run("plain") > 1000
    assert run("meter") < 50


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_fingerprint_records_the_pinned_allocator():
    """A profile taken without the pin is another setting's: its store key must differ."""
    from wgates.latency import fingerprint_key

    fp = get_backend("torch-cpu", 1).fingerprint()
    assert fp["allocator"] == "glibc-pinned"
    assert fingerprint_key(fp) != fingerprint_key({**fp, "allocator": "default"})
