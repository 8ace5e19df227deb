"""Shared helpers for the gating / extraction tests: warmed-up BatchNorm, random valid masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wgates
from wgates.models import create_model


def warm_batchnorm(model: nn.Module, shape: tuple[int, ...], steps: int = 2, seed: int = 0):
    """A few train-mode forward passes on shifted, scaled noise, so every BatchNorm's running
    statistics move away from mean 0 / var 1 (an exactness test must see real statistics).
    Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    used = set()
    handles = [
        m.register_forward_hook(lambda mod, args, out: used.add(mod))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, generator=gen) * 2.0 + 0.5)
    for h in handles:
        h.remove()
    assert used, "the model has no BatchNorm that runs"
    for bn in used:
        assert bn.running_mean.abs().max() > 0, "BatchNorm statistics were not updated"
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    return model.eval()


def random_masks(gated: wgates.GatedModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid masks: scramble the gate scores, pick a random width in
    [min_channels, 3/4 size] per group, and let masks_for_widths respect grouped-conv ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gated.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    widths = {}
    for g in gated.groups:
        high = max(g.min_channels, g.size * 3 // 4)
        widths[g.name] = int(torch.randint(g.min_channels, high + 1, (1,), generator=gen))
    return gated.masks_for_widths(widths)


@pytest.fixture
def resnet20():
    """A project resnet20 with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    return warm_batchnorm(create_model("resnet20"), (4, 3, 32, 32))


@pytest.fixture
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def warm():
    """`warm(model, shape)`: see `warm_batchnorm`."""
    return warm_batchnorm


@pytest.fixture
def make_masks():
    """`make_masks(gated, seed)`: see `random_masks`."""
    return random_masks


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored after): these models are small, and two
    OpenMP threads fighting other processes for two cores make tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MacsMeter:
    """A stand-in for `wgates.LatencyMeter` that reads counted MACs relative to the dense
    model as the latency ratio: deterministic, so a test can hold every method to the band
    [(1 - tolerance) * target, target] without the shared machine's noise deciding."""

    def __init__(self, dense: nn.Module, example_inputs, *args, isolated: bool = False) -> None:
        from types import SimpleNamespace

        from wgates.groups import as_input_tuple
        from wgates.predictor import count

        self.inputs, self.count = as_input_tuple(example_inputs), count
        self.dense_macs = count(dense, self.inputs)[0]
        self.meter = SimpleNamespace(quiet_ms=1.0)
        self.isolated = isolated

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        return self.count(model, self.inputs)[0] / self.dense_macs, 0.0

    def dense_ms(self) -> float:
        return 1.0

    def remember(self, path) -> None:
        """Deterministic already: nothing to pool."""


@pytest.fixture
def macs_meter(monkeypatch):
    """`wgates.prune` measured by `MacsMeter` (the delivered model too; other thread counts
    are not measured)."""
    import wgates.pipeline

    monkeypatch.setattr(wgates.pipeline, "LatencyMeter", MacsMeter)
    monkeypatch.setattr(wgates.pipeline, "measure_threads", lambda *args, **kwargs: [])
    return MacsMeter
