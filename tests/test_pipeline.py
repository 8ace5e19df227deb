"""`wgates.prune` end to end on tiny digits, its run directory, resume, and the CLI.

The measurement protocol and the proxy's sample count are shrunk (monkeypatched) so that the
whole pipeline runs in tens of seconds; everything else is the real code path."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

import wgates
import wgates.parts
import wgates.pipeline as pipeline
from wgates.cli import main
from wgates.data import make_loaders
from wgates.errors import WgatesError
from wgates.extract import load_pruned
from wgates.gated import allowed_widths
from wgates.latency import Protocol, get_backend
from wgates.models import create_model
from wgates.train import train

FAST = Protocol(rounds=10, min_block_s=0.0005, retries=0, busy_sleep_s=0.2, max_wait_s=5.0)
_FIT_PROXY = pipeline.fit_proxy
RUN_FILES = ["model/model.safetensors", "model/pruning.json", "model.onnx", "report.md",
             "widths.png", "curves.png", "accuracy_latency.png", "search_trace.png",
             "latency_check.png"]


def _fast(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(pipeline, "Protocol", lambda: FAST)
    mp.setattr(pipeline, "profile", functools.partial(pipeline.profile, protocol=FAST))
    mp.setattr(pipeline, "fit_proxy", functools.partial(_FIT_PROXY, samples=12))


@pytest.fixture(scope="module")
def data():
    train_loader, val_loader, _ = make_loaders("digits", batch_size=32, subset=128)
    return train_loader, val_loader


@pytest.fixture(scope="module")
def dense(data):
    torch.manual_seed(0)
    model = create_model("small_cnn")
    train(model, data[0], 1, lr=0.05, progress=False)
    return model.eval()


def _prune(dense, data, run_dir, **kwargs):
    args = dict(target_latency=0.6, epochs=1, finetune_epochs=1, run_dir=run_dir,
                proxy="flops", tolerance=0.1, progress=False)
    args.update(kwargs)
    example = args.pop("example", torch.randn(1, 1, 32, 32))
    return pipeline.prune(dense, example, data[0], data[1], **args)


@pytest.fixture(scope="module")
def flops_run(dense, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _fast(mp)
        result = _prune(dense, data, run_dir)
    return result, run_dir


def test_prune_flops_result(flops_run, dense):
    result, run_dir = flops_run
    assert result.run_dir == run_dir
    assert result.latency_ratio > 0 and result.latency_ms > 0 and result.dense_latency_ms > 0
    assert result.latency_ms == pytest.approx(result.latency_ratio * result.dense_latency_ms)
    assert result.target_ratio == pytest.approx(0.6)
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.dense_accuracy <= 1.0
    assert 0 < result.macs < result.dense_macs
    assert 0 < result.params < result.dense_params
    assert set(result.widths) == set(result.sizes)
    assert all(1 <= result.widths[n] <= result.sizes[n] for n in result.sizes)
    assert any(result.widths[n] < result.sizes[n] for n in result.sizes)
    # at most 8 rounds of the loop, then a trial per group and block (16, 8) and re-checks
    assert 1 <= len(result.loop) <= 8 + 2 * 2 * len(result.sizes)
    assert {"predicted", "measured", "spread"} <= set(result.loop[0])
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "latency (ms)" in report and "flops proxy" in report
    assert "Pruned for and measured on torch-cpu, batch 1, 1 thread(s)" in report
    assert result.threads_table() in report
    # the delivered model at the pruned-for thread count (the delivered figure), then at 2
    state = json.loads((run_dir / "state.json").read_text())
    rows = state["result"]["at_threads"]
    assert [r["threads"] for r in rows] == [1, 2]
    assert rows[0]["ratio"] == result.latency_ratio and rows[1]["ratio"] > 0
    assert all(r["dense_ms"] > 0 for r in rows)
    # the search's per-step trace: every step of the one-epoch search here (4 batches)
    trace = state["search_trace"]
    assert [r["step"] for r in trace] == list(range(4))
    assert all({"loss", "pred", "aim"} <= set(r) for r in trace)
    assert result.table().splitlines()[0].split() == ["dense", "pruned", "ratio"]
    # the dense model handed in is left untouched
    assert sum(p.numel() for p in dense.parameters()) == result.dense_params


def test_saved_model_reloads(flops_run):
    result, run_dir = flops_run
    loaded = load_pruned(create_model("small_cnn"), run_dir / "model").eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_resume_finished_run_skips_search(flops_run, dense, data, monkeypatch):
    result, run_dir = flops_run
    _fast(monkeypatch)

    def no_search(*args, **kwargs):
        raise AssertionError("search ran again on a finished run")

    def no_loop(*args, **kwargs):
        raise AssertionError("closed loop ran again on a finished run")

    monkeypatch.setattr(pipeline, "search", no_search)
    monkeypatch.setattr(wgates.parts, "closed_loop", no_loop)  # run by LatencyTerm.close_loop
    trace = json.loads((run_dir / "state.json").read_text())["search_trace"]
    again = _prune(dense, data, run_dir, resume=True, export=False, check_threads=())
    assert json.loads((run_dir / "state.json").read_text())["search_trace"] == trace
    assert [r["threads"] for r in again.at_threads] == [1]
    assert again.widths == result.widths
    assert again.dense_latency_ms == result.dense_latency_ms
    assert again.accuracy == pytest.approx(result.accuracy)


def test_non_empty_run_dir_needs_resume(flops_run, dense, data):
    _, run_dir = flops_run
    with pytest.raises(WgatesError, match="not empty"):
        _prune(dense, data, run_dir)


def test_resume_with_other_settings_is_refused_before_any_work(flops_run, dense, data,
                                                              monkeypatch):
    _, run_dir = flops_run
    before = sorted(p.name for p in run_dir.iterdir())
    state = (run_dir / "state.json").read_text()
    monkeypatch.setattr(wgates.parts, "Meter", None)  # measuring anything would fail loudly
    monkeypatch.setattr(wgates.parts, "IsolatedMeter", None)
    with pytest.raises(WgatesError, match="target_latency was '0.6', now '0.5'"):
        _prune(dense, data, run_dir, resume=True, target_latency=0.5)
    other = copy.deepcopy(dense)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(WgatesError, match="model was"):
        _prune(other, data, run_dir, resume=True)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (run_dir / "state.json").read_text() == state


def test_prune_with_loss_importance(dense, data, tmp_path, monkeypatch):
    """The knapsack valued by measured loss curves runs end to end and is recorded."""
    import json

    _fast(monkeypatch)
    result = _prune(dense, data, tmp_path / "run", importance="loss", export=False)
    assert 0 < result.latency_ratio < 1 and result.macs < result.dense_macs
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["settings"]["importance"] == "loss" and state["importance"] == "loss"


def test_bad_proxy(dense, data, tmp_path):
    with pytest.raises(WgatesError, match="proxy"):
        _prune(dense, data, tmp_path / "r", proxy="energy")


@pytest.mark.slow  # 18-76 s here depending on machine load (profiling 12 samples)
def test_prune_latency_proxy(dense, data, tmp_path, monkeypatch):
    _fast(monkeypatch)
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, proxy="latency", samples=12, export=False)
    assert result.latency_ratio > 0 and 0.0 <= result.accuracy <= 1.0
    assert result.macs < result.dense_macs
    assert (run_dir / "lpnet.pt").is_file() and (run_dir / "latency.sqlite").is_file()
    assert (run_dir / "lpnet_fit.png").is_file()
    assert "LPNet held-out MAPE" in (run_dir / "report.md").read_text()
    # the run directory moved to another machine: its LPNet is refused on --resume
    net = pipeline.LatencyPredictor.load(run_dir / "lpnet.pt")
    net.fingerprint["cpu"] = "another CPU"
    net.save(run_dir / "lpnet.pt")
    with pytest.raises(WgatesError, match="cpu was 'another CPU'.*resume it on the machine it "
                       "began on, or delete .*lpnet.pt"):
        _prune(dense, data, run_dir, proxy="latency", samples=12, export=False, resume=True)
    with pytest.warns(UserWarning, match="measured elsewhere"):
        _prune(dense, data, run_dir, proxy="latency", samples=12, export=False, resume=True,
               force_predictor=True)


def test_cli_prune(tmp_path, monkeypatch, capsys):
    _fast(monkeypatch)
    checked = []

    def at_threads(dense, model, inputs, threads, backend, protocol, **kwargs):  # flops_run
        checked.extend(threads)
        return [{"threads": t, "ratio": 0.6, "spread": 0.01, "dense_ms": 1.0} for t in threads]

    monkeypatch.setattr(pipeline, "measure_threads", at_threads)
    run_dir = tmp_path / "cli"
    code = main(["prune", "--subset", "96", "--dense-epochs", "1", "--epochs", "1",
                 "--finetune-epochs", "1", "--proxy", "flops", "--run-dir", str(run_dir),
                 "--check-threads", "1", "3"])
    assert code == 0 and checked == [3]  # the pruned-for count is the delivered figure
    out = capsys.readouterr().out
    assert "latency (ms)" in out and "accuracy" in out and "MACs" in out
    assert "pruned for and measured on torch-cpu, batch 1, 1 thread(s)" in out
    table = out.split("at other thread counts", 1)[1].splitlines()
    assert table[1].split()[:3] == ["threads", "latency", "/"]
    assert table[2].split()[:3] == ["1", "(pruned", "for)"]
    assert table[3].split() == ["3", "0.600", "0.010", "1.000"]
    assert (run_dir / "report.md").is_file() and (run_dir / "model.onnx").is_file()


def test_prune_is_public_api():
    import wgates
    from wgates.pipeline import prune

    assert wgates.prune is prune and "prune" in wgates.__all__


def test_killed_search_resumes_with_its_latency_weight_and_optimisers(dense, data, tmp_path):
    """A search killed after epoch 1 of 2 continues at epoch 2 with the checkpointed `lam`,
    Adam's moments and the cosine schedule half-way, not from their initial values."""
    from wgates.gated import gate
    from wgates.search import LAMBDA_INIT, LatencyLoss, search, search_optimizers
    from wgates.train import StepTrace

    loader, epochs, lr = data[0], 2, 0.01
    run = pipeline._Run(tmp_path / "run", resume=False, settings={})

    def stage(kill_after_first: bool) -> dict:
        gated = gate(copy.deepcopy(dense), torch.randn(1, 1, 32, 32))
        sizes = torch.tensor([float(g.size) for g in gated.groups])
        cost = lambda kept: (kept / sizes).mean()  # noqa: E731
        optimizers = search_optimizers(gated, epochs * len(loader), lr, 0.05)
        loss = LatencyLoss(gated, cost, 0.3)
        trace = StepTrace()
        seen: dict = {"trace": trace}

        def first_step() -> tuple[torch.Tensor, dict]:
            seen.setdefault("lr", optimizers[0].param_groups[0]["lr"])
            return torch.zeros(()), {}

        def fit(start_epoch: int, on_epoch_end) -> None:
            seen.update(start=start_epoch, lam=loss.lam,
                        adam_steps=len(optimizers[1].state),)

            def end(epoch, record):
                on_epoch_end(epoch, record)
                if kill_after_first:
                    raise KeyboardInterrupt

            search(gated, cost, 0.3, loader, epochs, progress=False, optimizers=optimizers,
                   loss=loss, regulariser=first_step, start_epoch=start_epoch,
                   on_epoch_end=end, on_step=trace)

        parts = {"model": gated, "loss": loss, "trace": trace,
                 **{f"optimizer{i}": o for i, o in enumerate(optimizers)}}
        try:
            pipeline._resumable_stage(run, "search", parts, epochs, fit)
        except KeyboardInterrupt:
            seen["killed_lam"] = loss.lam
        return seen

    first = stage(kill_after_first=True)
    assert first["start"] == 0 and first["lam"] == LAMBDA_INIT
    assert first["killed_lam"] != LAMBDA_INIT  # the 0.3 target moved it
    resumed = stage(kill_after_first=False)
    assert resumed["start"] == 1
    assert resumed["lam"] == pytest.approx(first["killed_lam"])
    assert resumed["adam_steps"] > 0  # Adam's moments came back
    assert resumed["lr"] == pytest.approx(lr / 2, rel=0.05)  # cosine half-way, not restarted
    # the per-step trace: epoch 1's steps came back from the checkpoint, epoch 2's followed
    steps = [r["step"] for r in resumed["trace"].steps]
    assert steps == list(range(epochs * len(loader)))
    assert all({"loss", "pred", "aim", "lam"} <= set(r) for r in resumed["trace"].steps)


