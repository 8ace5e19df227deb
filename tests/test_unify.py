"""Micro-structured weight unification: the blocks, the projection, ADMM with the blocks held
through the fine-tune, the stored size, and `wgates unify`."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wgates.cli import main
from wgates.data import make_loaders
from wgates.models import create_model
from wgates.train import evaluate, train
from wgates.unify import (
    _blocks,
    _unblocks,
    choose_blocks,
    is_unified,
    project,
    stored_bytes,
    unify,
)


@settings(max_examples=25, deadline=None)
@given(o=st.integers(1, 4), i=st.integers(2, 9), k=st.sampled_from([1, 3]),
       block=st.integers(2, 5))
def test_blocks_round_trip_and_run_along_input_channels(o, i, k, block):
    w = torch.randn(o, i, k, k)
    b = _blocks(w, block)
    assert b.shape == (o * k * k, -(-i // block), block)
    torch.testing.assert_close(_unblocks(b, w.shape), w)
    assert torch.equal(b[0, 0, : min(block, i)], w[0, : min(block, i), 0, 0])


@pytest.mark.parametrize("zero", [False, True])
def test_projection_unifies_exactly_the_chosen_share(zero):
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    chosen = choose_blocks(w, 4, 0.25, zero)
    assert int(chosen.sum()) == round(0.25 * chosen.numel())
    p = project(w, chosen, 4, zero)
    b, pb = _blocks(w, 4), _blocks(p, 4)
    inside = pb[chosen]
    if zero:
        assert torch.equal(inside, torch.zeros_like(inside))
        # the smallest blocks were the ones chosen
        assert b[chosen].norm(dim=-1).max() <= b[~chosen].norm(dim=-1).min()
    else:
        assert torch.allclose(inside.abs(), inside.abs()[:, :1].expand_as(inside))
        assert torch.equal(inside.sign(), b[chosen].sign())  # signs kept
    assert torch.equal(pb[~chosen], b[~chosen])  # the rest untouched
    torch.testing.assert_close(project(p, chosen, 4, zero), p)  # idempotent


def test_short_blocks_are_never_unified():
    """3 input channels in blocks of 2: the second block is cut short (padded), so unifying
    it would not hold; and a zero coefficient is unified like any other."""
    w = torch.randn(4, 3, 1, 1)
    w[0, 0] = 0.0
    chosen = choose_blocks(w, 2, 1.0, False)
    assert chosen[:, 0].all() and not chosen[:, 1].any()
    p = project(w, chosen, 2, False)
    torch.testing.assert_close(project(p, chosen, 2, False), p)


def test_unify_holds_the_blocks_and_shrinks_the_stored_model():
    torch.manual_seed(0)
    loader, val, _ = make_loaders("digits", batch_size=32, subset=256, image_size=16)
    model = create_model("small_cnn", width_mult=0.5)
    train(model, loader, 2, lr=0.05, progress=False)
    plain = stored_bytes(model)
    result = unify(model, loader, block=4, ratio=0.5, admm_epochs=1, finetune_epochs=1,
                   admm_every=2, progress=False)
    assert is_unified(model, result)
    assert result.history and "admm_residual" in result.history[0]
    assert evaluate(model, val) > 0.5  # still a working classifier
    assert stored_bytes(model, result) < 0.8 * plain
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]
    conv.weight.data.add_(0.01 * torch.randn_like(conv.weight))
    assert not is_unified(model, result)  # the check can fail


def test_cli_unify_reports_size_accuracy_and_latency(tmp_path, capsys):
    out = tmp_path / "u"
    code = main(["unify", "--subset", "128", "--batch-size", "32", "--admm-epochs", "1",
                 "--finetune-epochs", "1", "--backend", "torch-cpu", "--zero",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "stored (zlib)" in text and "latency" in text
    report = json.loads((out / "unify.json").read_text())
    assert report["stored_bytes"]["unified"] < report["stored_bytes"]["float32"]
    assert 0 < report["latency"]["torch-cpu"]["ratio"] < 2
    assert (out / "model.safetensors").is_file()
    assert main(["unify", "--out", str(out)]) == 2  # not empty: refused
    assert "is not empty" in capsys.readouterr().err


def test_cli_unify_refuses_a_bad_setting_before_any_data(tmp_path, monkeypatch, capsys):
    import wgates.data

    def loaded(*args, **kwargs):
        raise AssertionError("data loaded before the setting was checked")

    monkeypatch.setattr(wgates.data, "make_loaders", loaded)
    assert main(["unify", "--ratio", "1.5", "--out", str(tmp_path / "u")]) == 2
    assert "ratio must be in (0, 1]" in capsys.readouterr().err
