"""LPNet: the latency predictor the pruning loss differentiates through, and the baselines it
has to beat.

The network maps kept channels per group (divided by the group's size) to latency relative to
the dense model, the figure measurement gives reliably (absolute milliseconds drift between
runs; the ratio to an interleaved dense reference does not). `predict_ms` scales by the dense
latency recorded when profiling.

Baselines, both fitted as `ratio = a + b * x` on the training split (weighted for relative
error; the constant absorbs the per-inference overhead that dominates small CNNs at batch 1):
- FLOPs: x = the variant's multiply-accumulates over the dense model's;
- lookup table (NetAdapt / HALP): x = the sum over convs of each conv's isolated latency at
  its (in, out) channels, interpolated bilinearly in a grid measured during profiling.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from wgates.errors import WgatesError
from wgates.gated import GatedModel
from wgates.latency.sampling import sample_widths
from wgates.latency.store import LatencyStore
from wgates.macs import MacsModel

FORMAT = "wgates-lpnet-1"
PRIOR_SHARPNESS = 20.0
# AdamW weight decays of the MLP on the MACs prior: each is fitted, the held-out best kept
# (10 on a noisy batch-32 profile, 0.1 on ONNX Runtime's and torch-cpu's at batch 1; design.md)
PRIOR_DECAYS = (10.0, 0.1)


class LatencyPredictor(nn.Module):
    """MLP from per-group kept-channel counts to latency / dense latency (positive).

    With `macs` (a `MacsModel`, as `wgates.prune` fits it) the MLP is a correction on top
    of `a + b * MACs + c * (layers - 1)` (a, b, c fitted too; `layers`: the share of convs
    and linears left, 1 unless blocks may be dropped, so c stays 0 otherwise):
    away from the samples the prediction falls back on the compute and the layers left, not
    on wherever an MLP extrapolates (wgates.macs says why)."""

    def __init__(
        self,
        group_names: Sequence[str],
        sizes: Sequence[int],
        hidden: int = 64,
        dense_ms: float = float("nan"),
        fingerprint: Mapping | None = None,
        macs: MacsModel | None = None,
    ) -> None:
        super().__init__()
        self.group_names = list(group_names)
        self.hidden = hidden
        self.prior_decay: float | None = None  # the decay `fit` kept (None: no prior)
        self.dense_ms = float(dense_ms)
        self.fingerprint = dict(fingerprint or {})
        self.register_buffer("sizes", torch.tensor(list(sizes), dtype=torch.float32))
        n = len(self.group_names)
        self.mlp = nn.Sequential(
            nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        self.macs = macs
        if macs is not None:
            # a, b, c of a + b * MACs + c * (layers - 1)
            self.prior = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))
            nn.init.zeros_(self.mlp[-1].weight)  # starts as the prior alone
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, kept: torch.Tensor) -> torch.Tensor:
        """Predicted latency ratio for kept counts `kept` ([n_groups] or [batch, n_groups]);
        differentiable in `kept`."""
        x = kept.to(self.sizes.dtype) / self.sizes
        y = self.mlp(2 * x - 1).squeeze(-1)
        if self.macs is None:
            return nn.functional.softplus(y)
        a, b, c = self.prior
        prior = a + b * self.macs(kept) + c * (self.macs.layers(kept) - 1)
        # sharp softplus: the identity above a few percent, positive below
        return nn.functional.softplus(prior + y, beta=PRIOR_SHARPNESS)

    def predict_ms(self, kept: torch.Tensor) -> torch.Tensor:
        """Predicted latency in milliseconds (dense latency at profiling time x ratio)."""
        return self(kept) * self.dense_ms

    def kept_vector(self, widths: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
        """Counts in this predictor's group order, from {group name: count (may be a tensor
        carrying gradients, e.g. `{g.name: g.kept for g in gated.groups}`)}."""
        missing = [n for n in self.group_names if n not in widths]
        extra = [n for n in widths if n not in self.group_names]
        if missing or extra:
            raise WgatesError(
                f"the latency predictor was fitted for other groups (missing {missing}, "
                f"unknown {extra}): profile and fit it for this model"
            )
        return torch.stack([torch.as_tensor(widths[n], dtype=torch.float32).reshape(())
                            for n in self.group_names])

    @classmethod
    def fit(
        cls,
        group_names: Sequence[str],
        sizes: Sequence[int],
        kept: np.ndarray,
        ratios: np.ndarray,
        *,
        hidden: int = 64,
        steps: int = 3000,
        lr: float = 3e-3,
        val_fraction: float = 0.15,
        seed: int = 0,
        prior_decay: float | Sequence[float] = PRIOR_DECAYS,
        **meta,
    ) -> LatencyPredictor:
        """Train on `kept` [N, n_groups] -> `ratios` [N] with the mean absolute relative error
        as loss (robust to the odd disturbed measurement), full batch, Adam, cosine schedule.
        The weights kept are those that did best on a `val_fraction` of the data held out of
        training (with a few hundred samples, the last step overfits). Runs on one thread: at
        this size more threads only add synchronisation (7x slower on a busy 2-core machine).

        With `macs=` (in `meta`) the prior `a + b * MACs + c * (layers - 1)` is first fitted
        alone (least relative squares; c only where the samples' layer counts differ), and the
        MLP on top decays towards zero (weight decay `prior_decay`; several: one fit each, the
        held-out best kept), so that it keeps only corrections the samples agree on; the prior
        alone is a candidate of the held-out choice too."""
        torch.manual_seed(seed)
        model = cls(group_names, sizes, hidden, **meta)
        x = torch.as_tensor(kept, dtype=torch.float32)
        y = torch.as_tensor(ratios, dtype=torch.float32)
        order = torch.randperm(len(y))
        n_val = round(val_fraction * len(y))
        val, train = order[:n_val], order[n_val:]
        if model.macs is not None:
            with torch.no_grad():
                macs, layers = model.macs(x[train]).numpy(), model.macs.layers(x[train]).numpy()
            columns = [np.ones_like(macs), macs] + ([layers - 1] if np.ptp(layers) > 0 else [])
            coef = relative_fit(np.stack(columns, 1), y[train].numpy())
            model.prior.data = torch.tensor([*coef, 0.0][:3], dtype=torch.float32)
        decays = [prior_decay] if isinstance(prior_decay, (int, float)) else list(prior_decay)
        initial = copy.deepcopy(model.state_dict())

        def held_out() -> float:
            with torch.no_grad():
                return _relative_error(model(x[val]), y[val]).item()

        best, best_state, chosen = math.inf, None, decays[-1]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for decay in decays if model.macs is not None else [None]:
                model.load_state_dict(initial)
                if decay is None:
                    opt = torch.optim.Adam(model.parameters(), lr=lr)
                else:
                    opt = torch.optim.AdamW([{"params": model.mlp.parameters()},
                                             {"params": [model.prior], "weight_decay": 0.0}],
                                            lr=lr, weight_decay=decay)
                    if n_val and held_out() < best:
                        best, best_state = held_out(), copy.deepcopy(model.state_dict())
                        chosen = decay
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
                for step in range(steps):
                    opt.zero_grad()
                    _relative_error(model(x[train]), y[train]).backward()
                    opt.step()
                    sched.step()
                    if n_val and (step % 25 == 24 or step == steps - 1):
                        err = held_out()
                        if err < best:
                            best, best_state = err, copy.deepcopy(model.state_dict())
                            chosen = decay
        finally:
            torch.set_num_threads(threads)
        if best_state is not None:
            model.load_state_dict(best_state)
        model.prior_decay = chosen if model.macs is not None else None  # reported by the fit
        return model.eval()

    def save(self, path: str | Path) -> None:
        """Plain tensors and strings only: loadable with `torch.load(weights_only=True)`."""
        torch.save(
            {
                "format": FORMAT,
                "group_names": self.group_names,
                "sizes": self.sizes.tolist(),
                "hidden": self.hidden,
                "dense_ms": self.dense_ms,
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "state_dict": self.state_dict(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        from wgates.files import load_checkpoint

        blob = load_checkpoint(path)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise WgatesError(f"{path} is not a latency predictor: run `wgates fit-latency`")
        state = blob["state_dict"]
        prior = {k.removeprefix("macs."): v for k, v in state.items() if k.startswith("macs.")}
        model = cls(
            blob["group_names"], blob["sizes"], blob["hidden"], blob["dense_ms"],
            json.loads(blob["fingerprint"]), MacsModel.from_dict(prior) if prior else None,
        )
        if "prior" in state and len(state["prior"]) == 2:  # saved before the layers term
            state = {**state, "prior": torch.cat([state["prior"], state["prior"].new_zeros(1)])}
        model.load_state_dict(state)
        return model.eval()


def count(model: nn.Module, example_inputs: tuple) -> tuple[int, int]:
    """(MACs, parameters) of `model` on `example_inputs`, counted by Torch-Pruning."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def fit_proxy(gated: GatedModel, kind: str, samples: int = 48, seed: int = 0) -> LatencyPredictor:
    """The 'switchable efficiency' cost: the same MLP, fitted on counted FLOPs or parameters."""
    dense = count(gated.plain_copy(), gated.example_inputs)[0 if kind == "flops" else 1]
    kept, ratios = [], []
    for idx in tqdm(range(samples), desc=f"{kind} proxy", leave=False):
        _, widths = sample_widths(gated.groups, idx, seed)
        gated.set_masks(gated.masks_for_widths(widths))
        value = count(gated.extract(verify=False), gated.example_inputs)
        kept.append([widths[g.name] for g in gated.groups])
        ratios.append(value[0 if kind == "flops" else 1] / dense)
    gated.clear_masks()
    return LatencyPredictor.fit(
        [g.name for g in gated.groups], [g.size for g in gated.groups],
        np.array(kept, dtype=np.float64), np.array(ratios), steps=1500,
    )


def check_groups(cost, group_names: Sequence[str]) -> None:
    """Refuse a predictor fitted for other channel groups: its inputs would be read in the
    wrong order and the latency it gives would be silently wrong. (A plain callable without
    `group_names` is trusted.)"""
    names = getattr(cost, "group_names", None)
    if names is not None and list(names) != list(group_names):
        raise WgatesError("the latency predictor was fitted for other channel groups than this "
                          "model has: profile this model (wgates profile) and fit it again")


# What a latency file's or LPNet's fingerprint records about where it was measured, as the
# command line names it: a difference in any of these makes its latencies another machine's.
FINGERPRINT_FIELDS = ("cpu", "cpu_count", "gpu", "backend", "threads", "clock", "torch",
                      "onnxruntime", "batch", "input_shape")


def check_fingerprint(cost, expected: Mapping, source: str | Path = "the latency predictor",
                      force: bool = False, advice: str = "profile this machine (wgates "
                      "profile, fit-latency) or leave out --predictor") -> list[str]:
    """Refuse a predictor measured elsewhere: `expected` is this run's fingerprint (the
    backend's `fingerprint()` plus `batch` and `input_shape`); every field of it that the
    predictor's fingerprint records differently (or not at all) is named, with `advice` on
    what to do instead. With `force` the differences are only returned (and warned about).
    A plain callable is trusted."""
    recorded = getattr(cost, "fingerprint", None)
    if recorded is None:
        return []
    differ = [
        f"{key} was {recorded[key]!r}, here {expected[key]!r}" if key in recorded
        else f"{key} not recorded, here {expected[key]!r}"
        for key in FINGERPRINT_FIELDS
        if key in expected and recorded.get(key, _MISSING) != expected[key]
    ]
    if not differ:
        return []
    what = "; ".join(differ)
    if force:
        import warnings

        warnings.warn(f"wgates: using {source} although it was measured elsewhere: {what}",
                      stacklevel=2)
        return differ
    raise WgatesError(
        f"{source} was measured on another machine or setting ({what}): its latencies do not "
        f"hold here; {advice}, or pass --force-predictor (force_predictor=True) to use it "
        "anyway"
    )


_MISSING = object()


def _relative_error(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    return ((predicted - measured) / measured).abs().mean()


def lut_latency(table: Mapping[str, Mapping[tuple[int, int], float]], layers: Sequence) -> float:
    """Sum over `layers` ([key, cin, cout]) of the table's latency, bilinear between grid
    points (depthwise layers have a diagonal grid: linear in their channel count)."""
    total = 0.0
    for key, cin, cout in layers:
        grid = table.get(key)
        if grid is None:
            raise WgatesError(f"layer table has no entry for {key}: re-run `wgates profile`")
        cins = sorted({c for c, _ in grid})
        couts = sorted({c for _, c in grid})
        if all(c == o for c, o in grid):  # depthwise
            total += float(np.interp(cin, cins, [grid[(c, c)] for c in cins]))
            continue
        rows = [np.interp(cout, couts, [grid[(c, o)] for o in couts]) for c in cins]
        total += float(np.interp(cin, cins, rows))
    return total


def relative_fit(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients of `columns @ coef` ([N, k] columns) fitted for relative error (weights
    1/y): latency ratios span a decade, and an unweighted fit would fit the large ones at the
    small ones' expense."""
    return np.linalg.lstsq(columns / y[:, None], np.ones_like(y), rcond=None)[0]


def relative_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of `a + b x` fitted for relative error (`relative_fit`)."""
    a, b = relative_fit(np.stack([np.ones_like(x), x], 1), y)
    return float(a), float(b)


def _affine(x_train, y_train, x_test) -> np.ndarray:
    a, b = relative_line(x_train, y_train)
    return a + b * x_test


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = np.abs(predicted - measured) / measured
    return {
        "mape": float(rel.mean()),
        "max_error": float(rel.max()),
        "spearman": _spearman(predicted, measured),
    }


def noise_cv(repeats: Mapping[int, Sequence[float]]) -> float:
    """Pooled coefficient of variation of repeated measurements of fixed configurations (the
    error even a perfect predictor would show); NaN without repeats."""
    cvs = [np.std(r, ddof=1) / np.mean(r) for r in repeats.values() if len(r) > 1]
    return float(np.sqrt(np.mean(np.square(cvs)))) if cvs else math.nan


@dataclass
class Comparison:
    """Held-out errors of LPNet and the baselines, plus what is needed to plot them."""

    predictor: LatencyPredictor
    metrics: dict
    measured: np.ndarray
    predictions: dict[str, np.ndarray]


def fit_and_compare(
    store, run, holdout: float = 0.2, seed: int = 0, macs: MacsModel | None = None,
    first: int | None = None, **fit_kwargs
) -> Comparison:
    """Fit LPNet and both baselines on a random (1 - holdout) split of the samples of `run`
    (a `store.Run` of the `LatencyStore` `store`) and score all three on the rest (the
    lookup table only when `run` was profiled with one). `macs`: LPNet's prior
    (`MacsModel.of` the profiled model; without it, the plain MLP). `first`: only the
    first that many calm samples, in the order measured: a profile that one user of a cache
    extended still gives another who asked for fewer the fit it asked for.

    Samples measured while the machine was contended (dense reference slower than
    `Protocol.max_slowdown` x its 5th percentile, kept by profiling after `max_wait_s`) are
    left out of everything, and counted in `n_contended`."""
    n_samples, _ = store.counts(run.id)
    samples = store.calm_samples(run.id)[:first]
    repeats = store.repeats(run.id, max_dense_ms=store.calm_limit_ms(run.id))
    table = store.lut(run.id)
    if len(samples) < 10:
        contended = n_samples - len(samples)
        raise WgatesError(
            f"only {len(samples)} latency samples measured on a calm machine"
            + (f" ({contended} more were taken while it was contended)" if contended else "")
            + ": profile at least 10 (hundreds for a good fit), with nothing else running"
        )
    names, sizes, _ = zip(*run.fingerprint["groups"], strict=True)
    kept = np.array([[s.widths[n] for n in names] for s in samples], dtype=np.float64)
    ratios = np.array([s.ratio for s in samples])
    flops = np.array([s.flops for s in samples])
    order = np.random.default_rng(seed).permutation(len(samples))
    n_test = max(2, round(holdout * len(samples)))
    test, train = order[:n_test], order[n_test:]
    dense_ms = float(np.median([s.dense_ms for s in samples]))
    predictor = LatencyPredictor.fit(
        names, sizes, kept[train], ratios[train], seed=seed, dense_ms=dense_ms,
        fingerprint={**run.fingerprint, "key": run.key}, macs=macs, **fit_kwargs,
    )
    with torch.no_grad():
        lpnet = predictor(torch.as_tensor(kept[test], dtype=torch.float32)).numpy()
    predictions = {
        "lpnet": lpnet,
        "flops": _affine(flops[train], ratios[train], flops[test]),
    }
    if table:  # profiled with its lookup table
        lut = np.array([lut_latency(table, s.layers) for s in samples])
        predictions["lut"] = _affine(lut[train], ratios[train], lut[test])
    scores = {name: errors(p, ratios[test]) for name, p in predictions.items()}
    cv = noise_cv(repeats)
    metrics = {
        **scores["lpnet"],
        "noise_cv": cv,
        "mape_over_noise": scores["lpnet"]["mape"] / cv if cv else math.inf,
        "median_spread": float(np.median([s.spread for s in samples])),
        "flops_mape": scores["flops"]["mape"],
        "lut_mape": scores["lut"]["mape"] if table else math.nan,
        "predictors": scores,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "n_repeats": int(sum(len(r) for r in repeats.values())),
        "n_contended": n_samples - len(samples),
        "dense_ms": dense_ms,
        "run": run.key,
        "prior": "none" if macs is None else "a + b * MACs + c * (layers - 1)",
        "prior_decay": predictor.prior_decay,
        "baselines": "FLOPs and lookup table: ratio = a + b*x fitted on the training split",
    }
    return Comparison(predictor, metrics, ratios[test], predictions)


def fit_file(path: str | Path, run, **kwargs) -> Comparison:
    """`fit_and_compare` on the profile `run` of the latency file at `path`, opened and
    closed here (the profile was just measured or resumed into it)."""
    store = LatencyStore(path)
    try:
        return fit_and_compare(store, run, **kwargs)
    finally:
        store.close()


def metrics_json(metrics: Mapping) -> str:
    """One line of strict JSON: NaN and infinity (no repeats to compare with) become null."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(clean(metrics), allow_nan=False)


def plot_comparison(comparison: Comparison, path: str | Path) -> None:
    """Predicted vs measured latency ratio on the held-out split, one marker per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    y = comparison.measured
    for name, pred in comparison.predictions.items():
        mape = comparison.metrics["predictors"][name]["mape"]
        ax.scatter(y, pred, s=10, alpha=0.6, label=f"{name} (MAPE {mape:.1%})")
    lo = 0.95 * min(y.min(), *(p.min() for p in comparison.predictions.values()))
    hi = 1.05 * max(y.max(), *(p.max() for p in comparison.predictions.values()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured latency / dense")
    ax.set_ylabel("predicted latency / dense")
    ax.set_title(f"held-out split ({len(y)} configurations)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
