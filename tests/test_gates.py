"""Gates: all open at init, binarised with a straight-through gradient that reaches both the
gate nets and (for W-Gates) the conv weights through the gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wgates
from wgates.errors import WgatesError
from wgates.gates import SURROGATE_TEMPERATURE, binarize, make_gate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["wgates", "plain"])
def test_all_gates_open_at_init(resnet20, x32, kind):
    gated = wgates.gate(resnet20, x32, kind=kind, verify=False)
    assert gated.widths() == {g.name: g.size for g in gated.groups}
    assert torch.equal(gated.kept_counts(), gated.sizes())
    assert all(bool(g.mask.all()) for g in gated.groups)
    gated.eval()
    with torch.no_grad():  # open gates: the gated model is the dense model
        assert torch.allclose(gated(x32), resnet20(x32), atol=1e-6)


def test_gradients_reach_gate_nets_and_conv_weights(resnet20, x32):
    gated = wgates.gate(resnet20, x32, verify=False).train()
    producer = gated.model.get_submodule("layer1.0.conv1")

    # the width term alone: its only path to the conv weights is through the W-Gate
    gated.kept_counts().sum().backward()
    assert producer.weight.grad is not None and producer.weight.grad.abs().sum() > 0
    # the gate net's last layer starts at zero (first ranking = L1 prior), so its first layer
    # sees gradient from the second step on: take one step, then check every parameter
    torch.optim.SGD(gated.gates.parameters(), lr=0.1).step()
    gated.zero_grad()
    gated.kept_counts().sum().backward()
    for gate in gated.gates:
        grads = [p.grad for p in gate.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0

    # the task loss reaches the gates through the gate multiplications in the forward pass
    gated.zero_grad()
    y = torch.tensor([1, 7])
    nn.functional.cross_entropy(gated(x32), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gated.gates.parameters()
               if p.dim() == 2)  # every gate net's weight matrices
    assert producer.weight.grad.abs().sum() > 0


def test_plain_gates_get_gradients(resnet20, x32):
    gated = wgates.gate(resnet20, x32, kind="plain", verify=False).train()
    loss = nn.functional.cross_entropy(gated(x32), torch.tensor([0, 1]))
    (loss + 1e-3 * gated.kept_counts().sum()).backward()
    for gate in gated.gates:
        for p in gate.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_binarize_is_hard_forward_with_sigmoid_surrogate():
    scores = torch.tensor([-2.0, -0.1, 0.3, 5.0], requires_grad=True)
    gates = binarize(scores, min_channels=1)
    assert gates.tolist() == [0.0, 0.0, 1.0, 1.0]
    gates.sum().backward()
    s = torch.sigmoid(scores.detach() / SURROGATE_TEMPERATURE)
    assert torch.allclose(scores.grad, s * (1 - s) / SURROGATE_TEMPERATURE)
    assert (scores.grad > 0).all()


def test_binarize_keeps_min_channels_open():
    scores = torch.tensor([-3.0, -1.0, -2.0, -0.5], requires_grad=True)
    gates = binarize(scores, min_channels=2)
    assert gates.tolist() == [0.0, 1.0, 0.0, 1.0]  # the two highest scores
    gates.sum().backward()
    assert (scores.grad != 0).all()


@pytest.mark.parametrize("kind", ["wgates", "plain"])
def test_gates_never_close_below_min_channels(resnet20, x32, kind):
    gated = wgates.gate(resnet20, x32, kind=kind, min_channels=4, verify=False)
    with torch.no_grad():  # push every score far below zero
        for i in range(len(gated.groups)):
            gated.gates[i].offset.fill_(-100.0)
            assert (gated.scores(i) < 0).all()
    assert set(gated.widths().values()) == {4}
    assert torch.equal(gated.kept_counts(), torch.full((len(gated.groups),), 4.0))


def test_unknown_gate_kind(resnet20, x32):
    with pytest.raises(WgatesError, match="unknown gate kind"):
        make_gate("nope", 4, 9)
    with pytest.raises(WgatesError, match="plain"):
        wgates.gate(resnet20, x32, kind="nope", verify=False)
