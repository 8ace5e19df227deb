"""Why one pruned model's latency ratio reads differently from run to run (docs/design.md,
"A ratio read while the host is slow").

Four checks on one pruned model against its dense model (torch-cpu, one thread, batch 1 or
`--batch`), each a mode of this script:

    python benchmarks/host_spells.py log --processes 43 --readings 15 --out spells.jsonl
    python benchmarks/host_spells.py replay spells.jsonl      # by reference time; the filter
    python benchmarks/host_spells.py train --rounds 3         # does training in-process drift?
    python benchmarks/host_spells.py train --what copy --batch 32  # ... training its shapes?
    python benchmarks/host_spells.py hogs                     # load on the other core
    python benchmarks/host_spells.py seeded --pairs 30        # the quiet time from the profile
    python benchmarks/host_spells.py pooled LATENCY_FILE      # the runs' kept readings

`pooled` reads no model: it bins every reading a benchmark run kept in a latency file
(`LatencyMeter.remember`, the `readings` table) by how slow the reference ran against the
file's quickest reference in the same setting, and prints how far each bin's ratios lie from
their architecture's median over its quicker half of readings (what sets
`Protocol.calm_slowdown`).

`seeded` alternates new processes that take the settled figure a run delivers, with the
meter's quiet time as today's default (the quickest reference it has timed) and seeded from
the latency profile (`LatencyMeter.seed_quiet`), and compares the two sets of figures.
`log` starts new processes one after another, each taking single readings (no retakes)
and writing (time, ratio, reference ms) as JSON lines; `replay` bins them by the
reference's time and replays `Protocol.calm_slowdown` on each process's readings. Run it
with nothing else on the machine. The pruned model is a directory of `save_pruned`
(default: the one `benchmarks/cifar10.py` keeps for the 0.7 W-Gates row of cifar10_b1a).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from wgates.extract import load_pruned
from wgates.latency import Protocol
from wgates.models import create_model
from wgates.parts import LatencyMeter

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights" / "resnet20_cifar10.safetensors"
PRUNED = HERE / "cache" / "models" / "cifar10_b1a" / "resnet20_torch-cpu@1_0.7_wgates_0"
PROFILE = HERE / "cache" / "resnet20_torch-cpu_(1, 3, 32, 32).sqlite"
ONE_READING = Protocol(retries=0, calm_slowdown=float("inf"), max_slowdown=float("inf"))


def models(pruned: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, pruned) ResNet-20, in eval mode."""
    dense = create_model("resnet20", 10)
    dense.load_state_dict(load_file(WEIGHTS))
    return dense.eval(), load_pruned(create_model("resnet20", 10), pruned).eval()


def meter(dense: torch.nn.Module, protocol: Protocol = Protocol(), batch: int = 1) -> LatencyMeter:
    return LatencyMeter(dense, torch.randn(batch, 3, 32, 32), "torch-cpu", 1, protocol)


def reading(ratio: LatencyMeter, model: torch.nn.Module) -> tuple[float, float]:
    """One measurement of `model`: (ratio, the reference's time in ms)."""
    m = ratio.meter.measure(ratio.backend.prepare(model, ratio.inputs))
    return m.ratio, m.dense_ms


def child(args: argparse.Namespace) -> None:
    dense, small = models(args.pruned)
    if args.readings:
        ratio = meter(dense, ONE_READING, args.batch)
        for _ in range(args.readings):
            r, dense_ms = reading(ratio, small)
            print(json.dumps({"t": time.time(), "ratio": r, "dense_ms": dense_ms}), flush=True)
    else:
        ratio = meter(dense, batch=args.batch)
        if args.quiet_from:
            ratio.seed_quiet(args.quiet_from)
        start = time.monotonic()
        figure = ratio.settled(small)[0]
        print(json.dumps({"ratio": figure, "dense_ms": ratio.meter.quiet_ms,
                          "seconds": time.monotonic() - start}))