# -- bad input (issue 14): refused before profiling, no run directory left behind ----------

def _no_cost_model(mp: pytest.MonkeyPatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("profiling / fitting the cost model started")

    mp.setattr(pipeline, "fit_proxy", started)
    mp.setattr(pipeline, "profile", started)


@pytest.mark.parametrize("target, message", [
    (0.01, "below the fastest this model gets on torch-cpu"),
    ("1000ms", "nothing to prune"),
])
def test_unreachable_target_is_refused_before_profiling(target, message, dense, data, tmp_path,
                                                        monkeypatch):
    """A target under the latency of the narrowest model the search may deliver (every group
    at the floor), or a time at or above the dense latency: refused right after measuring,
    and the run directory this call made is gone (a rerun is not blocked by it)."""
    _fast(monkeypatch)
    _no_cost_model(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(WgatesError, match=message) as err:
        _prune(dense, data, run_dir, target_latency=target)
    assert len(str(err.value).splitlines()) == 1
    if target == 0.01:  # names the narrowest model's measured ratio and what to give
        ratio = float(str(err.value).split("gets on torch-cpu: ")[1].split()[0])
        assert 0.01 < ratio < 1 and "give a target of at least" in str(err.value)
    assert not run_dir.exists()
    empty = tmp_path / "empty"  # a directory found empty is left empty, not removed
    empty.mkdir()
    with pytest.raises(WgatesError, match=message):
        _prune(dense, data, empty, target_latency=target, allocation="gradient")
    assert empty.is_dir() and not any(empty.iterdir())


def test_model_with_nothing_to_prune_is_refused_before_the_run_directory(data, tmp_path):
    class OnlyClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32 * 32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    run_dir = tmp_path / "run"
    with pytest.raises(WgatesError, match="no prunable channel group") as err:
        _prune(OnlyClassifier(), data, run_dir)
    assert len(str(err.value).splitlines()) == 1
    assert not run_dir.exists()


def test_wrong_input_shape_is_refused_before_the_run_directory(data, tmp_path):
    colour = create_model("small_cnn", in_channels=3, width_mult=0.25)
    run_dir = tmp_path / "run"
    with pytest.raises(WgatesError, match="input of shape 1x1x32x32") as err:
        _prune(colour, data, run_dir)  # digits: one channel
    assert "takes 3 input channels" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not run_dir.exists()


def test_a_resumed_run_searches_from_the_gates_of_an_unbroken_one(dense, data, tmp_path,
                                                                   monkeypatch):
    """A run killed after its measurements skips them when resumed (the dense latency and
    accuracy, the narrowest model); the gates it starts the search from must still be an
    unbroken run's. Evaluating the dense model drew from the global random state (a
    DataLoader iterator draws its seed), so a resumed run's gates, and its result, differed:
    benchmarks/kills.py found it."""
    _fast(monkeypatch)
    seen = []

    class Killed(Exception):
        pass

    def killed_at_the_search(gated, *args, **kwargs):
        seen.append({k: v.clone() for k, v in gated.state_dict().items()})
        raise Killed

    monkeypatch.setattr(pipeline, "search", killed_at_the_search)
    for resume in (False, True):
        with pytest.raises(Killed):
            _prune(dense, data, tmp_path / "run", resume=resume)
    assert seen[0].keys() == seen[1].keys()
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


# -- every registered method through the same stages (issue 12.1) ---------------------------

def test_unknown_method_is_refused_before_the_run_directory(dense, data, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(WgatesError, match="unknown method 'nope': choose from uniform, l1, "
                       "tp-l1, tp-l2, tp-taylor, wgates") as err:
        _prune(dense, data, run_dir, method="nope")
    assert len(str(err.value).splitlines()) == 1
    assert not run_dir.exists()


def test_a_knob_method_runs_the_same_stages(dense, data, tmp_path, monkeypatch, macs_meter):
    """L1 has no search and no cost model: its knob, bisected on the run's measurements,
    takes the place of both; the band, the fine-tune, the run directory, resume and the
    report are the W-Gates ones."""
    import wgates.baselines

    _fast(monkeypatch)
    _no_cost_model(monkeypatch)  # a knob method needs none
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, method="l1", export=False)
    assert 0.54 <= result.latency_ratio <= 0.6 and result.method == "l1"
    assert result.accuracy_before_finetune == result.accuracy_before_finetune  # measured
    assert result.loop and all(set(r) == {"measured", "spread"} for r in result.loop)
    assert 0.54 <= result.loop[-1]["measured"] <= 0.6  # the bisection ended in the band
    state = json.loads((run_dir / "state.json").read_text())
    assert state["settings"]["method"] == "l1" and state["method"] == "l1"
    assert "finetune" in state and "search" not in state and state["proxy"] is None
    for name in ("model/pruning.json", "pruned/pruning.json", "finetune.pt", "report.md",
                 "latency_check.png"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "Method: `l1`, Li et al., ICLR 2017" in report
    assert "This method does not search" in report and "| loop 0 | - |" in report

    def no_rerun(*args, **kwargs):
        raise AssertionError("the method ran again on a finished run")

    monkeypatch.setitem(wgates.baselines.METHODS, "l1", no_rerun)
    again = _prune(dense, data, run_dir, method="l1", export=False, resume=True)
    assert again.widths == result.widths
    with pytest.raises(WgatesError, match="method was 'l1', now 'uniform'"):
        _prune(dense, data, run_dir, method="uniform", export=False, resume=True)


def test_gdp_searches_with_its_polariser_and_the_latency_gradient(dense, data, tmp_path,
                                                                  monkeypatch, macs_meter):
    """GDP's gates, polariser and latency gradient come from its `GateSearch`, whatever the
    run's allocation; the polariser's annealing step is checkpointed with the search."""
    from wgates.files import load_checkpoint

    _fast(monkeypatch)
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, method="gdp", export=False, allocation="knapsack")
    assert 0.54 <= result.latency_ratio <= 0.6 and result.method == "gdp"
    state = json.loads((run_dir / "state.json").read_text())
    assert (state["kind"], state["allocation"]) == ("gdp", "gradient")
    assert all("polar" in r and "lam" in r for r in state["search_trace"])
    saved = load_checkpoint(run_dir / "search.pt")["state"]
    assert saved["regulariser"] == {"step": len(data[0])}  # one epoch's steps


@pytest.mark.parametrize("backend, multiple, block, step", [("onnxruntime-cpu", None, None, 8),
                                                            ("torch-cpu", 4, None, 4),
                                                            ("torch-cpu", None, 16, 1)])
def test_widths_are_delivered_in_the_backends_channel_multiple(backend, multiple, block, step,
                                                               dense, data, tmp_path,
                                                               monkeypatch, macs_meter):
    """On ONNX Runtime every delivered width is on its grid (multiples of 8 up to MLAS's
    channel block, whole blocks above, or the full width): other widths measured slower
    there. `channel_multiple` sets another step, `channel_block` another block (torch-cpu
    at batch 32 on an AVX-512 host), recorded with the run's settings (a resume with
    another one is refused)."""
    _fast(monkeypatch)
    _no_cost_model(monkeypatch)
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, method="uniform", export=False, backend=backend,
                    channel_multiple=multiple, channel_block=block)
    sizes = {g.name: g.size for g in wgates.gate(dense, torch.randn(1, 1, 32, 32)).groups}
    assert result.widths and all(w % step == 0 or w == sizes[n]
                                 for n, w in result.widths.items())
    assert any(w < sizes[n] for n, w in result.widths.items())
    grid = get_backend(backend).width_grid(multiple, block)
    assert grid[1] == (block or grid[1]) > 1
    assert all(w in allowed_widths(sizes[n], 1, *grid) for n, w in result.widths.items())
    state = json.loads((run_dir / "state.json").read_text())
    assert state["settings"].get("channel_multiple", 1) == step
    assert state["settings"].get("channel_block", step) == grid[1]
    with pytest.raises(WgatesError, match="channel_multiple"):
        _prune(dense, data, run_dir, method="uniform", export=False, backend=backend,
               channel_multiple=2, resume=True)


def test_blocks_widen_the_delivered_widths_after_the_loop(dense, data, tmp_path, monkeypatch,
                                                          macs_meter):
    """`blocks=(8,)`: after the closed loop each group is tried at the end of its block of 8,
    each trial a loop step read beside the cost model; what is delivered is wider and stays
    under the band's ceiling (0.585), and the setting is recorded (a resume with other blocks
    is refused)."""
    _fast(monkeypatch)
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, export=False, blocks=(8,))
    first, *widened = result.loop  # the searched widths, in the band at once here
    assert 0.54 <= first["measured"] <= 0.585 and widened
    assert all(r["threshold"] != r["threshold"] for r in widened)  # trials, then the re-check
    assert first["measured"] < result.latency_ratio <= 0.585  # wider, still under the ceiling
    assert result.latency_ratio == pytest.approx(widened[-1]["measured"])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["settings"]["blocks"] == [8]
    with pytest.raises(WgatesError, match="blocks was \\[8\\], now \\[16\\]"):
        _prune(dense, data, run_dir, export=False, resume=True, blocks=(16,))


