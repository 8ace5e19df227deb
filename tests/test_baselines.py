"""Every comparison method lands on the latency target under a deterministic stand-in meter
(MACs relative to the dense model), and returns a smaller model that runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from wgates import gate, load_pruned, save_pruned
from wgates.baselines import (
    INFO,
    METHODS,
    SEARCH_METHODS,
    Context,
    Polariser,
    match_latency,
    method_info,
    polarisation,
)
from wgates.errors import WgatesError
from wgates.extract import PLAN_ATTR
from wgates.models import create_model
from wgates.predictor import count
from wgates.search import search

TARGET, TOLERANCE = 0.5, 0.1
SHAPE = (1, 1, 16, 16)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("small_cnn", width_mult=0.5).eval()
    inputs = (torch.randn(SHAPE),)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, *SHAPE[1:], generator=gen),
                         torch.randint(0, 10, (64,), generator=gen))
    loader = DataLoader(data, batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    dense_macs = count(model, inputs)[0]

    def measure(candidate):
        return count(candidate, inputs)[0] / dense_macs, 0.0

    ctx = Context(measure=measure, cost=macs_ratio, epochs=1, tolerance=TOLERANCE,
                  proxy_samples=48)
    return model, inputs, loader, ctx


DENSE = torch.tensor([1.0, 32, 64, 128, 128])  # input channels, then small_cnn(0.5)'s widths
PIXELS = torch.tensor([256.0, 64, 16, 16])  # output pixels of its four 3x3 convs at 16x16


def macs_ratio(kept: torch.Tensor) -> torch.Tensor:
    """small_cnn's conv MACs relative to dense, differentiable in the kept counts: a stand-in
    for LPNet that is exact, so the closed loop converges in a step or two."""
    widths = torch.cat([DENSE[:1], kept])
    return (widths[:-1] * widths[1:] * PIXELS).sum() / (DENSE[:-1] * DENSE[1:] * PIXELS).sum()


def test_stand_in_cost_is_the_measured_macs(setup):
    model, inputs, _, ctx = setup
    gated = gate(model, inputs)
    widths = dict(zip([g.name for g in gated.groups], (8, 40, 100, 16)))
    gated.set_masks(gated.masks_for_widths(widths))
    measured = ctx.measure(gated.extract())[0]
    assert float(macs_ratio(torch.tensor([8.0, 40, 100, 16]))) == pytest.approx(measured, 0.02)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_meets_target(setup, name, tmp_path):
    model, inputs, loader, ctx = setup
    small = METHODS[name](model, inputs, loader, TARGET, ctx)
    ratio = ctx.measure(small)[0]
    assert (1 - TOLERANCE) * TARGET <= ratio <= TARGET, f"{name}: ratio {ratio:.3f}"
    assert small(inputs[0]).shape == (1, 10)
    # it carries its plan, so `wgates.prune` saves it and a resumed run reloads it
    save_pruned(small, tmp_path / "m")
    again = load_pruned(create_model("small_cnn", width_mult=0.5), tmp_path / "m").eval()
    torch.testing.assert_close(again(inputs[0]), small.eval()(inputs[0]))
    assert count(model, inputs)[0] > 0  # the dense model was not pruned in place
    assert model.classifier.in_features == 128


def test_match_latency_bisects_to_band():
    calls = []

    def build(x):
        calls.append(x)
        return torch.nn.Linear(1, 1)

    # latency = knob^2: the accepted band [0.45, 0.4875] is knob in [0.671, 0.698]
    lookup = {}

    def build_and_remember(x):
        model = build(x)
        lookup[id(model)] = x
        return model

    model, knob, ratio = match_latency(
        build_and_remember, lambda m: (lookup[id(m)] ** 2, 0.0), 0.5, tolerance=0.1)
    assert 0.45 <= ratio <= 0.4875 and ratio == pytest.approx(knob**2)
    assert len(calls) <= 6


def test_match_latency_unreachable_returns_fastest():
    lookup = {}

    def build(x):
        model = torch.nn.Linear(1, 1)
        lookup[id(model)] = x
        return model

    _, knob, ratio = match_latency(build, lambda m: (0.6 + 0.4 * lookup[id(m)], 0.0), 0.5,
                                   steps=8)
    assert ratio > 0.5 and knob < 0.01  # nothing meets 0.5: the fastest setting is returned


def test_gdp_gates_polarise(setup):
    model, inputs, loader, ctx = setup
    gated = gate(model, inputs, kind="gdp")
    how = INFO["gdp"].gates
    search(gated, ctx.cost, TARGET, loader, epochs=4, lr=0.01, gate_lr=0.1, progress=False,
           allocation=how.allocation, regulariser=how.regulariser(gated, 4 * len(loader)))
    values = torch.cat([v.detach() for v in gated.train().gate_values()])
    assert ((values < 0.1) | (values > 0.9)).float().mean() > 0.8
    assert 0 < (values < 0.5).float().mean() < 1  # some closed, some open
    assert float(polarisation(gated)) < 0
    gated.eval()
    hard = torch.cat(gated.gate_values())
    assert torch.allclose(hard, hard.round(), atol=1e-6)  # hard 0/1 in eval mode


def test_polariser_resumes_its_annealing(setup):
    """A search resumed mid-way anneals GDP's eps on from where it was, not from the start."""
    model, inputs, _, _ = setup
    gated = gate(model, inputs, kind="gdp")
    polariser = Polariser(gated, steps=10)
    for _ in range(4):
        polariser()
    eps = gated.gates[0].eps
    fresh = gate(model, inputs, kind="gdp")
    resumed = Polariser(fresh, steps=10)
    resumed.load_state_dict(polariser.state_dict())
    assert fresh.gates[0].eps == pytest.approx(eps) and resumed()[1]["eps"] < eps


