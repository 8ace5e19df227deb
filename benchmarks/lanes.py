"""Benchmark lanes: several benchmark processes sharing one machine, whose latency
measurements must not run beside another lane's training.

Why: on this 2-core host a ratio taken beside a training lane is not the ratio of a quiet
machine. A W-Gates model read 0.511 of its dense model at the end of its run and 0.476 alone
(7% apart), while the same model's closed loop, minutes earlier, had read 0.486. So a lane
(`--lanes DIR` of benchmarks/cifar10.py) registers its process group in DIR, and each of its
measurements takes DIR's lock and pauses every other registered lane (SIGSTOP to its group,
its data workers included) until the measurement is done (SIGCONT). Training loses only the
measurement's minutes; every figure is taken on a machine that is quiet but for the OS.

A lane killed while it measures leaves the others paused: starting any lane again resumes
them (or `kill -CONT -<pid>` by hand, the pids are the names of DIR/*.pid)."""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Lanes:
    """This process's lane in `folder`: `alone()` is the context to measure in."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.getpgid(0) != os.getpid():
            os.setpgid(0, 0)  # this lane and its data workers: one group, paused as one
        with self._lock():  # not while a lane measures: it would be disturbed and undone
            self._signal(self.others(), signal.SIGCONT)  # a lane killed measuring left them
            self.pidfile = self.folder / f"{os.getpid()}.pid"
            self.pidfile.write_text("")
        atexit.register(self.pidfile.unlink, missing_ok=True)
        self.paused = 0  # how many lanes the last measurement paused

    def others(self) -> list[int]:
        """The registered lanes still running, this one excepted (stale entries removed)."""
        alive = []
        for file in self.folder.glob("*.pid"):
            pid = int(file.stem)
            if pid == os.getpid():
                continue
            try:
                os.killpg(pid, 0)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                file.unlink(missing_ok=True)
        return alive

    @staticmethod
    def _signal(groups: list[int], sig: signal.Signals) -> list[int]:
        """Send `sig` to each group; the groups that got it (one may have ended meanwhile)."""
        sent = []
        for pid in groups:
            try:
                os.killpg(pid, sig)
                sent.append(pid)
            except ProcessLookupError:
                pass
        return sent

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.folder / "measure.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
            yield

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Hold the lanes' lock and keep every other lane paused meanwhile."""
        with self._lock():
            stopped = self._signal(self.others(), signal.SIGSTOP)
            self.paused = len(stopped)
            try:
                yield
            finally:
                self._signal(stopped, signal.SIGCONT)


def main(argv: list[str] | None = None) -> None:
    """`python benchmarks/lanes.py DIR -- COMMAND...`: run any command (a test suite, CI) as a
    lane, so that the lanes' measurements pause it too; it never measures itself."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    Lanes(args.folder)  # this process's group and pid, kept by exec: its children are paused
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