def test_blocks_off_the_channel_multiple_are_refused_before_the_run_directory(dense, data,
                                                                             tmp_path):
    with pytest.raises(WgatesError, match=r"blocks \[12\]: each must be a positive multiple"):
        _prune(dense, data, tmp_path / "run", backend="onnxruntime-cpu", blocks=(12,))
    assert not (tmp_path / "run").exists()


def test_readings_that_cannot_be_kept_are_refused_before_the_run_directory(dense, data,
                                                                           tmp_path):
    with pytest.raises(WgatesError, match="folder .*nowhere does not exist; make it or give "
                       "another --readings"):
        _prune(dense, data, tmp_path / "run", readings=tmp_path / "nowhere" / "r.sqlite")
    (tmp_path / "text.sqlite").write_text("not a database")
    with pytest.raises(WgatesError, match="not a wgates latency file"):
        _prune(dense, data, tmp_path / "run", readings=tmp_path / "text.sqlite")
    assert not (tmp_path / "run").exists()


def test_prune_runs_in_the_cuda_layout(dense, data, tmp_path, monkeypatch, macs_meter):
    """`device=` places the model as `wgates.train.place` does: on CUDA, channels_last. That
    layout is run here on the CPU, from the gates reading the weights to the extraction, the
    fine-tune and the checked ONNX export, so the GPU path differs only in the device."""
    _fast(monkeypatch)

    def cuda_layout(model, device):
        return model.to(device).to(memory_format=torch.channels_last)

    monkeypatch.setattr(pipeline, "place", cuda_layout)
    result = _prune(copy.deepcopy(dense), data, tmp_path / "run", device="cpu")
    convs = [m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         and c.weight.shape[0] > 1 for c in convs)
    assert result.macs < result.dense_macs and (tmp_path / "run" / "model.onnx").is_file()