def test_every_method_names_its_paper_and_how_it_runs():
    assert list(INFO) == list(METHODS)
    gates = {"wgates", "plain", "gdp", "wgates-flops", "wgates-gradient"}
    assert {n for n, i in INFO.items() if i.gates} == gates
    # SCOP's control factors and MetaPruning's PruningNet train: a budget counts them
    assert SEARCH_METHODS == gates | {"scop", "metapruning"}
    assert {n for n, i in INFO.items() if i.needs_cost} == gates | {"metapruning"}
    assert all(len(i.paper) > 10 for i in INFO.values())
    assert "2007.02066" in INFO["wgates"].paper and "ICLR 2017" in INFO["l1"].paper
    assert "DepGraph" in INFO["tp-l2"].paper and "Molchanov" in INFO["tp-taylor"].paper
    assert (INFO["gdp"].kind, INFO["gdp"].gates.allocation) == ("gdp", "gradient")
    assert INFO["wgates-flops"].gates.settings("latency", "knapsack") == ("flops", "knapsack")
    assert INFO["l1"].kind == "plain"
    with pytest.raises(WgatesError, match="unknown method 'nope': choose from uniform, l1, "
                       "tp-l1, tp-l2, tp-taylor, wgates, plain, gdp") as err:
        method_info("nope")
    assert len(str(err.value).splitlines()) == 1


def test_functional_keeps_one_of_each_repeated_filter(setup):
    """Filters made to repeat one another (same weights, same BatchNorm) respond alike, so
    the smallest distance cut merges exactly those, and keeps one of each pair."""
    from wgates.baselines import FunctionClusters, channel_responses

    model, inputs, loader, _ = setup
    twin = copy.deepcopy(model)
    conv, bn = twin.features[0][0], twin.features[0][1]
    pairs = [(0, 1), (2, 3), (10, 20)]
    with torch.no_grad():
        for a, b in pairs:
            conv.weight[b] = conv.weight[a]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[b] = t[a]
    gated = gate(twin, inputs, kind="plain").eval()
    clusters = FunctionClusters(gated, channel_responses(gated, [next(iter(loader))]))
    first = gated.groups[0]
    mask = clusters.masks(1e-6)[first.name]
    assert int(mask.sum()) == first.size - len(pairs)
    assert all(mask[a] != mask[b] for a, b in pairs)
    assert all(int(m.sum()) == g.size for g, m in zip(gated.groups[1:],
               list(clusters.masks(1e-6).values())[1:]))  # nothing else repeats
    assert all(int(m.sum()) == g.min_channels
               for g, m in zip(gated.groups, clusters.masks(2.0).values()))