def in_child(pruned: Path, readings: int = 0, quiet_from: Path | None = None,
             batch: int = 1) -> list[dict]:
    seed = ["--quiet-from", str(quiet_from)] if quiet_from else []
    out = subprocess.run([sys.executable, __file__, "child", "--pruned", str(pruned),
                          "--readings", str(readings), "--batch", str(batch), *seed],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def log(args: argparse.Namespace) -> None:
    with open(args.out, "w") as f:
        for process in range(args.processes):
            for row in in_child(args.pruned, args.readings):
                f.write(json.dumps({"process": process, **row}) + "\n")
            print(f"process {process + 1}/{args.processes}", flush=True)


def replay(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.log).read_text().splitlines()]
    dense, ratio = np.array([r["dense_ms"] for r in rows]), np.array([r["ratio"] for r in rows])
    edges = np.quantile(dense, [0, 0.25, 0.5, 0.75, 0.9, 1.0])
    print(f"{len(rows)} readings; log-log correlation of ratio with the reference's time: "
          f"{np.corrcoef(np.log(dense), np.log(ratio))[0, 1]:.2f}")
    for lo, hi in zip(edges, edges[1:]):
        inside = ratio[(dense >= lo) & (dense <= hi)]
        print(f"reference {lo:.2f}-{hi:.2f} ms: {len(inside):4d} readings, ratio median "
              f"{np.median(inside):.4f}")
    processes: dict[int, list[dict]] = {}
    for r in rows:
        processes.setdefault(r["process"], []).append(r)
    for limit in (float("inf"), 1.3, 1.2, 1.1):
        figures = []
        for readings in processes.values():
            quiet, kept = float("inf"), []
            for r in readings:  # as the meter sees them: the quietest time so far
                quiet = min(quiet, r["dense_ms"])
                if r["dense_ms"] <= limit * quiet:
                    kept.append(r["ratio"])
            figures.append(statistics.median(kept[:5]))
        q1, mid, q3 = np.quantile(figures, [0.25, 0.5, 0.75])
        print(f"calm_slowdown {limit}: per-process figure {min(figures):.3f}-{max(figures):.3f}"
              f" (range {(max(figures) - min(figures)) / mid:.1%}, IQR {(q3 - q1) / mid:.1%})")


def pooled(args: argparse.Namespace) -> None:
    import sqlite3

    db = sqlite3.connect(args.file)
    try:
        rows = db.execute("SELECT setting, arch, ratio, dense_ms FROM readings").fetchall()
    finally:
        db.close()
    by_arch: dict[tuple[str, str], list[tuple[float, float]]] = {}
    quiet: dict[str, float] = {}
    for setting, arch, ratio, dense_ms in rows:
        by_arch.setdefault((setting, arch), []).append((ratio, dense_ms))
        quiet[setting] = min(quiet.get(setting, float("inf")), dense_ms)
    bins: dict[int, list[float]] = {}
    for (setting, _), readings in by_arch.items():
        if len(readings) < 4:
            continue
        half = np.median([d for _, d in readings])
        base = np.median([r for r, d in readings if d <= half])
        for r, d in readings:
            b = min(int((d / quiet[setting] - 1) / args.step + 1e-9), args.bins - 1)
            bins.setdefault(b, []).append(r / base - 1)
    print(f"{len(rows)} readings of {len(by_arch)} architectures in {args.file}")
    for b in sorted(bins):
        dev = np.array(bins[b])
        top = "+" if b == args.bins - 1 else f"-{1 + args.step * (b + 1):.2f}"
        print(f"reference {1 + args.step * b:.2f}{top} x quietest: {len(dev):4d} readings, "
              f"ratio off its architecture's median by {np.median(dev):+.2%} (median), "
              f"{np.quantile(dev, 0.9):+.2%} (90th percentile)")


