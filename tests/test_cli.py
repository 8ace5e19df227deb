"""The inspect and export subcommands, called in-process through wgates.cli.main."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import wgates
from wgates.baselines import METHODS
from wgates.cli import main
from wgates.errors import WgatesError
from wgates.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_default_model(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "small_cnn, input 1x1x32x32" in out
    for name in ("features.0.0", "features.2.0", "features.4.0", "features.5.0"):
        assert name in out
    assert "4 groups, 704 prunable channels" in out
    assert "parameters" in out and "MACs" in out


def test_inspect_options(capsys):
    args = ["inspect", "--model", "resnet20", "--input-shape", "1,3,32,32",
            "--min-channels", "16", "--ignore", "layer3.1.conv1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    rows = {r[0]: r for r in lines if r and r[0].startswith("layer")}
    assert "layer1.0.conv1" not in rows  # at min_channels already
    assert "layer3.1.conv1" not in rows and "layer3.0.conv2" not in rows  # ignored, and read
    assert rows["layer2.0.conv2"][1:4] == ["32", "4", "4"]  # size, producers, consumers
    assert "6 groups, 256 prunable channels" in out


def test_inspect_says_which_blocks_depth_may_drop(capsys):
    assert main(["inspect", "--model", "resnet20", "--depth"]) == 0
    notes = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert notes["layer1.2.conv1"].endswith("at 0 channels drops block layer1.2")
    assert "drops" not in notes["layer2.0.conv1"] and "drops" not in notes["conv1"]


def test_inspect_shows_grouped_conv_ties(tmp_path, capsys):
    net = tmp_path / "net.py"
    net.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    default_input_shape = (3, 16, 16)\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(3, 16, 3, padding=1)\n"
        "        self.b = nn.Conv2d(16, 8, 3, padding=1, groups=4)\n"
        "        self.fc = nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))\n"
    )
    assert main(["inspect", "--model", f"{net}:Net"]) == 0
    out = capsys.readouterr().out
    assert "grouped conv ties: 4 units of 4 channels" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--model", "no_such_model"], "unknown model"),
        (["inspect", "--input-shape", "1,3,32,32"], "could not trace"),
        (["inspect", "--ignore", "nope"], "no module named"),
        (["export", "--model", "resnet20", "--weights", "missing.safetensors"], "does not exist"),
        (["export", "--model", "resnet20", "--pruned", "no_dir"], "not found"),
        (["train", "--device", "banana", "--out", "w.safetensors"], "is not a device"),
        (["prune", "--device", "banana"], "is not a device"),
    ] + ([] if torch.cuda.is_available() else [
        (["train", "--device", "cuda", "--out", "w.safetensors"], "no CUDA GPU"),
        (["prune", "--device", "cuda"], "no CUDA GPU"),
    ]),
)
def test_user_errors_are_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("wgates: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_export_dense_with_weights(tmp_path, capsys):
    model = create_model("small_cnn")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "cnn.onnx"
    assert main(["export", "--model", "small_cnn", "--weights", str(tmp_path / "w.safetensors"),
                 "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 100_000
    printed = capsys.readouterr().out
    assert str(out) in printed and "max |ONNX Runtime - PyTorch|" in printed


def test_export_pruned(resnet20, x32, make_masks, tmp_path, capsys):
    gated = wgates.gate(resnet20, x32, verify=False)
    gated.set_masks(make_masks(gated))
    small = gated.extract()
    wgates.save_pruned(small, tmp_path / "pruned")
    out = tmp_path / "pruned.onnx"
    assert main(["export", "--model", "resnet20", "--pruned", str(tmp_path / "pruned"),
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert "input 1x3x32x32" in capsys.readouterr().out
    dense_size = torch.nn.utils.parameters_to_vector(resnet20.parameters()).numel() * 4
    assert out.stat().st_size < dense_size


@pytest.mark.parametrize("args", [
    ["inspect", "--input-shape", "banana"],
    ["export", "--model", "resnet20", "--weights", "a.pt", "--pruned", "dir"],
    ["export"],
])
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["banana", "-1", "1.5", "0ms"])
def test_bad_target_is_refused_before_any_work(target, tmp_path, capsys):
    import time

    run_dir = tmp_path / "run"
    start = time.perf_counter()
    code = main(["prune", "--target-latency", target, "--run-dir", str(run_dir)])
    assert code == 2 and time.perf_counter() - start < 5  # no dense training, no measuring
    err = capsys.readouterr().err
    assert err.startswith("wgates: error: target latency") and "Traceback" not in err
    assert not run_dir.exists()  # nothing left that would block the next run


def test_train_resumes_exactly_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    import wgates.train

    def args(out, *more):
        return ["train", "--model", "small_cnn", "--data", "digits", "--subset", "96",
                "--batch-size", "32", "--epochs", "2", "--out", str(out), *more]

    whole = tmp_path / "whole.safetensors"
    assert main(args(whole)) == 0
    assert not whole.with_name(whole.name + ".ckpt").exists()  # finished: checkpoint gone
    record = json.loads(whole.with_suffix(".json").read_text())
    assert [r["epoch"] for r in record["history"]] == [1, 2]

    real_train = wgates.train.train

    def stopped_after_epoch_1(*a, on_epoch_end, **k):
        def hook(epoch, rec):
            on_epoch_end(epoch, rec)
            raise KeyboardInterrupt  # the stop comes right after the checkpoint
        return real_train(*a, on_epoch_end=hook, **k)

    cut = tmp_path / "cut.safetensors"
    monkeypatch.setattr(wgates.train, "train", stopped_after_epoch_1)
    assert main(args(cut)) == 130 and not cut.exists()
    monkeypatch.setattr(wgates.train, "train", real_train)
    assert main(args(cut)) == 2  # a checkpoint is there: refuse to overwrite it silently
    assert "--resume" in capsys.readouterr().err
    assert main(args(cut, "--lr", "0.5", "--resume")) == 2
    assert "lr was 0.1, now 0.5" in capsys.readouterr().err
    assert main(args(cut, "--resume")) == 0
    a, b = load_file(whole), load_file(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same result as the unstopped run


def test_cli_and_api_share_the_prune_defaults():
    import inspect

    from wgates.cli import build_parser
    from wgates.pipeline import prune

    args = build_parser().parse_args(["prune"])
    api = inspect.signature(prune).parameters
    for name in ("method", "epochs", "finetune_epochs", "samples", "allocation", "ramp",
                 "floor", "depth", "distill", "threads", "isolated", "channel_multiple",
                 "channel_block"):
        assert getattr(args, name) == api[name].default, name
    assert tuple(args.check_threads) == api["check_threads"].default == (1, 2)
    assert tuple(args.blocks) == api["blocks"].default
    # `wgates measure` checks the same thread counts by default, the pruned-for one first
    measure = build_parser().parse_args(["measure", "--model", "m", "--pruned", "d"])
    assert measure.threads == [1, 2]


def test_measure_re_measures_a_pruned_model(tmp_path, capsys):
    model = create_model("small_cnn")
    gated = wgates.gate(model, torch.randn(1, 1, 32, 32), verify=False)
    gated.set_masks(gated.masks_for_widths({g.name: g.size // 4 for g in gated.groups}))
    wgates.save_pruned(gated.extract(), tmp_path / "pruned")
    code = main(["measure", "--model", "small_cnn", "--pruned", str(tmp_path / "pruned"),
                 "--threads", "1", "--batch", "1", "2", "--repeats", "1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["threads", "batch", "latency"] and len(lines) == 3
    assert [line.split()[:2] for line in lines[1:]] == [["1", "1"], ["1", "2"]]
    ratios = [float(line.split()[2]) for line in lines[1:]]
    assert all(0.0 < r < 0.8 for r in ratios), ratios  # a quarter of every width is faster


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import wgates.files

    real_replace = os.replace

    def full(src, dst):  # the temporary file was written; the disk fills before the rename
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(wgates.files.os, "replace", full)
    out = tmp_path / "dense.safetensors"
    code = main(["train", "--model", "small_cnn", "--data", "digits", "--subset", "32",
                 "--epochs", "1", "--out", str(out)])
    monkeypatch.setattr(wgates.files.os, "replace", real_replace)
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no half-written checkpoint or weights


# -- bad input (issue 14): one line, exit 2, no traceback, before any long work ------------

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after a cleared progress bar
    assert err.startswith("wgates: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Dense training (and, for the data checks, loading data) would fail the test."""
    import wgates.train

    def trained(*args, **kwargs):
        raise AssertionError("dense training started before the input was checked")

    monkeypatch.setattr(wgates.train, "train", trained)