def test_torch_pruning_choice_is_torch_prunings_own(setup):
    """Torch-Pruning chooses the channels and wgates' extraction removes them: the model is
    the one Torch-Pruning's own `step()` makes, with a plan."""
    import copy
    from functools import partial

    import torch_pruning as tp

    from wgates.baselines import torch_pruning

    model, inputs, loader, _ = setup
    built = []

    def first(candidate):
        built.append(candidate)
        return TARGET, 0.0  # in the band: the bisection ends at its first knob, 0.5

    torch_pruning(model, inputs, loader, TARGET, Context(measure=first), importance=partial(
        tp.importance.GroupMagnitudeImportance, p=2))
    reference = copy.deepcopy(model)
    tp.pruner.BasePruner(reference, inputs, importance=tp.importance.GroupMagnitudeImportance(
        p=2), global_pruning=True, pruning_ratio=0.5, max_pruning_ratio=0.95,
        ignored_layers=[reference.classifier]).step()
    assert count(built[0], inputs) == count(reference, inputs) and hasattr(built[0], PLAN_ATTR)
    with torch.no_grad():
        torch.testing.assert_close(built[0](inputs[0]), reference(inputs[0]))


def test_scop_scores_what_beats_its_knockoff():
    """On a trained network, the real features of live filters serve the task better than
    their knockoffs (score > 0); a dead filter's real and knockoff features are both zero,
    so its control factor never moves (score exactly 0)."""
    from wgates.baselines import knockoff_scores
    from wgates.data import make_loaders
    from wgates.train import train

    torch.manual_seed(0)
    loader, _, _ = make_loaders("digits", batch_size=32, subset=256, image_size=16)
    model = create_model("small_cnn", width_mult=0.5)
    train(model, loader, 2, lr=0.05, progress=False)
    dead = [3, 7, 11]
    with torch.no_grad():
        bn = model.features[0][1]
        bn.weight[dead], bn.bias[dead] = 0.0, 0.0
    gated = gate(model.eval(), (torch.randn(SHAPE),), kind="plain")
    scores = knockoff_scores(gated, gated.plain_copy(), loader, epochs=2)
    first = scores[0]
    assert torch.equal(first[dead], torch.zeros(len(dead)))
    live = torch.tensor([i for i in range(len(first)) if i not in dead])
    assert float(first[live].median()) > 0 and float((first[live] > 0).float().mean()) > 0.6
    assert all(float(s.min()) >= -1 and float(s.max()) <= 1 for s in scores)
    assert dict(model.named_parameters())["features.0.0.weight"].requires_grad  # untouched


def test_pruningnet_starts_as_the_trained_model_and_learns_per_encoding(setup):
    """Before training, every encoding's generated weights are the trained ones; after, they
    depend on the encoding. `on_band` puts any fractions on the cost goal."""
    from wgates.baselines import l1_ranked
    from wgates.metapruning import PruningNet, evolve, on_band

    model, inputs, loader, _ = setup
    gated = l1_ranked(model, inputs)
    net = PruningNet(gated)
    full = {g.name: g.size for g in gated.channel_groups}
    half = {g.name: g.size // 2 for g in gated.channel_groups}
    for name, w in net.weights(half).items():
        torch.testing.assert_close(w, dict(model.named_parameters())[name])
    losses = net.fit(loader, 1, lambda: half)
    assert len(losses) == 1 and losses[0] > 0
    a, b = net.weights(full), net.weights(half)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    groups = gated.channel_groups
    widths = on_band(torch.rand(len(groups)).numpy() + 0.1, groups, macs_ratio, 0.5)
    assert 0.4 < float(macs_ratio(torch.tensor([float(widths[g.name]) for g in groups]))) <= 0.5
    ranked = evolve(lambda w: -abs(w[groups[0].name] - 8), groups,
                    lambda f: on_band(f, groups, macs_ratio, 0.5), population=6,
                    generations=3)
    assert ranked[0][0] >= ranked[-1][0] and len(ranked) >= 6


def test_metapruning_widths_land_on_the_delivered_grid():
    """MetaPruning's sampled and evolved widths are on the (multiple, block) grid the model
    is delivered at, so the PruningNet trains the widths it will be judged at."""
    from types import SimpleNamespace

    import numpy as np

    from wgates.metapruning import widths_from

    groups = [SimpleNamespace(name="a", size=64, min_channels=1),
              SimpleNamespace(name="b", size=16, min_channels=1)]
    assert widths_from(np.array([0.62, 0.3]), groups, (8, 16)) == {"a": 32, "b": 8}
    assert widths_from(np.array([0.62, 0.3]), groups, (8, 8)) == {"a": 40, "b": 8}
    assert widths_from(np.array([0.62, 0.3]), groups) == {"a": 40, "b": 5}
