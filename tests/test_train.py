"""The one training loop: loss goes down, records per epoch, distillation, resume, callbacks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wgates.data import CifarArrays
from wgates.train import StepTrace, distillation_loss, evaluate, make_optimizer, train


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )


@pytest.fixture
def loaders():
    """A learnable 4-class problem: the class is which image quadrant is bright."""
    gen = torch.Generator().manual_seed(0)
    n = 96
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.3
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] += 2.0
    ds = TensorDataset(x, y)
    train_loader = DataLoader(ds, batch_size=16, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    return train_loader, DataLoader(ds, batch_size=32)


def test_train_reduces_loss_and_records_epochs(loaders):
    train_loader, val_loader = loaders
    torch.manual_seed(0)
    model = tiny_net()
    before = evaluate(model, val_loader)
    history = train(model, train_loader, 4, lr=0.05, val_loader=val_loader, progress=False)
    assert [r["epoch"] for r in history.epochs] == [1, 2, 3, 4]
    assert all({"loss", "val_accuracy"} <= set(r) for r in history.epochs)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    after = evaluate(model, val_loader)
    assert after == history.epochs[-1]["val_accuracy"]
    assert after > max(before, 0.5)


def test_evaluate_is_a_fraction_and_keeps_mode(loaders):
    _, val_loader = loaders
    model = tiny_net().train()
    acc = evaluate(model, val_loader)
    assert 0.0 <= acc <= 1.0
    assert model.training
    assert evaluate(model.eval(), []) == 0.0


def test_distillation_path(loaders):
    train_loader, val_loader = loaders
    torch.manual_seed(0)
    teacher = tiny_net()
    train(teacher, train_loader, 3, lr=0.05, progress=False)
    teacher.train()  # train() must put the teacher in eval mode itself
    student = tiny_net()
    history = train(student, train_loader, 3, lr=0.05, teacher=teacher, progress=False)
    assert not teacher.training
    assert len(history.epochs) == 3
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    assert float(distillation_loss(logits, logits, labels)) == pytest.approx(
        0.3 * float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)


def test_resume_and_on_epoch_end(loaders):
    train_loader, _ = loaders
    model = tiny_net()
    calls = []
    history = train(model, train_loader, 5, start_epoch=3, progress=False,
                    on_epoch_end=lambda e, r: calls.append((e, dict(r))))
    assert [r["epoch"] for r in history.epochs] == [4, 5]
    assert [e for e, _ in calls] == [3, 4]
    assert [r for _, r in calls] == history.epochs
    assert train(model, train_loader, 2, start_epoch=2, progress=False).epochs == []


def test_extra_loss_stats_recorded(loaders):
    train_loader, _ = loaders
    model = tiny_net()
    param = next(model.parameters())
    history = train(model, train_loader, 1, progress=False,
                    extra_loss=lambda: (param.pow(2).sum() * 0.0, {"pred": 0.42}))
    assert history.epochs[0]["pred"] == pytest.approx(0.42)


def test_step_trace_every_kth_step_with_its_stats(loaders):
    train_loader, _ = loaders
    model = tiny_net()
    param = next(model.parameters())
    trace = StepTrace(every=2)
    train(model, train_loader, 2, progress=False, on_step=trace,
          extra_loss=lambda: (param.pow(2).sum() * 0.0, {"pred": 0.42}))
    assert [r["step"] for r in trace.steps] == list(range(0, 2 * len(train_loader), 2))
    assert all(r["pred"] == 0.42 and r["loss"] > 0 for r in trace.steps)
    again = StepTrace()
    again.load_state_dict(trace.state_dict())
    assert again == trace


def test_non_finite_loss_stops_training_with_a_clear_error(loaders):
    from wgates.errors import WgatesError

    train_loader, _ = loaders
    model = tiny_net()
    records = []
    with torch.no_grad():  # an exploding model: the loss turns inf in the first step
        model[-1].weight.fill_(float("inf"))
    with pytest.raises(WgatesError, match="became .* in epoch 1"):
        train(model, train_loader, 2, on_epoch_end=lambda e, r: records.append(r),
              progress=False)
    assert records == []  # no epoch ended: nothing was checkpointed after the bad step


def test_recalibrate_bn_restores_statistics_without_touching_weights(loaders):
    from wgates.train import recalibrate_bn

    train_loader, val_loader = loaders
    torch.manual_seed(0)
    net = tiny_net()
    train(net, train_loader, 3, lr=0.1, progress=False)
    good = evaluate(net, val_loader)
    bn = net[1]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    bn.running_mean.fill_(50.0)
    bn.running_var.fill_(1e-3)
    assert evaluate(net, val_loader) < good
    assert recalibrate_bn(net, train_loader) is net and not net.training
    assert evaluate(net, val_loader) >= good - 0.05
    assert bn.momentum == 0.1
    for k, v in weights.items():
        if k != "1.num_batches_tracked":
            assert torch.equal(net.state_dict()[k], v), k


def test_recalibrate_bn_sees_the_same_batches_whatever_ran_before():
    """A resumed run skips the search: its loader's epoch and the random state differ from
    the unbroken run's, and the statistics must not (the kill-resume benchmark's bar)."""
    from wgates.data import EpochShuffle
    from wgates.train import recalibrate_bn

    x = torch.randn(64, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=8,
                        sampler=EpochShuffle(64, seed=3))
    stats, base = [], tiny_net()
    for epoch, seed in ((0, 0), (5, 1)):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(seed)
        net = recalibrate_bn(copy.deepcopy(base), loader, batches=2)  # a part of the data
        stats.append(net[1].running_mean.clone())
        assert loader.sampler.epoch == epoch and torch.initial_seed() == seed  # left as found
    assert torch.equal(*stats)


def test_default_loss_and_accuracy_per_pixel_for_a_dict_output():
    """A torchvision-style segmentation output ({'out': [N, C, H, W]}) trains with the default
    loss, distilled per pixel, and its accuracy is a fraction of the pixels."""

    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 3, 1))

        def forward(self, x):
            return {"out": self.body(x)}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    masks = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()  # 3 classes by brightness
    data = DataLoader(TensorDataset(x, masks), batch_size=8)
    torch.manual_seed(0)
    teacher, student = Seg(), Seg()
    train(teacher, data, 3, lr=0.05, progress=False)
    history = train(student, data, 3, lr=0.05, teacher=teacher, progress=False)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
    assert 0.5 < evaluate(student, data) <= 1.0
    same = torch.randn(4, 3, 5, 5)
    labels = torch.randint(0, 3, (4, 5, 5))
    assert float(distillation_loss(same, same, labels)) == pytest.approx(
        0.3 * float(nn.functional.cross_entropy(same, labels)), rel=1e-5)


def test_a_dict_output_without_out_asks_for_a_loss():
    from wgates.errors import WgatesError
    from wgates.train import logits_of

    with pytest.raises(WgatesError, match="loss_fn="):
        logits_of({"boxes": torch.zeros(1, 4)})



def test_an_epoch_after_a_resume_draws_the_augmentation_of_an_unbroken_run():
    """With `seed`, epoch 2 of a training killed after epoch 1 and resumed (in a process
    whose random state is anywhere) gets the random crops and flips of an unbroken training,
    and ends with its weights; without `seed` it does not."""
    rng = np.random.default_rng(0)
    data = CifarArrays(rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, 16), [str(i) for i in range(10)], augment=True)
    loader = DataLoader(data, batch_size=8)

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int, _) -> None:
        if epoch == 0:
            raise Killed

    def final(seed: int | None, killed: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(256, 10))
        optimizer = make_optimizer(model.parameters(), 0.05)
        if killed:
            with pytest.raises(Killed):
                train(model, loader, 2, optimizers=[optimizer], progress=False, seed=seed,
                      on_epoch_end=kill_after_first)
            torch.manual_seed(123)  # the resumed process: its random state is its own
        train(model, loader, 2, optimizers=[optimizer], progress=False, seed=seed,
              start_epoch=1 if killed else 0)
        return [p.detach() for p in model.parameters()]

    for seed, same in ((7, True), (None, False)):
        pairs = zip(final(seed, killed=False), final(seed, killed=True), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs) == same