NETS = '''
import torch
from torch import nn

class OnlyClassifier(nn.Module):
    default_input_shape = (1, 32, 32)
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(32 * 32, num_classes)
    def forward(self, x):
        return self.fc(x.flatten(1))

class ColourNet(nn.Module):
    default_input_shape = (3, 32, 32)
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


@pytest.mark.parametrize("command", ["prune", "train"])
def test_unknown_model_is_refused_before_any_data(command, tmp_path, monkeypatch, capsys):
    import wgates.data

    def loaded(*args, **kwargs):
        raise AssertionError("data loaded before the model spec was checked")

    monkeypatch.setattr(wgates.data, "make_loaders", loaded)
    run_dir, out = tmp_path / "run", tmp_path / "w.safetensors"
    where = ["--run-dir", str(run_dir)] if command == "prune" else ["--out", str(out)]
    assert main([command, "--model", "nosuchnet", *where]) == 2
    err = _one_line_error(capsys)
    assert "unknown model 'nosuchnet'" in err and "resnet20" in err and "file.py:ClassName" in err
    assert not run_dir.exists() and not out.exists()


def test_model_with_nothing_to_prune_is_refused_before_training(nets, tmp_path, no_training,
                                                                 capsys):
    run_dir = tmp_path / "run"
    code = main(["prune", "--model", f"{nets}:OnlyClassifier", "--subset", "10",
                 "--run-dir", str(run_dir)])
    assert code == 2
    err = _one_line_error(capsys)
    assert "no prunable channel group" in err and "wgates inspect" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["train", "prune"])
def test_wrong_input_shape_is_refused_before_training(command, nets, tmp_path, no_training,
                                                      capsys):
    run_dir, out = tmp_path / "run", tmp_path / "w.safetensors"
    where = ["--run-dir", str(run_dir)] if command == "prune" else ["--out", str(out)]
    code = main([command, "--model", f"{nets}:ColourNet", "--data", "digits", "--subset", "10",
                 *where])
    assert code == 2
    err = _one_line_error(capsys)
    assert "input of shape 1x1x32x32" in err  # what was given
    assert "takes 3 input channels" in err and "meant for 3x32x32" in err  # what it expects
    assert not run_dir.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == [nets]


@pytest.mark.parametrize("target, message", [
    ("0.01", "below the fastest this model gets"),  # under every group at its floor
    ("1000ms", "nothing to prune"),  # at or above the dense latency
])
def test_unreachable_target_is_refused_before_training(target, message, tmp_path, monkeypatch,
                                                       no_training, capsys):
    import wgates.pipeline
    from wgates.latency import Protocol

    fast = Protocol(rounds=10, min_block_s=0.0005, retries=0, busy_sleep_s=0.2, max_wait_s=5.0)
    monkeypatch.setattr(wgates.pipeline, "Protocol", lambda: fast)
    run_dir = tmp_path / "run"
    code = main(["prune", "--target-latency", target, "--subset", "10", "--samples", "10",
                 "--run-dir", str(run_dir)])
    assert code == 2
    err = _one_line_error(capsys)
    assert message in err
    if target == "0.01":  # says what the floor is and what to give instead
        assert "every channel group at 0.25 of its width" in err and "at least 0." in err
    assert not run_dir.exists()


def test_bad_image_found_by_a_loader_worker_is_one_line(tmp_path, capsys):
    """A file that is not an image, read in a DataLoader worker process: the worker's error
    comes back with its traceback in the message; the command prints the message alone."""
    from PIL import Image

    (tmp_path / "nets.py").write_text(NETS)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (24, 24), (60 * i, 0, 0)).save(folder / f"{i}.png")
    bad = tmp_path / "data" / "train" / "dog" / "1.png"  # not the first of its class
    bad.write_bytes(b"not an image")
    out = tmp_path / "w.safetensors"
    code = main(["train", "--model", f"{tmp_path / 'nets.py'}:ColourNet", "--data",
                 f"imagefolder:{tmp_path / 'data'}", "--workers", "1", "--epochs", "1",
                 "--out", str(out)])
    assert code == 2
    err = _one_line_error(capsys)
    assert f"cannot read image {bad}" in err and "delete or replace" in err
    assert not out.exists()


# -- one method choice everywhere (issue 12.1) ----------------------------------------------

def test_methods_lists_every_method_with_its_paper(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    rows = {line.split()[0]: line for line in lines}
    assert rows["wgates"].split()[1] == "gates" and rows["wgates"].endswith("(default)")
    assert rows["l1"].split()[1] == "knob"
    for name, paper in [("wgates", "arXiv 2007.02066"), ("gdp", "Guo et al."),
                        ("l1", "Pruning Filters for Efficient ConvNets"),
                        ("tp-l2", "Fang et al., CVPR 2023"), ("tp-taylor", "Molchanov"),
                        ("uniform", "uniform width scaling"), ("scop", "knockoff"),
                        ("functional", "Qin et al.")]:
        assert paper in rows[name], name


def test_unknown_method_is_one_line_before_any_data(tmp_path, monkeypatch, capsys):
    import wgates.data

    def loaded(*args, **kwargs):
        raise AssertionError("data loaded before the method was checked")

    monkeypatch.setattr(wgates.data, "make_loaders", loaded)
    run_dir = tmp_path / "run"
    assert main(["prune", "--method", "magic", "--run-dir", str(run_dir)]) == 2
    err = _one_line_error(capsys)
    assert "unknown method 'magic': choose from uniform, l1, tp-l1" in err
    assert "wgates-gradient" in err and not run_dir.exists()


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    """A small_cnn trained one epoch on a digits subset, as a weights file."""
    from wgates.data import make_loaders
    from wgates.train import train

    torch.manual_seed(0)
    model = create_model("small_cnn")
    train(model, make_loaders("digits", batch_size=32, subset=64)[0], 1, lr=0.05,
          progress=False)
    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_prune_runs_every_method(method, digits_weights, tmp_path, macs_meter, monkeypatch,
                                 capsys):
    """`wgates prune --method M` for every registered method: the same stages, the same band
    [(1 - tolerance) * target, target] for the delivered model (measured, here by the
    deterministic MACs meter), the same run directory and report."""
    import functools

    import wgates.pipeline

    monkeypatch.setattr(wgates.pipeline, "fit_proxy",
                        functools.partial(wgates.pipeline.fit_proxy, samples=12))
    run_dir = tmp_path / "run"
    code = main(["prune", "--method", method, "--weights", str(digits_weights), "--subset",
                 "64", "--batch-size", "32", "--epochs", "1", "--finetune-epochs", "1",
                 "--proxy", "flops", "--target-latency", "0.6", "--run-dir", str(run_dir)])
    assert code == 0
    assert f"{method}: pruned for and measured on" in capsys.readouterr().out
    state = json.loads((run_dir / "state.json").read_text())
    assert state["settings"]["method"] == method
    ratio = state["result"]["latency_ratio"]
    assert 0.95 * 0.6 <= ratio <= 0.6, f"{method}: {ratio:.3f}"
    assert state["finetune"] and state["result"]["widths"] != state["result"]["sizes"]
    for name in ("model/model.safetensors", "model.onnx", "report.md", "state.json"):
        assert (run_dir / name).is_file(), name
    assert f"Method: `{method}`" in (run_dir / "report.md").read_text()


def test_earlier_names_of_the_method_still_work():
    """`--gates` and `prune(kind=)` were the method's names before `--method`: kept."""
    from wgates.cli import build_parser
    from wgates.pipeline import prune

    assert build_parser().parse_args(["prune", "--gates", "plain"]).method == "plain"
    with pytest.warns(DeprecationWarning, match="method="), \
            pytest.raises(WgatesError, match="nope"):
        prune(torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8), None, None, kind="nope")


def _profile_kwargs(monkeypatch, found_block: int, args: list[str]) -> dict:
    """What `wgates profile ARGS` passes to `wgates.latency.profile`, where the channel-block
    probe finds `found_block` (nothing is measured)."""
    import wgates.latency
    import wgates.latency.grid

    seen = {}

    def profile(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(wgates.latency, "profile", profile)
    monkeypatch.setattr(wgates.latency.grid, "probe_block", lambda *a, **k: (
        wgates.latency.BlockProbe(found_block, {16: (0.64, 0.86, 0.85)})))
    with pytest.raises(SystemExit):
        main(["profile", *args])
    return seen


@pytest.mark.parametrize("flags, shape, expected, block", [
    ([], "1,3,32,32", True, None),  # batch 1: depth by default, as prune decides it
    ([], "8,3,32,32", False, None),  # batch 8 on torch-cpu's (1, 1) grid: no depth
    (["--channel-block", "16"], "8,3,32,32", True, 16),  # a channel grid: depth
    (["--channel-block", "auto"], "8,3,32,32", True, 16),  # the block probed: 16 here
    (["--no-depth"], "1,3,32,32", False, None),
])
def test_profile_samples_dropped_blocks_where_prune_would_drop_them(flags, shape, expected,
                                                                   block, tmp_path,
                                                                   monkeypatch):
    """A profile made for `prune --predictor` must have seen the drops that search may make,
    on the grid prune will deliver."""
    seen = _profile_kwargs(monkeypatch, 16, [
        "--model", "resnet20", "--input-shape", shape, "--samples", "2",
        "--out", str(tmp_path / "lat.sqlite"), *flags])
    assert seen["depth"] is expected and seen["channel_block"] == block


def test_profile_auto_block_finding_none_keeps_the_backends_own_grid(tmp_path, monkeypatch):
    seen = _profile_kwargs(monkeypatch, 1, [
        "--model", "resnet20", "--backend", "onnxruntime-cpu", "--channel-block", "auto",
        "--out", str(tmp_path / "lat.sqlite")])
    assert seen["channel_block"] is None  # ONNX Runtime's own (8, 16) grid, not (8, 8)
