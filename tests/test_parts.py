"""The public pieces for a loop of your own: the latency term, the closed loop through it, the
fine-tune with the user's loss and the teacher's outputs, export from a tensor example."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import wgates
from wgates.models import create_model
from wgates.predictor import count
from wgates.search import search_optimizers

X = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def loader(n: int = 64, batch: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 32, 32, generator=gen),
                         torch.randint(0, 10, (n,), generator=gen))
    return DataLoader(data, batch_size=batch, shuffle=True, generator=gen)


def mean_width(gated):
    """The cost model: the mean kept fraction of the groups' widths."""
    sizes = gated.sizes()
    return lambda kept: (kept.float() / sizes).mean(-1)


def slower_hardware(model) -> tuple[float, float]:
    """A deterministic stand-in for the hardware: 10% above what the cost model predicts."""
    plan = model.wgates_plan
    widths = [len(plan.kept[n]) / size for n, size in plan.sizes.items()]
    return 1.1 * sum(widths) / len(widths), 0.0


@pytest.mark.parametrize("allocation", ["knapsack", "gradient"])
def test_latency_term_in_a_plain_loop_then_the_closed_loop(allocation):
    """The user's loop: their optimiser, their loss, `term()` added once per step; the closed
    loop then delivers widths measured inside the band."""
    torch.manual_seed(0)
    dense = create_model("small_cnn", width_mult=0.5).eval()
    gated = wgates.gate(dense, X, verify=False)
    data = loader()
    steps = 4 * len(data)
    term = wgates.LatencyTerm(gated, mean_width(gated), 0.5, steps, measure=slower_hardware,
                              tolerance=0.1, allocation=allocation, floor=0.1)
    # any optimiser for the knapsack; the latency loss needs the offsets' own learning rate
    optimizers = (search_optimizers(gated, steps) if allocation == "gradient"
                  else [torch.optim.Adam(gated.parameters(), lr=0.01)])
    for _ in range(4):
        for x, y in data:
            extra = term()
            assert extra.requires_grad == (allocation == "gradient")
            loss = F.cross_entropy(gated(x), y) + extra
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
    assert term.stats["pred"] < 0.8  # the widths came down from the dense model
    small, loop = term.close_loop(data)
    assert 0.4 <= loop[-1].measured <= 0.5, loop
    assert count(small, (X,))[1] < count(dense, (X,))[1]
    again = wgates.LatencyTerm(gated, mean_width(gated), 0.5, steps, allocation=allocation)
    again.load_state_dict(term.state_dict())  # a resumed loop continues where it was
    torch.testing.assert_close(again.state_dict(), term.state_dict())


def test_closed_loop_needs_a_meter_and_targets_are_checked():
    gated = wgates.gate(create_model("small_cnn"), X, verify=False)
    with pytest.raises(wgates.WgatesError, match="strictly between 0 and 1"):
        wgates.LatencyTerm(gated, mean_width(gated), 1.5, 10)
    with pytest.raises(wgates.WgatesError, match="LatencyMeter"):
        wgates.LatencyTerm(gated, mean_width(gated), 0.5, 10).close_loop()
    with pytest.raises(wgates.WgatesError, match="proxy must be one of"):
        wgates.fit_latency(gated, proxy="joules")


def test_finetune_passes_the_teachers_output_to_the_users_loss():
    torch.manual_seed(0)
    teacher = create_model("small_cnn").eval()
    student = create_model("small_cnn")
    calls = []

    def my_loss(output, target, teacher_output=None):
        calls.append(teacher_output is not None)
        loss = F.cross_entropy(output, target)
        if teacher_output is not None:
            loss = loss + F.mse_loss(output, teacher_output)
        return loss

    wgates.finetune(student, loader(32), 1, teacher=teacher, loss_fn=my_loss, progress=False)
    wgates.finetune(student, loader(32), 1, loss_fn=lambda out, y: my_loss(out, y),
                    progress=False)  # no teacher: a two-argument loss is enough
    assert calls == [True, True, False, False]


@pytest.mark.parametrize("isolated", [False, True])
def test_latency_meter_measures_against_the_dense_model(isolated):
    dense = create_model("small_cnn").eval()
    fast = wgates.latency.Protocol(rounds=10, min_block_s=0.0005, retries=0,
                                   busy_sleep_s=0.2, max_wait_s=5.0, processes=2)
    meter = wgates.LatencyMeter(dense, X, protocol=fast, isolated=isolated)
    ratio, spread = meter(dense)
    assert 0.7 < ratio < 1.3 and spread >= 0
    assert meter.dense_ms() > 0
    assert meter(create_model("small_cnn", width_mult=0.25))[0] < ratio
    quiet = meter.meter.quiet_ms
    assert 0 < quiet < math.inf
    meter.meter.quiet_ms = 0.99 * quiet  # seeded (in the worker when isolated)
    assert meter.meter.quiet_ms == pytest.approx(0.99 * quiet)


