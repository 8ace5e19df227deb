"""The benchmark scripts parse their arguments, and the ImageNet recipe runs end to end on a
tiny generated ImageFolder (tiny model, one step per epoch, CPU)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wgates.models import create_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("script", ["cifar10.py", "imagenet.py", "search_diagnosis.py",
                                    "distill.py", "host_spells.py", "width_steps.py", "widths.py"])
def test_help(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


def test_host_spells_replay_drops_slow_readings_and_refuses_a_missing_model(tmp_path):
    """Two processes: the first catches a spell (reference 1.5x its quietest time) in three
    of its readings, which the 1.2 filter leaves out of its figure."""
    rows = [(0, 0.70, 2.5), (0, 0.80, 3.8), (0, 0.81, 3.9), (0, 0.79, 3.7), (0, 0.69, 2.6),
            (0, 0.71, 2.5), (1, 0.70, 2.5), (1, 0.69, 2.6), (1, 0.71, 2.4), (1, 0.70, 2.5),
            (1, 0.70, 2.5)]
    log = tmp_path / "spells.jsonl"
    log.write_text("".join(json.dumps({"process": p, "ratio": r, "dense_ms": d}) + "\n"
                           for p, r, d in rows))
    result = run("host_spells.py", "replay", str(log))
    assert result.returncode == 0, result.stderr
    assert "calm_slowdown inf: per-process figure 0.700-0.790" in result.stdout
    assert "calm_slowdown 1.2: per-process figure 0.700-0.700" in result.stdout
    result = run("host_spells.py", "hogs", "--pruned", str(tmp_path))
    assert result.returncode != 0 and "give --pruned DIR" in result.stderr


def test_host_spells_pooled_bins_kept_readings_by_the_reference_slowdown(tmp_path):
    """One architecture read 8 times at the quiet pace (0.50) and twice with the reference
    15% slow (0.55): the slow bin reads 10% over the architecture's median."""
    import sqlite3

    path = tmp_path / "latency.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE readings (setting TEXT, arch TEXT, ratio REAL, spread REAL, "
               "dense_ms REAL, created REAL)")
    rows = [(0.50, 1.0)] * 8 + [(0.55, 1.15)] * 2
    db.executemany("INSERT INTO readings VALUES ('s', 'a', ?, 0, ?, 0)", rows)
    db.commit()
    db.close()
    result = run("host_spells.py", "pooled", str(path), "--step", "0.05")
    assert result.returncode == 0, result.stderr
    assert "1.00-1.05 x quietest:    8 readings, ratio off its architecture's median by " \
        "+0.00%" in result.stdout
    assert "1.15-1.20 x quietest:    2 readings, ratio off its architecture's median by " \
        "+10.00%" in result.stdout


def test_imagenet_config_is_valid():
    sys.path.insert(0, str(BENCH))
    try:
        from imagenet import load_settings
    finally:
        sys.path.remove(str(BENCH))
    settings = load_settings(BENCH / "configs" / "imagenet.json", ["seeds=[0, 1]"], "/x")
    assert settings.data == "imagefolder:/x" and settings.seeds == [0, 1]
    assert set(settings.models) == {"resnet34", "resnet50", "mobilenet_v2"}


