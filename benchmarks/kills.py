"""Random SIGKILLs at every stage of a real run, each resumed with `--resume` (issue 14).

A reference job runs unkilled: dense training (`wgates train`), then `wgates prune` (latency
profiling, LPNet fit, gate search, closed loop, fine-tune, export). Each trial runs the same
job, SIGKILLs it at random moments (0-2 times per stage, at least once per trial), resumes it
after each kill as a user would (the same command with `--resume`), and compares what it ends
with against the reference: the pruned weights bit for bit, the kept widths, the accuracy, the
delivered latency ratio and the exported ONNX file.

Latency is timed by a simulated clock (a fixed overhead plus the variant's MACs at a fixed
rate, `SimulatedCPU`), so that a resumed run can be compared bit for bit: with a real clock two
unkilled runs already differ by measurement noise, which would hide a resume that is wrong.
Everything else (the files, the stages, the processes and their kills) is the real thing.

    python benchmarks/kills.py --kills 50           # results: benchmarks/results/kills.md
    python benchmarks/kills.py --kills 50 --resume  # skip the trials already recorded
    python benchmarks/kills.py --kills 0 --at "closed loop"   # one kill in the closed loop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lanes import Lanes
from torch import nn

from wgates.export import on_device
from wgates.latency.backends import BACKENDS, Backend, Runner
from wgates.predictor import count

HERE = Path(__file__).resolve().parent
SIMULATED = "simulated-cpu"
# a small job: every stage checkpoints more than once and the whole job takes seconds
TRAIN = ["train", "--subset", "300", "--epochs", "3", "--seed", "0"]
SEARCH_EPOCHS, FINETUNE_EPOCHS = 2, 2
STEPS = ("measuring the dense model", "profiling and LPNet fit", "search", "closed loop",
         "fine-tune", "export and report")  # of `wgates prune`, in order (`where`)
PRUNE = ["prune", "--subset", "300", "--epochs", str(SEARCH_EPOCHS),
         "--finetune-epochs", str(FINETUNE_EPOCHS),
         "--samples", "24", "--backend", SIMULATED, "--seed", "0"]


class SimulatedCPU(Backend):
    """A deterministic clock: 0.2 ms per call plus 20 ps per MAC. Only for comparing runs bit
    for bit; it says nothing about any hardware."""

    name = SIMULATED

    def prepare(self, model: nn.Module, example_inputs) -> Runner:
        macs, _ = count(on_device(model, "cpu").eval(), tuple(x.cpu() for x in example_inputs))

        def run() -> None:
            return None

        run.seconds = 2e-4 + 2e-11 * macs
        return run

    def timer(self, fn: Runner):
        return lambda number: fn.seconds


def child(argv: list[str]) -> int:
    """`wgates` with the simulated backend registered (what each job process runs)."""
    from wgates.cli import main

    BACKENDS[SIMULATED] = SimulatedCPU
    return main(argv)


def stages(work: Path) -> list[tuple[str, list[str]]]:
    dense = str(work / "dense.safetensors")
    return [("train", [*TRAIN, "--out", dense, "--resume"]),
            ("prune", [*PRUNE, "--weights", dense, "--run-dir", str(work / "run"), "--resume"])]


def where(work: Path, stage: str) -> str:
    """The step a killed process was in: the first whose result it had not yet written."""
    if stage == "train":
        return "dense training" if (work / "dense.safetensors.ckpt").exists() else "train start"
    run = work / "run"
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {}
    done = ["min_ratio" in state, (run / "lpnet.pt").exists(),
            len(state.get("search", [])) >= SEARCH_EPOCHS, "loop" in state,
            len(state.get("finetune", [])) >= FINETUNE_EPOCHS, "finished" in state]
    return next((name for name, d in zip(STEPS, done, strict=True) if not d), "after the report")


def launch(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=log,
                            stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())


def wait_or_kill(proc: subprocess.Popen, work: Path, stage: str, when: float | str | None
                 ) -> bool:
    """Let `proc` end, or SIGKILL it after `when` seconds, or as soon as it is seen in the
    step named `when` (polled every 10 ms); whether it was killed."""
    if not isinstance(when, str):
        try:
            proc.wait(timeout=when)
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        while proc.poll() is None and where(work, stage) != when:
            time.sleep(0.01)
        if proc.poll() is not None:
            return False
    proc.kill()
    proc.wait()
    return True


def run_job(work: Path, kill_after: dict[str, list[float | str]]) -> tuple[list[dict], dict]:
    """The job in `work`, each stage killed at each of its `kill_after` moments (seconds
    after it starts, or a step's name) and resumed: (the kills that happened, the stages'
    wall times)."""
    kills, walls = [], {}
    with open(work / "log.txt", "a") as log:
        for stage, args in stages(work):
            delays = list(kill_after.get(stage, []))
            started = time.perf_counter()
            while True:
                proc, start = launch(args, log), time.perf_counter()
                if wait_or_kill(proc, work, stage, delays.pop(0) if delays else None):
                    kills.append({"stage": stage, "at": where(work, stage),
                                  "after_s": round(time.perf_counter() - start, 2)})
                    continue
                if proc.returncode != 0:
                    tail = (work / "log.txt").read_text()[-2000:]
                    raise RuntimeError(f"{stage} exited {proc.returncode} in {work}:\n{tail}")
                break
            walls[stage] = time.perf_counter() - started
    return kills, walls


def outcome(work: Path) -> dict:
    """What a finished job delivered: digests of the weights and the ONNX file, the widths,
    the accuracy and the delivered ratio (from the run's state)."""
    run = work / "run"
    final = json.loads((run / "state.json").read_text())["result"]
    digest = {f: hashlib.sha256((run / f).read_bytes()).hexdigest()[:16]
              for f in ("model/model.safetensors", "model.onnx")}
    return {"weights": digest["model/model.safetensors"], "onnx": digest["model.onnx"],
            "widths": final["widths"], "accuracy": final["accuracy"],
            "ratio": final["latency_ratio"]}


def write(results: list[dict], reference: dict, out: Path, command: str) -> None:
    kills = [k for r in results for k in r["kills"]]
    at: dict[str, int] = {}
    for k in kills:
        at[k["at"]] = at.get(k["at"], 0) + 1
    same = sum(r["same"] for r in results)
    lines = [
        "# Random SIGKILLs, each resumed with --resume", "",
        f"Command: `{command}`", "",
        f"**{len(kills)} kills in {len(results)} trials; {same} of {len(results)} trials ended "
        "with the reference's result** (pruned weights and ONNX file bit for bit, widths, "
        "accuracy, delivered ratio). Random kills first, then one trial killed as soon as "
        "the job was seen in each step of `wgates prune` (marked 'at a step').", "",
        f"Reference: weights {reference['weights']}, accuracy {reference['accuracy']}, "
        f"ratio {reference['ratio']}, widths {reference['widths']}.", "",
        "| killed during | kills |", "|---|---|",
        *[f"| {name} | {n} |" for name, n in sorted(at.items(), key=lambda x: -x[1])], "",
        "| trial | kills (stage: seconds after start, in) | same result | differs in |",
        "|---|---|---|---|",
        *[f"| {r['trial']}{' (at a step)' if r.get('targeted') else ''} | "
          + "; ".join(f"{k['stage']}: {k['after_s']} s, {k['at']}" for k in r["kills"])
          + f" | {'yes' if r['same'] else 'NO'} | {', '.join(r['differs']) or '-'} |"
          for r in results],
    ]
    (out / "kills.md").write_text("\n".join(lines) + "\n")


def trial(number: int, plan: dict[str, list[float | str]], reference: dict, record: Path
          ) -> dict:
    """One job killed as `plan` says, resumed to the end, compared with the reference, and
    appended to `record`."""
    work = Path(tempfile.mkdtemp(prefix="kills-"))
    try:
        kills, _ = run_job(work, plan)
        got = outcome(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    differs = [k for k in reference if got[k] != reference[k]]
    result = {"trial": number, "kills": kills, "same": not differs, "differs": differs,
              "got": got, "targeted": any(isinstance(t, str) for t in plan.get("prune", []))}
    with open(record, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"trial {number}: {len(kills)} kills, "
          f"{'same' if not differs else 'DIFFERS in ' + ', '.join(differs)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="stop once this many kills ran")
    parser.add_argument("--seed", type=int, default=0, help="of the kill times")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the trials already in <out>/kills.jsonl")
    parser.add_argument("--at", nargs="*", default=list(STEPS), choices=STEPS, metavar="STEP",
                        help="after the random kills, one trial killed as soon as the job is "
                        "seen in each of these steps of wgates prune (default: all of %(choices)s)")
    parser.add_argument("--lanes", type=Path, default=None, metavar="DIR",
                        help="beside benchmark lanes (benchmarks/lanes.py): paused, with its "
                        "jobs, while any of them measures latency")
    args = parser.parse_args(argv)
    if args.lanes:
        Lanes(args.lanes)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    record = args.out / "kills.jsonl"
    results = [json.loads(x) for x in record.read_text().splitlines()] if (
        args.resume and record.exists()) else []
    if not args.resume:
        record.unlink(missing_ok=True)
    command = shlex.join(["python", "benchmarks/kills.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        _, walls = run_job(Path(tmp), {})
        reference = outcome(Path(tmp))
    print(f"reference: {reference} ({', '.join(f'{k} {v:.0f} s' for k, v in walls.items())})")
    rng = random.Random(args.seed + len(results))  # a resumed benchmark draws new times
    targeted = {k["at"] for r in results if r.get("targeted") for k in r["kills"]}
    while True:
        if sum(len(r["kills"]) for r in results if not r.get("targeted")) < args.kills:
            plan = {s: [rng.uniform(0.5, w) for _ in range(rng.randint(0, 2))]
                    for s, w in walls.items()}
            if not any(plan.values()):
                plan["prune"] = [rng.uniform(0.5, walls["prune"])]
        elif [step for step in args.at if step not in targeted]:
            step = next(step for step in args.at if step not in targeted)
            targeted.add(step)
            plan = {"prune": [step]}
        else:
            break
        results.append(trial(len(results), plan, reference, record))
        write(results, reference, args.out, command)
    return 0 if all(r["same"] for r in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