def test_latency_meter_measures_here_what_a_new_process_cannot_import(monkeypatch):
    """A model class of the script being run (here: registered as `__main__`'s) cannot be
    loaded by the measurement process: the meter says so and measures in this one."""
    import sys

    class Script(torch.nn.Sequential):
        pass

    Script.__module__, Script.__qualname__ = "__main__", "Script"
    monkeypatch.setattr(sys.modules["__main__"], "Script", Script, raising=False)
    net = create_model("small_cnn")
    dense = Script(net.features, net.pool, torch.nn.Flatten(), net.classifier).eval()
    fast = wgates.latency.Protocol(rounds=10, min_block_s=0.0005, retries=0,
                                   busy_sleep_s=0.2, max_wait_s=5.0, processes=1)
    meter = wgates.LatencyMeter(dense, X, protocol=fast, isolated=True)
    with pytest.warns(UserWarning, match="measuring in this process"):
        ratio, _ = meter(dense)
    assert not meter.isolated and 0.7 < ratio < 1.3


def test_latency_meter_takes_the_quiet_time_from_a_profile(tmp_path):
    dense = create_model("small_cnn").eval()
    fast = wgates.latency.Protocol(rounds=10, min_block_s=0.0005, retries=0,
                                   busy_sleep_s=0.2, max_wait_s=5.0)
    path = tmp_path / "latency.sqlite"
    wgates.latency.profile(dense, list(X.shape), path, samples=3, protocol=fast,
                           progress=False, lookup_table=False)
    meter = wgates.LatencyMeter(dense, X, protocol=fast)
    meter.seed_quiet(path)
    assert meter.meter.quiet_ms <= wgates.latency.LatencyStore(path).quiet_ms(1)
    other = wgates.LatencyMeter(dense, torch.randn(2, *X.shape[1:]), protocol=fast)
    other.seed_quiet(path)  # another batch: another reference, so no seed
    assert other._quiet_ms == math.inf


def test_latency_meter_pools_the_readings_it_remembers(tmp_path):
    """A remembered reading is answered with the median of every reading of the same
    architecture in the file (earlier runs' included); another architecture, another
    dense reference or another batch is another setting, not pooled."""
    dense = create_model("small_cnn").eval()
    small = create_model("small_cnn", width_mult=0.25).eval()
    fast = wgates.latency.Protocol(rounds=10, min_block_s=0.0005, retries=0,
                                   busy_sleep_s=0.2, max_wait_s=5.0)
    path = tmp_path / "readings.sqlite"
    first = wgates.LatencyMeter(dense, X, protocol=fast)
    first.remember(path)
    own = first.read(small)
    assert 0 < own.ratio < 1  # one reading: its own
    setting = {**first.backend.fingerprint_at(X.shape), "isolated": False,
               "dense": wgates.latency.architecture_key(dense)}
    store = wgates.latency.LatencyStore(path)
    arch = wgates.latency.architecture_key(small)
    for ratio in (5.0, 5.0, 5.0):  # as if earlier runs had read these
        store.add_reading(setting, arch, own)
        store.db.execute("UPDATE readings SET ratio = ? WHERE rowid = "
                         "(SELECT MAX(rowid) FROM readings)", (ratio,))
    store.db.commit()
    second = wgates.LatencyMeter(dense, X, protocol=fast)  # a later run, same file
    second.remember(path)
    pooled = second.read(small)
    assert pooled.ratio == 5.0 and pooled.spread > 0  # median of [own, 5, 5, 5, new]
    assert len(store.readings(setting, arch)) == 5
    assert second.read(dense).ratio < 1.5  # another architecture: not pooled with `small`
    assert wgates.latency.architecture_key(small) != wgates.latency.architecture_key(
        create_model("small_cnn", width_mult=0.5))
    other = wgates.LatencyMeter(dense, torch.randn(2, *X.shape[1:]), protocol=fast)
    other.remember(path)  # another batch: its own readings
    assert other.read(small).ratio < 1
    store.close()


def test_export_onnx_takes_a_tensor_example(tmp_path):
    gated = wgates.gate(create_model("small_cnn"), X, verify=False)
    gated.set_masks(gated.masks_for_widths({g.name: g.size // 2 for g in gated.groups}))
    path = wgates.export_onnx(gated.extract(), X, tmp_path / "small.onnx")
    assert path.stat().st_size > 0