def test_imagenet_smoke(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    tiny = {"tiny": {"spec": "small_cnn", "kwargs": {"in_channels": 3, "width_mult": 0.25}}}
    overrides = {
        "models": tiny, "backends": {"tiny": ["torch-cpu"]}, "device": "cpu",
        "methods": ["uniform", "tp-l2", "wgates"], "targets": [0.5], "image_size": 64,
        "batch_size": 8, "workers": 0, "search_epochs": 1, "finetune_epochs": 1,
        "lpnet_samples": 10, "protocol_rounds": 6, "max_wait_s": 2.0, "tolerance": 0.5,
    }
    args = [f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]
    result = run("imagenet.py", "--data", str(tmp_path / "data"), "--name", "smoke",
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "smoke.md").read_text()
    for method in ("dense", "uniform", "tp-l2", "wgates"):
        assert f"| {method} |" in text
    assert (tmp_path / "out" / "smoke_tiny_torch-cpu@1.png").is_file()
    rows = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert all(r["ratio"] < 1.0 for r in rows if r["method"] != "dense")


def cifar10_module():
    sys.path.insert(0, str(BENCH))
    try:
        import cifar10
    finally:
        sys.path.remove(str(BENCH))
    return cifar10


def test_pivot_and_resume_keys():
    c = cifar10_module()
    pivot, row_key, summarise = c.pivot, c.row_key, c.summarise
    rows = [{"model": "m", "backend": "b", "target": t, "method": k, "seed": s,
             "accuracy": a, "ratio": t, "macs": 1, "params": 1, "wall_s": 0.0}
            for t, k, s, a in [(1.0, "dense", 0, 0.9), (0.5, "x", 0, 0.6), (0.5, "x", 1, 0.4),
                               (0.7, "x", 0, 0.8)]]
    text = pivot(summarise(rows))
    assert "| m | b | x | 80.00 (0.700) | 50.00 (0.500) |" in text  # mean over seeds
    assert "dense" not in text.split("\n", 3)[3]
    assert pivot(summarise(rows[:2])) == ""  # one target: no pivot
    assert len({row_key(r) for r in rows}) == 4


def test_set_overrides_take_json_or_a_plain_string():
    c = cifar10_module()
    out = c.apply_overrides({}, ["floor=0.5", "importance=loss", 'targets=[0.5]'])
    assert out == {"floor": 0.5, "importance": "loss", "targets": [0.5]}
    with pytest.raises(SystemExit, match="key of Settings"):
        c.apply_overrides({}, ["nope=1"])


def test_budget_regimes_and_paired_differences():
    c = cifar10_module()
    settings = c.MODES["regime"]
    assert settings.finetune_for("wgates") == 3 and settings.finetune_for("uniform") == 6
    assert c.regime("torch-cpu@32") == ("torch-cpu", 32) and c.regime("torch-cpu") == (
        "torch-cpu", 1)
    rows = [{"model": "m", "backend": "b", "batch": 32, "target": 0.5, "method": k, "seed": s,
             "accuracy": a, "ratio": 0.5, "macs": 1, "params": 1, "wall_s": 0.0,
             "widths": [4, 8]}
            for k, s, a in [("wgates", 0, 0.80), ("wgates", 1, 0.82), ("uniform", 0, 0.78),
                            ("uniform", 1, 0.79), ("l1", 0, 0.70), ("wgates", 2, 0.9)]]
    text = c.paired(rows)
    # best alternative by mean is uniform; seeds 0 and 1 are paired, seed 2 has no partner
    assert "| m | b@32 | 0.50 | uniform | 2 | +2.00 / +3.00 | +2.50 ± 0.71 |" in text
    assert c.row_key(rows[0]) != c.row_key({**rows[0], "batch": 1})
    assert "| m | b@32 | 0.50 | wgates | 0 | 4 8 |" in c.widths_table(rows)


def test_data_comes_from_argument_or_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WGATES_CIFAR10", raising=False)
    result = run("cifar10.py", "--quick", "--out", str(tmp_path))
    assert result.returncode == 2 and "WGATES_CIFAR10" in result.stderr
    c = cifar10_module()
    monkeypatch.setenv("WGATES_CIFAR10", "/some/where")
    assert c.data_spec(None, None) == "cifar10:/some/where"
    assert c.data_spec("digits", None) == "digits"


def test_merge_and_remeasure_read_no_data_and_write_one_named_file(monkeypatch, tmp_path):
    """Combining or re-measuring results files reads no images: no WGATES_CIFAR10 needed."""
    monkeypatch.delenv("WGATES_CIFAR10", raising=False)
    row = {"model": "resnet20", "backend": "torch-cpu", "batch": 1, "target": 0.5,
           "method": "uniform", "seed": 0, "accuracy": 0.5, "ratio": 0.5, "macs": 1,
           "params": 1, "wall_s": 0.0, "widths": [4, 8]}
    (tmp_path / "a.json").write_text(json.dumps([row]))
    result = run("cifar10.py", "--regime", "--out", str(tmp_path), "--merge", "a", "--name", "b")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.md").exists()
    result = run("cifar10.py", "--regime", "--out", str(tmp_path), "--cache", str(tmp_path),
                 "--remeasure", "a")  # nothing kept to measure: the file is rewritten in place
    assert result.returncode == 0 and (tmp_path / "a.md").exists(), result.stderr
    assert not (tmp_path / "cifar10_regime.md").exists()
    result = run("cifar10.py", "--regime", "--out", str(tmp_path), "--remeasure", "a", "b")
    assert result.returncode == 2 and "--name" in result.stderr


def test_at_widths_rebuilds_a_rows_architecture():
    """A row's widths are enough to re-measure it: the rebuilt model has exactly them."""
    c = cifar10_module()
    dense = create_model("resnet20", 10).eval()
    inputs = (torch.randn(1, 3, 32, 32),)
    widths = c.conv_widths(dense)
    widths[:7] = [5] * 7  # the stage-1 residual stream and its blocks' inner convs
    widths[7] = 20  # stage 2, first block's inner conv
    small = c.at_widths(dense, widths, inputs)
    assert c.conv_widths(small) == widths
    assert small(*inputs).shape == (1, 10)
    assert c.at_widths(dense, [4, 8], inputs) is None
    uneven = [*widths[:2], 6, *widths[3:]]  # one residual stream, two widths
    assert c.at_widths(dense, uneven, inputs) is None
    widths[3:5] = [0, 0]  # layer1.1 dropped: its convs are gone, recorded as 0
    small = c.at_widths(dense, widths, inputs)
    assert c.conv_widths(small, dense) == widths and len(c.conv_widths(small)) == 19


def test_merge_keeps_each_row_once(tmp_path):
    c = cifar10_module()
    row = {"model": "m", "backend": "b", "batch": 1, "target": 0.5, "method": "x", "seed": 0,
           "accuracy": 0.5}
    (tmp_path / "a.json").write_text(json.dumps([row]))
    (tmp_path / "b.json").write_text(json.dumps([{**row, "accuracy": 0.9},
                                                 {**row, "method": "y"}]))
    rows = c.merged([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(r["method"], r["accuracy"]) for r in rows] == [("x", 0.5), ("y", 0.5)]


def test_profile_only_fills_the_cache_without_weights_or_data(tmp_path):
    """The profile needs the architecture alone, so it can run beside the dense training."""
    result = run("cifar10.py", "--regime", "--profile-only", "--data", "digits", "--cache",
                 str(tmp_path), "--set", 'backends={"resnet20":["torch-cpu@1"]}',
                 "--set", "lpnet_samples=12", "--set", "protocol_rounds=10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet20 torch-cpu@1: profile + fit" in result.stdout
    assert (tmp_path / "resnet20_torch-cpu_(1, 3, 32, 32).sqlite").is_file()


def test_remeasure_adds_each_kept_model_measured_alone(tmp_path):
    tiny = {"tiny": {"spec": "small_cnn", "kwargs": {"width_mult": 0.25}}}
    overrides = {"models": tiny, "backends": {"tiny": ["torch-cpu@1"]}, "methods": ["uniform"],
                 "subset": 64, "val_subset": 64, "dense_epochs": 1, "lpnet_samples": 10,
                 "protocol_rounds": 6, "max_wait_s": 2.0, "tolerance": 0.5,
                 "isolated": True,  # the run measures in its workers, --remeasure in new ones
                 "processes": 1,  # one measuring process a model: the test's time
                 "remember": True}  # the run's readings kept, --remeasure independent of them
    common = ["--quick", "--data", "digits", "--name", "smoke", "--out", str(tmp_path / "out"),
              "--cache", str(tmp_path / "cache"),
              *[f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]]
    result = run("cifar10.py", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "cache" / "models" / "smoke" / "tiny_torch-cpu@1_0.5_uniform_0").is_dir()
    (profile,) = (tmp_path / "cache").glob("tiny_torch-cpu_*.sqlite")

    def readings() -> int:
        with sqlite3.connect(profile) as db:
            return db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]

    kept = readings()
    assert kept > 0
    # no --set: the run's own settings (which model, which regime) are read back
    result = run("cifar10.py", "--quick", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache"), "--remeasure", "smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke: tiny uniform seed 0:" in result.stdout
    rows = json.loads((tmp_path / "out" / "smoke.json").read_text())
    (pruned,) = [r for r in rows if r["method"] == "uniform"]
    assert 0 < pruned["ratio_quiet"] < 1
    report = (tmp_path / "out" / "smoke.md").read_text()
    assert "re-measured alone" in report
    command, then = (line for line in report.splitlines() if line.startswith(("Command:", "Then:")))
    assert "--remeasure" not in command and "--set=lpnet_samples=10" in command
    assert then.startswith("Then:") and "--remeasure smoke" in then
    assert '"lpnet_samples": 10' in report  # the run's settings, not --quick's
    assert readings() == kept  # the re-measurement pooled nothing
    shutil.rmtree(tmp_path / "cache" / "models")  # another machine: only the results file
    result = run("cifar10.py", "--quick", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache"), "--remeasure", "smoke",
                 "--set=processes=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (again,) = [r for r in json.loads((tmp_path / "out" / "smoke.json").read_text())
                if r["method"] == "uniform"]
    assert again["quiet_from"] == "widths" and 0 < again["ratio_quiet"] < 1
    record = tmp_path / "out" / "smoke.run.json"
    recorded = json.loads(record.read_text())
    # --set changed the re-measurement (the Then: line says how), not what the run was
    assert recorded["settings"]["processes"] == 1
    assert "--set=processes=2" in (tmp_path / "out" / "smoke.md").read_text()
    recorded["settings"]["gone"] = 1  # a setting of an older version of the script
    record.write_text(json.dumps(recorded))
    result = run("cifar10.py", "--quick", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache"), "--remeasure", "smoke")
    assert result.returncode != 0 and "no longer knows (gone)" in result.stderr
    assert "Traceback" not in result.stderr


TICKER = """
import sys, time
sys.path.insert(0, {bench!r})
from lanes import Lanes
Lanes({folder!r})
with open({out!r}, "w") as f:
    while True:
        print(time.time(), file=f, flush=True)
        time.sleep(0.005)
"""

MEASURER = """
import os, sys, time
sys.path.insert(0, {bench!r})
from lanes import Lanes
lanes = Lanes({folder!r})
while not lanes.others():
    time.sleep(0.01)
with lanes.alone():
    start = time.time()
    time.sleep(0.6)
    end = time.time()
    print(start, end, lanes.paused, flush=True)
    if {die}:
        os.kill(os.getpid(), 9)  # killed while measuring: the ticker stays paused
"""


def lane(code: str, **fields) -> subprocess.Popen:
    source = code.format(bench=str(BENCH), **{k: str(v) for k, v in fields.items()})
    return subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True)


def ticks(path: Path) -> np.ndarray:
    return np.array([float(t) for t in path.read_text().split()[:-1]])


def test_lanes_pause_each_other_while_one_measures(tmp_path):
    """A measurement inside `Lanes.alone()` runs while the other lane makes no progress at
    all, and the other lane goes on afterwards; a lane killed while measuring leaves the
    other paused until any lane starts again."""
    out = tmp_path / "ticks"
    ticker = lane(TICKER, folder=tmp_path / "lanes", out=out)
    try:
        for die in (False, True):
            measurer = lane(MEASURER, folder=tmp_path / "lanes", die=die)
            start, end, paused = measurer.communicate(timeout=60)[0].split()
            seen = ticks(out)
            assert int(paused) == 1
            assert not ((seen > float(start) + 0.05) & (seen < float(end))).any()
            before = len(seen)
            time.sleep(0.3)
            assert (len(ticks(out)) > before) != die  # killed mid-measurement: still paused
        lane(MEASURER.replace("while not", "while False and not"), folder=tmp_path / "lanes",
             die=False).communicate(timeout=60)  # any lane starting resumes the others
        before = len(ticks(out))
        time.sleep(0.3)
        assert len(ticks(out)) > before
    finally:
        ticker.kill()


def test_any_command_runs_as_a_lane_and_is_paused(tmp_path):
    """`lanes.py DIR -- COMMAND` (how a test suite runs beside benchmark lanes): the command,
    which knows nothing of lanes, makes no progress while a lane measures."""
    out = tmp_path / "ticks"
    ticker = subprocess.Popen([
        sys.executable, str(BENCH / "lanes.py"), str(tmp_path / "lanes"), "--", sys.executable,
        "-c", TICKER.replace("Lanes({folder!r})", "").format(bench=str(BENCH), out=str(out)),
    ])
    try:
        while not out.exists() or len(ticks(out)) < 2:  # the command is running
            time.sleep(0.05)
        measurer = lane(MEASURER, folder=tmp_path / "lanes", die=False)
        start, end, paused = measurer.communicate(timeout=60)[0].split()
        seen = ticks(out)
        assert int(paused) == 1
        assert not ((seen > float(start) + 0.05) & (seen < float(end))).any()
        time.sleep(0.3)
        assert len(ticks(out)) > len(seen)  # and goes on afterwards
        # a lane that starts while another measures waits: it resumes no one meanwhile
        measurer = lane(MEASURER, folder=tmp_path / "lanes", die=False)
        time.sleep(0.3)
        late = subprocess.Popen([sys.executable, str(BENCH / "lanes.py"), str(tmp_path / "lanes"),
                                 "--", "true"])
        start, end, paused = measurer.communicate(timeout=60)[0].split()
        late.wait(timeout=60)
        seen = ticks(out)
        assert not ((seen > float(start) + 0.05) & (seen < float(end))).any()
    finally:
        ticker.kill()


def test_killed_runs_resume_to_the_reference_result(tmp_path):
    """A few of benchmarks/kills.py's SIGKILLs (the benchmark runs 50 at random, then one in
    each step): a random one, and one in the closed loop; each killed job, resumed, ends with
    the unkilled job's weights bit for bit."""
    result = run("kills.py", "--kills", "1", "--seed", "1", "--at", "closed loop",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = [json.loads(x) for x in (tmp_path / "kills.jsonl").read_text().splitlines()]
    assert sum(len(t["kills"]) for t in trials) >= 2
    assert [k["at"] for k in trials[-1]["kills"]] == ["closed loop"] and trials[-1]["targeted"]
    assert all(t["same"] for t in trials)
    assert "ended with the reference's result" in (tmp_path / "kills.md").read_text()
