"""Where ONNX Runtime's latency noise comes from (issue 15.3).

The profile's noise floor re-measures a few fixed probe configurations against the dense
reference, minutes apart, each with the session it was first built with; every other sample is
a fresh session, measured once. So two noises matter: the same session measured again
(`same`), and a new session of the same configuration (`fresh`: arena, memory plan and kernel
choice are per session). For each candidate setting of ONNX Runtime (and torch-cpu under the
same protocol, for comparison) this measures both, round-robin over probe configurations so
that the repeats are spread in time, and tabulates the pooled coefficient of variation.

    python benchmarks/ort_noise.py --repeats 8 --lanes /tmp/lanes   # quiet: pauses other lanes
    python benchmarks/ort_noise.py --repeats 8 --name ort_noise_loaded  # beside a training
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from lanes import Lanes
from torch import nn

from wgates.export import onnx_bytes
from wgates.gated import gate
from wgates.latency import Backend, Meter, Protocol, get_backend, probe_widths, sample_widths
from wgates.latency.backends import Runner, cpu_model
from wgates.models import create_model, default_input_shape

HERE = Path(__file__).resolve().parent


class Ort(Backend):
    """ONNX Runtime CPU with one setting changed from the library's session (`config`)."""

    name = "onnxruntime-cpu"

    def __init__(self, threads: int, config: dict, wall: bool = False) -> None:
        super().__init__(threads)
        self.config, self.wall = config, wall

    @property
    def clock(self) -> Callable[[], float]:
        import time

        return time.perf_counter if self.wall else super().clock

    def prepare(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Runner:
        import onnxruntime as ort

        c = self.config
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = c.get("arena", True)
        options.enable_mem_pattern = c.get("mem_pattern", True)
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, c.get("opt", "ORT_ENABLE_ALL"))
        for key, value in c.get("entries", {}).items():
            options.add_session_config_entry(key, value)
        data = onnx_bytes(model.cpu(), tuple(example_inputs), dynamic_batch=False)
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example_inputs)}
        if not c.get("iobinding"):
            return lambda: session.run(None, feeds)
        binding = session.io_binding()
        for name, x in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)  # outputs allocated once, then reused
        for out, value in zip(session.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(out.name, value)
        return lambda: session.run_with_iobinding(binding)


NO_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
DEFAULT = Protocol()
# setting -> (backend for 1 thread, measurement protocol)
SETTINGS: dict[str, tuple[Callable[[int], Backend], Protocol]] = {
    "torch-cpu": (lambda t: get_backend("torch-cpu", t), DEFAULT),
    "ort default": (lambda t: Ort(t, {}), DEFAULT),
    "ort wall clock": (lambda t: Ort(t, {}, wall=True), DEFAULT),
    "ort no arena, no mem pattern": (lambda t: Ort(t, {"arena": False, "mem_pattern": False}),
                                     DEFAULT),
    "ort no spinning": (lambda t: Ort(t, {"entries": NO_SPIN}), DEFAULT),
    "ort basic graph opt": (lambda t: Ort(t, {"opt": "ORT_ENABLE_BASIC"}), DEFAULT),
    "ort iobinding": (lambda t: Ort(t, {"iobinding": True}), DEFAULT),
    "ort denormals as zero": (lambda t: Ort(t, {"entries": {"session.set_denormal_as_zero": "1"}}),
                              DEFAULT),
    "ort 5 ms blocks": (lambda t: Ort(t, {}), replace(DEFAULT, min_block_s=0.005)),
    "ort 240 rounds": (lambda t: Ort(t, {}), replace(DEFAULT, rounds=240)),
    "ort 10th percentile": (lambda t: Ort(t, {}), replace(DEFAULT, quantile=0.1)),
    "torch-cpu 240 rounds": (lambda t: get_backend("torch-cpu", t), replace(DEFAULT, rounds=240)),
}
# A one-thread training loop: the load other jobs put on a shared machine (--load N of them).
LOAD = """
import torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3))
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
x = torch.randn(32, 3, 32, 32)
while True:
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
"""


def probes(model: nn.Module, example: tuple[torch.Tensor], n_random: int) -> list[nn.Module]:
    """The profile's three uniform probes and `n_random` of its sampled configurations."""
    gated = gate(model, example)
    widths = [probe_widths(gated.groups, p) for p in range(3)]
    widths += [sample_widths(gated.groups, 2 + i, seed=7)[1] for i in range(n_random)]
    variants = []
    for w in widths:
        gated.set_masks(gated.masks_for_widths(w))
        variants.append(gated.extract(verify=False).eval())
    return variants


def pooled_cv(values: dict[int, list[float]]) -> float:
    return float(np.sqrt(np.mean([np.var(v, ddof=1) / np.mean(v) ** 2 for v in values.values()])))


def bench(model_name: str, setting: str, repeats: int, n_random: int, alone) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    example = (torch.randn(1, *default_input_shape(model_name)),)
    make, protocol = SETTINGS[setting]
    backend = make(1)
    variants = probes(model, example, n_random)
    with alone():
        meter = Meter(backend, backend.prepare(model, example), protocol)
        kept = [backend.prepare(v, example) for v in variants]
    same: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    fresh: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    spreads = []
    for _ in range(repeats):
        for i, variant in enumerate(variants):
            with alone():
                m = meter.measure(kept[i])
                same[i].append(m.ratio)
                spreads.append(m.spread)
                fresh[i].append(meter.measure(backend.prepare(variant, example)).ratio)
    return {
        "model": model_name, "setting": setting, "repeats": repeats,
        "probes": len(variants), "dense_ms": meter.quiet_ms,
        "same_cv": pooled_cv(same), "fresh_cv": pooled_cv(fresh),
        "median_spread": float(np.median(spreads)),
        "same": same, "fresh": fresh,
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | dense ms | same-session CV | fresh-session CV | median spread |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['setting']} | {r['dense_ms']:.2f} | {r['same_cv']:.1%} | "
              f"{r['fresh_cv']:.1%} | {r['median_spread']:.1%} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_cifar"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--random", type=int, default=2, help="sampled configurations added "
                        "to the three uniform probes")
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="measure alone: pause the other benchmark lanes in DIR")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="measure beside N one-thread training processes (a busy machine)")
    parser.add_argument("--name", default="ort_noise")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    alone = Lanes(args.lanes).alone if args.lanes else nullcontext
    load = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(args.load)]
    # a kill (SIGTERM) must end the load too: the finally below runs only on an exception
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        measure_all(args, alone)
    finally:
        for process in load:
            process.kill()


def measure_all(args: argparse.Namespace, alone) -> None:
    jsonl = args.out / f"{args.name}.jsonl"
    done = set()
    if jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        done = {(r["model"], r["setting"]) for r in rows}
    for model_name in args.models:
        for setting in args.settings:
            if (model_name, setting) in done:
                continue
            row = bench(model_name, setting, args.repeats, args.random, alone)
            print(f"{model_name} | {setting}: same {row['same_cv']:.1%}, "
                  f"fresh {row['fresh_cv']:.1%}", flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    command = shlex.join(["python", *sys.argv])
    text = (f"# ONNX Runtime noise, by setting\n\nCommand: `{command}`  \n"
            f"Date: {datetime.now():%Y-%m-%d %H:%M}; CPU: {cpu_model()}; 1 thread, batch 1, "
            f"{args.load} one-thread training processes beside; protocol as profiling (60 ABBA "
            f"rounds of 1 ms blocks, 25th percentile of thread CPU time) unless the setting "
            f"says otherwise.\n\n"
            f"Pooled CV of the ratio to the dense model over {args.repeats} repeats of "
            f"{3 + args.random} configurations: `same` re-measures one session, `fresh` builds "
            f"a new session each time.\n\n" + table(rows))
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
