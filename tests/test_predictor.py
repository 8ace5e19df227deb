"""LPNet and its baselines, on synthetic latency data (fast, no timing involved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wgates.cli import main
from wgates.errors import WgatesError
from wgates.latency import LatencyStore, Measurement, Sample
from wgates.predictor import (
    LatencyPredictor,
    fit_and_compare,
    lut_latency,
    noise_cv,
    relative_line,
)

NAMES, SIZES = ["a", "b", "c"], [16, 32, 64]
KEYS = ["k16", "k32", "k64"]


def true_ratio(kept: np.ndarray) -> np.ndarray:
    """Overhead-bound and non-linear, like a small CNN at batch 1."""
    x = kept / np.array(SIZES)
    return 0.3 + 0.3 * x[..., 0] * x[..., 1] + 0.4 * x[..., 2] ** 2


def synthetic_store(path, n: int = 120, noise: float = 0.01) -> LatencyStore:
    rng = np.random.default_rng(0)
    store = LatencyStore(path)
    run = store.run_for({"model": "toy", "backend": "torch-cpu", "groups": [
        [n_, s, 1] for n_, s in zip(NAMES, SIZES, strict=True)
    ]})
    for key, size in zip(KEYS, SIZES, strict=True):
        for cin in (size // 4, size // 2, size):
            for cout in (size // 4, size // 2, size):
                m = Measurement(0.1 * cin * cout / size**2, 1.0, 1.0, 0.0)
                store.add_lut_entry(run, key, cin, cout, m)
    for idx in range(n):
        kept = rng.integers(1, np.array(SIZES) + 1)
        ratio = float(true_ratio(kept) * (1 + noise * rng.standard_normal()))
        sample = Sample(
            idx, "random", dict(zip(NAMES, map(int, kept), strict=True)),
            [[k, int(c), int(c)] for k, c in zip(KEYS, kept, strict=True)],
            float(np.mean((kept / np.array(SIZES)) ** 2)), ratio, 2 * ratio, 2.0, noise,
        )
        probe = (idx % 2, Measurement(0.5 * (1 + noise * rng.standard_normal()), 1, 2, noise))
        store.add_sample(run, sample, probe if idx % 5 == 0 else None)
    return store


def test_lpnet_fits_is_differentiable_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    kept = rng.integers(1, np.array(SIZES) + 1, size=(300, 3)).astype(float)
    model = LatencyPredictor.fit(NAMES, SIZES, kept, true_ratio(kept), steps=600, dense_ms=2.0)
    test = rng.integers(1, np.array(SIZES) + 1, size=(100, 3)).astype(float)
    with torch.no_grad():
        pred = model(torch.as_tensor(test, dtype=torch.float32)).numpy()
    assert np.mean(np.abs(pred - true_ratio(test)) / true_ratio(test)) < 0.03

    counts = {n: torch.tensor(float(s), requires_grad=True) for n, s in zip(NAMES, SIZES,
                                                                             strict=True)}
    model.predict_ms(model.kept_vector(counts)).backward()
    assert all(c.grad is not None and c.grad > 0 for c in counts.values())  # fewer = faster

    model.save(tmp_path / "lp.pt")
    torch.load(tmp_path / "lp.pt", weights_only=True)  # no pickled classes
    loaded = LatencyPredictor.load(tmp_path / "lp.pt")
    x = torch.tensor([8.0, 16.0, 32.0])
    assert torch.allclose(loaded(x), model(x)) and loaded.dense_ms == 2.0
    with pytest.raises(WgatesError, match="other groups"):
        loaded.kept_vector({"a": 1.0})
    with pytest.raises(WgatesError, match="not a latency predictor"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
        LatencyPredictor.load(tmp_path / "other.pt")


def test_lut_interpolates_bilinearly_and_depthwise_linearly():
    table = {
        "conv": {(c, o): c * o + 1.0 for c in (4, 8) for o in (2, 6)},
        "dw": {(c, c): 2.0 * c for c in (4, 8)},
    }
    assert lut_latency(table, [["conv", 6, 4]]) == pytest.approx(25.0)
    assert lut_latency(table, [["dw", 6, 6], ["conv", 4, 2]]) == pytest.approx(12.0 + 9.0)
    with pytest.raises(WgatesError, match="no entry"):
        lut_latency(table, [["missing", 1, 1]])


def test_relative_line_weights_small_ratios_as_much_as_large_ones():
    x = np.array([1.0, 2.0, 3.0, 10.0])
    a, b = relative_line(x, 0.05 + 0.1 * x)
    assert (a, b) == pytest.approx((0.05, 0.1))
    # one large outlier pulls an unweighted line's intercept far more than the relative one's
    y = 0.05 + 0.1 * x
    y[-1] *= 1.5
    a_rel, _ = relative_line(x, y)
    b_abs, a_abs = np.polyfit(x, y, 1)
    assert abs(a_rel - 0.05) < abs(a_abs - 0.05)


def test_noise_cv_pools_probes():
    assert noise_cv({0: [1.0, 1.0], 1: [0.5, 0.5]}) == 0.0
    assert noise_cv({0: [0.9, 1.1]}) == pytest.approx(np.std([0.9, 1.1], ddof=1))
    assert np.isnan(noise_cv({0: [1.0]}))


def test_fit_and_compare_beats_baselines_on_nonlinear_latency(tmp_path):
    store = synthetic_store(tmp_path / "l.sqlite")
    run = store.select_run()
    result = fit_and_compare(store, run, steps=600)
    m = result.metrics
    assert m["n_test"] == 24 and m["n_train"] == 96
    assert m["mape"] < 0.05 and m["mape"] < m["flops_mape"] and m["spearman"] > 0.9
    assert 0 < m["noise_cv"] < 0.05
    first = fit_and_compare(store, run, steps=10, first=60).metrics  # a cache extended later
    assert first["n_test"] + first["n_train"] == 60
    small = synthetic_store(tmp_path / "small.sqlite", n=5)
    with pytest.raises(WgatesError, match="at least 10"):
        fit_and_compare(small, small.select_run())


def test_cli_fit_latency_json_and_plot(tmp_path, capsys):
    synthetic_store(tmp_path / "l.sqlite").close()
    out = tmp_path / "lp.pt"
    args = ["fit-latency", str(tmp_path / "l.sqlite"), "--out", str(out), "--steps", "100"]
    assert main([*args, "--json"]) == 0
    out_err = capsys.readouterr()
    metrics = json.loads(out_err.out)
    assert "without its MACs prior" in out_err.err and metrics["prior"] == "none"
    for key in ("mape", "max_error", "spearman", "noise_cv", "flops_mape", "lut_mape"):
        assert isinstance(metrics[key], float)
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 0
    assert main(args) == 0
    assert "lookup table" in capsys.readouterr().out
    assert main(["fit-latency", str(tmp_path / "none.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_groups_refuses_a_predictor_of_other_groups():
    from types import SimpleNamespace

    from wgates.predictor import check_groups

    check_groups(SimpleNamespace(group_names=["a", "b"]), ["a", "b"])
    check_groups(lambda kept: kept.sum(), ["a", "b"])  # a plain callable is trusted
    with pytest.raises(WgatesError, match="other channel groups"):
        check_groups(SimpleNamespace(group_names=["b", "a"]), ["a", "b"])


def _small_cnn_lpnet(path, **changed) -> dict:
    """An LPNet file for small_cnn on digits, as if measured here with torch-cpu, one thread,
    batch 1, except for `changed` fingerprint fields. Returns its fingerprint."""
    from wgates.gated import gate
    from wgates.latency import get_backend
    from wgates.models import create_model

    gated = gate(create_model("small_cnn"), torch.zeros(1, 1, 32, 32))
    fingerprint = {**get_backend("torch-cpu", 1).fingerprint(), "batch": 1,
                   "input_shape": [1, 1, 32, 32], "model": "small_cnn", **changed}
    LatencyPredictor([g.name for g in gated.groups], [g.size for g in gated.groups],
                     dense_ms=2.0, fingerprint=fingerprint).save(path)
    return fingerprint


def test_predictor_from_another_machine_is_refused_unless_forced(tmp_path):
    from wgates.models import create_model
    from wgates.pipeline import preflight

    model, x = create_model("small_cnn"), torch.zeros(1, 1, 32, 32)
    here = tmp_path / "here.pt"
    _small_cnn_lpnet(here)
    preflight(model, x, predictor=here)  # measured here: accepted
    elsewhere = tmp_path / "elsewhere.pt"
    _small_cnn_lpnet(elsewhere, cpu="Some Other CPU @ 3.0GHz", threads=4)
    with pytest.raises(WgatesError) as err:
        preflight(model, x, predictor=elsewhere)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(elsewhere) in message
    assert "cpu was 'Some Other CPU @ 3.0GHz'" in message and "threads was 4, here 1" in message
    assert "--force-predictor" in message
    with pytest.raises(WgatesError, match="batch was 1, here 8"):  # batch, backend: the same
        preflight(model, torch.zeros(8, 1, 32, 32), predictor=here)
    with pytest.warns(UserWarning, match="measured elsewhere"):
        preflight(model, x, predictor=elsewhere, force_predictor=True)


def test_a_predictor_that_never_dropped_a_block_is_warned_about_where_the_search_may(
        tmp_path):
    """At batch 1 the search may drop ResNet blocks (depth by default); an LPNet whose profile
    never did prices a drop by its MACs alone, so the user is told to profile with --depth."""
    import warnings

    from wgates.gated import gate
    from wgates.latency import get_backend
    from wgates.models.cifar_resnet import CifarResNet
    from wgates.pipeline import preflight

    model, x = CifarResNet(8, in_channels=1).eval(), torch.zeros(1, 1, 32, 32)
    fingerprint = {**get_backend("torch-cpu", 1).fingerprint(), "batch": 1,
                   "input_shape": [1, 1, 32, 32]}
    paths = {}
    for depth in (False, True):
        groups = gate(model, x, depth=depth).groups
        paths[depth] = tmp_path / f"depth{depth}.pt"
        LatencyPredictor([g.name for g in groups], [g.size for g in groups], dense_ms=2.0,
                         fingerprint={**fingerprint, "groups": [
                             [g.name, g.size, g.min_channels] for g in groups]},
                         ).save(paths[depth])
    with pytest.warns(UserWarning, match="profiled without dropping residual blocks.*--depth"):
        preflight(model, x, predictor=paths[False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(model, x, predictor=paths[True])  # its profile dropped blocks
        preflight(model, x, predictor=paths[False], depth=False)  # this search drops none


@pytest.mark.parametrize("weights", [False, True])  # dense training first / no training
def test_cli_refuses_a_predictor_from_elsewhere_before_any_work(weights, tmp_path, monkeypatch,
                                                               capsys):
    from safetensors.torch import save_file

    import wgates.train
    from wgates.models import create_model

    def trained(*args, **kwargs):
        raise AssertionError("dense training started before the predictor was checked")

    monkeypatch.setattr(wgates.train, "train", trained)
    lpnet = tmp_path / "lpnet.pt"
    _small_cnn_lpnet(lpnet, backend="onnxruntime-cpu")
    args = ["prune", "--predictor", str(lpnet), "--subset", "10", "--run-dir",
            str(tmp_path / "run")]
    if weights:
        save_file(create_model("small_cnn").state_dict(), str(tmp_path / "w.safetensors"))
        args += ["--weights", str(tmp_path / "w.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("wgates: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "backend was 'onnxruntime-cpu', here 'torch-cpu'" in err
    assert not (tmp_path / "run").exists()


def test_cli_fit_latency_fits_on_the_macs_prior_of_the_profiled_model(tmp_path, capsys):
    import wgates
    from wgates.macs import MacsModel
    from wgates.models import create_model

    gated = wgates.gate(create_model("resnet20").eval(), (torch.randn(1, 3, 32, 32),))
    macs = MacsModel.of(gated)
    store = LatencyStore(tmp_path / "r.sqlite")
    run = store.run_for({"model": "resnet20", "backend": "torch-cpu", "input_shape": [1, 3, 32, 32],
                         "groups": [[g.name, g.size, 1] for g in gated.channel_groups]})
    rng = np.random.default_rng(0)
    for idx in range(30):
        kept = {g.name: int(rng.integers(1, g.size + 1)) for g in gated.channel_groups}
        with torch.no_grad():
            share = float(macs(torch.tensor([float(k) for k in kept.values()])))
        ratio = 0.3 + 0.7 * share
        store.add_sample(run, Sample(idx, "random", kept, [], share, ratio, ratio, 1.0, 0.01))
    store.close()
    args = ["fit-latency", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "lp.pt"),
            "--steps", "100", "--json"]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["prior"] == "a + b * MACs + c * (layers - 1)" and metrics["mape"] < 0.02
    assert metrics["prior_decay"] in (10.0, 0.1)
    assert main([*args, "--prior-decay", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["prior_decay"] == 3.0
    assert main([*args, "--no-prior"]) == 0
    assert json.loads(capsys.readouterr().out)["prior"] == "none"
    assert main([*args, "--model", "mobilenetv2_cifar"]) == 2
    assert "other channel groups" in capsys.readouterr().err


def test_prior_decay_sets_how_far_the_mlp_may_leave_the_macs_prior():
    """Latency that is not a line in the MACs: a weak decay lets the MLP learn the bend, a
    strong one keeps it near the prior (`prior_decay`); given several, the fit keeps the one
    that did best on its held-out samples."""
    import wgates
    from wgates.macs import MacsModel
    from wgates.models import create_model

    gated = wgates.gate(create_model("resnet20").eval(), (torch.randn(1, 3, 32, 32),))
    macs = MacsModel.of(gated)
    names = [g.name for g in gated.channel_groups]
    sizes = [g.size for g in gated.channel_groups]
    rng = np.random.default_rng(0)
    kept = np.stack([rng.integers(1, s + 1, size=200) for s in sizes], 1).astype(float)
    with torch.no_grad():
        share = macs(torch.as_tensor(kept, dtype=torch.float32)).numpy()
    ratios = 0.3 + 0.7 * share + 0.2 * (kept[:, 0] / sizes[0]) ** 4  # stage 1 costs a bend

    def error(decay: float) -> float:
        net = LatencyPredictor.fit(names, sizes, kept, ratios, steps=400, macs=macs,
                                   prior_decay=decay)
        with torch.no_grad():
            out = net(torch.as_tensor(kept, dtype=torch.float32)).numpy()
        return float(np.mean(np.abs(out - ratios) / ratios))

    assert error(0.01) < 0.7 * error(100.0)
    both = LatencyPredictor.fit(names, sizes, kept, ratios, steps=400, macs=macs,
                                prior_decay=(100.0, 0.01))
    assert both.prior_decay == 0.01