def train(args: argparse.Namespace) -> None:
    """Readings with a meter made before training, after rounds of training steps, beside
    new processes' readings after each round. `--what`: train a copy of the dense model
    (`dense`), a copy of the measured pruned model (`copy`), or the measured model itself
    (`own`, as a run's fine-tune trains the model it then measures; a deep copy of it is read
    too); then the model is read after `malloc_trim(0)` and with denormals flushed."""
    dense, small = models(args.pruned)
    ratio, kept = meter(dense, batch=args.batch), []
    print(f"before training: {ratio.settled(small)[0]:.4f}; new process: "
          f"{in_child(args.pruned, batch=args.batch)[0]['ratio']:.4f}", flush=True)
    for i in range(args.rounds):
        torch.set_num_threads(args.train_threads)
        net = {"dense": lambda: copy.deepcopy(dense), "copy": lambda: copy.deepcopy(small),
               "own": lambda: small}[args.what]().train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(
                net(torch.randn(128, 3, 32, 32)), torch.randint(0, 10, (128,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        kept.append(net)  # a run keeps what it trained alive
        fresh = in_child(args.pruned, batch=args.batch)[0]
        copied = (f"; its deep copy {ratio.settled(copy.deepcopy(small).eval())[0]:.4f}"
                  if args.what == "own" else "")
        print(f"after {i + 1} x {args.steps} steps of the {args.what} model: "
              f"{ratio.settled(small.eval())[0]:.4f} (reference {ratio.meter.quiet_ms:.2f} ms)"
              f"{copied}; new process: {fresh['ratio']:.4f} (reference {fresh['dense_ms']:.2f}"
              " ms)", flush=True)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # memory the allocator keeps?
    print(f"then malloc_trim(0): {ratio.settled(small)[0]:.4f}", flush=True)
    torch.set_flush_denormal(True)  # subnormal numbers in the trained weights?
    print(f"then denormals flushed: {ratio.settled(small)[0]:.4f}", flush=True)


HOGS = {
    "idle": None,
    "busy loop": "while True: pass",
    "one-thread matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
                         "while True: a @ a",
    "64 MB copy": "import numpy as np\na = np.ones(8_000_000)\nwhile True: a.copy()",
}


def hogs(args: argparse.Namespace) -> None:
    dense, small = models(args.pruned)
    ratio = meter(dense, ONE_READING)
    for name, code in HOGS.items():
        hog = subprocess.Popen([sys.executable, "-c", code]) if code else None
        try:
            time.sleep(1)
            readings = [reading(ratio, small) for _ in range(args.readings)]
        finally:
            if hog:
                hog.kill()
                hog.wait()
        print(f"{name:18s} ratio {statistics.median(r for r, _ in readings):.4f} reference "
              f"{statistics.median(d for _, d in readings):.3f} ms", flush=True)


def seeded(args: argparse.Namespace) -> None:
    figures: dict[str, list[float]] = {"unseeded": [], "seeded": []}
    for pair in range(args.pairs):
        for arm, quiet_from in (("unseeded", None), ("seeded", args.profile)):
            row = in_child(args.pruned, quiet_from=quiet_from)[0]
            figures[arm].append(row["ratio"])
            print(json.dumps({"pair": pair, "arm": arm, "t": time.time(), **row}), flush=True)
    for arm, values in figures.items():
        q1, mid, q3 = np.quantile(values, [0.25, 0.5, 0.75])
        print(f"{arm}: {len(values)} figures, median {mid:.4f}, range {min(values):.4f}-"
              f"{max(values):.4f} ({(max(values) - min(values)) / mid:.1%}), IQR "
              f"{(q3 - q1) / mid:.1%}, over the median by more than 3%: "
              f"{sum(v > 1.03 * mid for v in values)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, fn in (("log", log), ("replay", replay), ("train", train), ("hogs", hogs),
                     ("seeded", seeded), ("child", child), ("pooled", pooled)):
        sub = modes.add_parser(name)
        sub.set_defaults(fn=fn)
        if name not in ("replay", "pooled"):
            sub.add_argument("--pruned", type=Path, default=PRUNED)
        if name in ("train", "child"):
            sub.add_argument("--batch", type=int, default=1, help="the latency batch")
    modes.choices["log"].add_argument("--processes", type=int, default=43)
    modes.choices["log"].add_argument("--readings", type=int, default=15)
    modes.choices["log"].add_argument("--out", type=Path, default=Path("spells.jsonl"))
    modes.choices["replay"].add_argument("log", type=Path)
    modes.choices["train"].add_argument("--rounds", type=int, default=3)
    modes.choices["train"].add_argument("--steps", type=int, default=60)
    modes.choices["train"].add_argument("--what", choices=["dense", "copy", "own"],
                                        default="dense", help="which model trains")
    modes.choices["train"].add_argument("--train-threads", type=int, default=1,
                                        help="threads the training runs with")
    modes.choices["hogs"].add_argument("--readings", type=int, default=12)
    modes.choices["child"].add_argument("--readings", type=int, default=0)
    modes.choices["child"].add_argument("--quiet-from", type=Path, default=None)
    modes.choices["seeded"].add_argument("--pairs", type=int, default=30)
    modes.choices["seeded"].add_argument("--profile", type=Path, default=PROFILE)
    modes.choices["pooled"].add_argument("file", type=Path, help="a latency file (.sqlite)")
    modes.choices["pooled"].add_argument("--step", type=float, default=0.02)
    modes.choices["pooled"].add_argument("--bins", type=int, default=10)
    args = parser.parse_args()
    if getattr(args, "pruned", None) and not (args.pruned / "pruning.json").exists():
        raise SystemExit(f"{args.pruned} is not a pruned model saved by wgates.save_pruned: "
                         "give --pruned DIR (benchmarks/cifar10.py keeps one per row under "
                         "benchmarks/cache/models/)")
    args.fn(args)


if __name__ == "__main__":
    main()
