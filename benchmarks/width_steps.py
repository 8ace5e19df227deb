"""Latency against the width, on ONNX Runtime and torch-cpu (issue 15.3; batch 32, issue 11).

Why ONNX Runtime's LPNet error was 3-4x torch-cpu's while its noise was not higher: its CPU
convolutions run channels in blocks, so latency is not smooth in the width. This sweeps one
group (default: ResNet-20's last, 64 channels) from a quarter of its width to all of it, the
rest dense, each ratio to the dense model measured by the profiling protocol, in new
processes that only measure (`--processes`).

`--uniform` sweeps every group together instead (k/16 of each width, k = 4..16), `--configs`
measures named configurations from a JSON file (each maps group-name prefixes to widths; the
longest matching prefix wins, unmatched groups stay dense; 0 drops a residual block), `--batch`
measures at another batch, `--dense-weights` times trained weights instead of untrained ones,
`--profile SQLITE` prints beside each measurement what LPNet fitted on that latency profile
predicts (`--run KEY` picks one of several), and `--rounds R` measures the whole sweep R times
one after another, so that a step of the hardware can be told from a slow spell of the host:
at batch 32 on an AMD EPYC host, torch-cpu, the same widths read 0.53-0.75 of the dense latency
within minutes (docs/design.md, "torch-cpu at batch 32 is not smooth either").

    python benchmarks/width_steps.py --lanes /tmp/lanes > benchmarks/results/width_steps.txt
    python benchmarks/width_steps.py --uniform --batch 32 --backends torch-cpu --rounds 3
    python benchmarks/width_steps.py --configs benchmarks/configs/resnet20_stage1_cliff.json \
        --batch 32 --backends torch-cpu --rounds 3
    python benchmarks/width_steps.py --configs benchmarks/configs/resnet20_ort_blocks.json \
        --backends onnxruntime-cpu --rounds 3 \
        --profile "benchmarks/cache/resnet20_onnxruntime-cpu_(1, 3, 32, 32).sqlite"
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from lanes import Lanes

from wgates.gated import gate
from wgates.latency import LatencyStore, Meter, Protocol, get_backend
from wgates.latency.worker import IsolatedMeter
from wgates.macs import MacsModel
from wgates.models import create_model, default_input_shape
from wgates.predictor import fit_and_compare


def widths_from_prefixes(groups, prefixes: dict[str, int]) -> dict[str, int]:
    """Each group's width from the longest of `prefixes` its name starts with (none: dense)."""
    out = {}
    for g in groups:
        matches = [p for p in prefixes if g.name.startswith(p)]
        if matches:
            out[g.name] = prefixes[max(matches, key=len)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-weights", default=None, metavar="FILE",
                        help="time the model with these trained weights (and the pruned "
                             "widths cut from them) instead of untrained ones: at batch 32 "
                             "the trained ResNet-20 read every width 5-9%% higher")
    parser.add_argument("--group", type=int, default=-1, help="index of the group swept")
    parser.add_argument("--uniform", action="store_true",
                        help="sweep every group at once (k/16 of each width)")
    parser.add_argument("--configs", type=Path, default=None, metavar="JSON",
                        help="measure the named configurations in this file instead")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime-cpu", "torch-cpu"])
    parser.add_argument("--rounds", type=int, default=1, help="times the sweep is measured")
    parser.add_argument("--processes", type=int, default=2,
                        help="read each width in this many new processes that only measure "
                             "(IsolatedMeter), their mean kept; 0: in this process, where a "
                             "reading is a draw of its heap (batch 32: the same widths read "
                             "0.378, 0.436 and 0.606 in three runs)")
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="measure alone: pause the other benchmark lanes in DIR")
    parser.add_argument("--profile", type=Path, default=None, metavar="SQLITE",
                        help="also print LPNet's prediction, fitted on this latency profile")
    parser.add_argument("--run", default=None, help="the profile's run (key prefix)")
    parser.add_argument("--prior-decay", type=float, nargs="+", default=None,
                        help="LPNet's decay(s) towards its MACs prior (default: the fit's)")
    parser.add_argument("--first", type=int, default=None, metavar="N",
                        help="fit on the profile's first N calm samples, as a benchmark row "
                             "with lpnet_samples=N does (default: all of them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    torch.manual_seed(0)
    model = create_model(args.model, weights=args.dense_weights).eval()
    shape = default_input_shape(args.model)
    configs = json.loads(args.configs.read_text()) if args.configs else {}
    # a width of 0 drops that residual block (wgates.depth)
    depth = any(0 in prefixes.values() for prefixes in configs.values())
    gated = gate(model, (torch.randn(1, *shape),), depth=depth)
    example = (torch.randn(args.batch, *shape),)
    if args.configs:
        what = f"the configurations of {args.configs.name}, unlisted groups dense"
        sweep = {name: widths_from_prefixes(gated.groups, prefixes)
                 for name, prefixes in configs.items()}
    elif args.uniform:
        what = "every group at k/16 of its width"
        sweep = {k: {g.name: max(1, round(k * g.size / 16)) for g in gated.groups}
                 for k in range(4, 17)}
    else:
        group = gated.groups[args.group]
        what = f"group {group.name} ({group.size} channels), the rest dense"
        sweep = {k: {group.name: k} for k in range(max(1, group.size // 4), group.size + 1)}
    predicted = (predictions(args.profile, args.run, gated, sweep, args.prior_decay, args.first)
                 if args.profile else {})
    ratios: dict[str, dict[int | str, list[float]]] = {}
    for name in args.backends:
        backend = get_backend(name, 1)
        with alone():
            meter = (IsolatedMeter(name, 1, model, example,
                                   replace(Protocol(), processes=args.processes))
                     if args.processes else Meter(backend, backend.prepare(model, example),
                                                  Protocol()))
        for _ in range(args.rounds):
            for k, widths in sweep.items():
                gated.clear_masks()
                gated.set_masks(gated.masks_for_widths(widths))
                small = gated.extract(verify=False).eval()
                with alone():
                    ratios.setdefault(name, {}).setdefault(k, []).append(meter.measure(
                        small if args.processes else backend.prepare(small, example)).ratio)
        if args.processes:
            meter.close()
    print(f"{args.model}, {what}; latency ratio to the dense model, 1 thread, batch "
          f"{args.batch}" + (f"; median of {args.rounds} sweeps (min-max)" if args.rounds > 1
                             else "")
          + (f"; each reading the mean of {args.processes} new processes" if args.processes
             else "; read in this process"))
    pad = max(len(str(k)) for k in sweep)
    print(f"{'width':<{pad}} " + " ".join(args.backends) + (" LPNet" if predicted else ""))
    for k in sweep:
        cells = []
        for name in args.backends:
            r = ratios[name][k]
            cells.append(f"{statistics.median(r):.3f}" + (
                f" ({min(r):.3f}-{max(r):.3f})" if len(r) > 1 else ""))
        if predicted:
            cells.append(f"{predicted[k]:.3f}")
        print(f"{k!s:<{pad}} " + " ".join(cells))


def predictions(path: Path, key: str | None, gated, sweep: dict,
                decay: list[float] | None = None, first: int | None = None) -> dict:
    """LPNet's ratio for each configuration of `sweep` (unlisted groups dense), fitted on
    the first `first` calm samples of the run `key` of the latency profile at `path`, as a
    benchmark row with `lpnet_samples=first` fits it."""
    store = LatencyStore(path, create=False)
    try:
        decays = {} if decay is None else {"prior_decay": tuple(decay)}
        net = fit_and_compare(store, store.select_run(key), macs=MacsModel.of(gated),
                              first=first, **decays).predictor
    finally:
        store.close()
    with torch.no_grad():
        return {k: float(net(net.kept_vector({g.name: widths.get(g.name, g.size)
                                              for g in gated.groups})))
                for k, widths in sweep.items()}


if __name__ == "__main__":
    main()
