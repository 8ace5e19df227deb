"""Crash-safe writes, and no loader that runs code from a crafted file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from wgates.errors import WgatesError
from wgates.files import atomic_path, load_checkpoint, save_checkpoint, write_json
from wgates.models import create_model
from wgates.predictor import LatencyPredictor

MARK = "wgates-pwned"


class Payload:
    """Unpickling this runs os.system: what a hostile checkpoint would do."""

    def __reduce__(self):
        return os.system, (f"touch {MARK}",)


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)  # torch.save pickles the payload as is
    return path


@pytest.mark.parametrize("loader", [
    lambda p: create_model("small_cnn", weights=p),
    load_checkpoint,
    LatencyPredictor.load,
])
def test_a_crafted_pickle_runs_no_code(crafted, tmp_path, loader):
    with pytest.raises(WgatesError) as err:
        loader(crafted)
    message = str(err.value)
    assert "\n" not in message and "Python objects" in message
    assert "weights_only=False" not in message  # no advice to load it unsafely
    assert not (tmp_path / MARK).exists()


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text().startswith("{") and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_checkpoint_round_trip_and_truncated_file(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint({"epoch": 3, "w": torch.ones(2), "history": [{"loss": 1.0}]}, path)
    blob = load_checkpoint(path)
    assert blob["epoch"] == 3 and blob["history"] == [{"loss": 1.0}]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(WgatesError, match="delete it"):
        load_checkpoint(path)


def test_payload_really_would_run(tmp_path, monkeypatch):
    """The guard above is meaningful: unpickling the same file without it runs the code."""
    monkeypatch.chdir(tmp_path)
    pickle.loads(pickle.dumps(Payload()))
    assert (tmp_path / MARK).exists()