def test_depth_is_off_by_default_above_batch_1_without_a_channel_grid(dense, data, tmp_path,
                                                                      monkeypatch):
    """torch-cpu's grid is (1, 1): at batch 2 the search keeps every block unless asked."""
    _fast(monkeypatch)
    run_dir = tmp_path / "run"
    _prune(dense, data, run_dir, example=torch.randn(2, 1, 32, 32), export=False,
           check_threads=(), blocks=())
    assert "depth" not in json.loads((run_dir / "state.json").read_text())["settings"]


def test_an_auto_channel_block_is_probed_once_and_kept_for_the_resume(dense, data, tmp_path,
                                                                       monkeypatch):
    """`channel_block="auto"`: the probe's block is the run's grid, and a resume takes the
    recorded one instead of probing again (a second reading could differ and refuse it)."""
    from wgates.latency.grid import BlockProbe

    _fast(monkeypatch)
    probed = []

    def probe(model, inputs, backend, threads, multiple):
        probed.append(multiple)
        return BlockProbe(16, {16: (0.4, 0.56, 0.56)})

    monkeypatch.setattr(pipeline, "probe_block", probe)
    run_dir = tmp_path / "run"
    result = _prune(dense, data, run_dir, channel_block="auto", export=False,
                    check_threads=(), blocks=())
    state = json.loads((run_dir / "state.json").read_text())
    assert probed == [None] and state["grid_probe"]["block"] == 16
    assert state["settings"]["channel_block"] == 16
    assert all(w <= 16 or w % 16 == 0 or w == result.sizes[n] for n, w in result.widths.items())
    again = _prune(dense, data, run_dir, channel_block="auto", export=False, resume=True,
                   check_threads=(), blocks=())
    assert len(probed) == 1 and again.widths == result.widths


def test_prune_with_depth_drops_blocks_the_widths_alone_cannot_reach(data, tmp_path,
                                                                     monkeypatch):
    """With a floor of 0.6 no width reaches 0.3 of the MACs; dropping blocks does, and the
    delivered model (saved, reloaded) has them as `Skip`s."""
    from wgates.depth import Skip
    from wgates.models.cifar_resnet import CifarResNet

    _fast(monkeypatch)
    torch.manual_seed(0)
    model = CifarResNet(14, in_channels=1)
    train(model, data[0], 1, lr=0.05, progress=False)
    run_dir = tmp_path / "run"
    result = _prune(model.eval(), data, run_dir, target_latency=0.45, floor=0.6, depth=True,
                    check_threads=(), blocks=())
    skips = [n for n, m in result.model.named_modules() if isinstance(m, Skip)]
    assert skips and json.loads((run_dir / "state.json").read_text())["settings"]["depth"] is True
    reloaded = load_pruned(CifarResNet(14, in_channels=1), run_dir / "model")
    assert [n for n, m in reloaded.named_modules() if isinstance(m, Skip)] == skips
