"""The latency dataset: one SQLite file, one run per hardware/backend/model fingerprint.

Every sample is committed on its own, so a killed `wgates profile` loses at most the sample in
flight; the (run, index) primary key makes a sample impossible to store twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from wgates.errors import WgatesError
from wgates.latency.backends import Measurement, Protocol

QUIET_QUANTILE = 0.05  # of the profile's dense readings: the machine at rest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    widths TEXT NOT NULL,
    layers TEXT NOT NULL,
    flops REAL NOT NULL,
    ratio REAL NOT NULL,
    ms REAL NOT NULL,
    dense_ms REAL NOT NULL,
    spread REAL NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS repeats (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    probe INTEGER NOT NULL,
    ratio REAL NOT NULL,
    ms REAL NOT NULL,
    dense_ms REAL NOT NULL,
    spread REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS readings (
    setting TEXT NOT NULL,
    arch TEXT NOT NULL,
    ratio REAL NOT NULL,
    spread REAL NOT NULL,
    dense_ms REAL NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_by_arch ON readings (setting, arch);
CREATE TABLE IF NOT EXISTS lut (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    layer TEXT NOT NULL,
    cin INTEGER NOT NULL,
    cout INTEGER NOT NULL,
    ratio REAL NOT NULL,
    spread REAL NOT NULL,
    PRIMARY KEY (run_id, layer, cin, cout)
);
"""


def fingerprint_key(fingerprint: dict) -> str:
    """Short stable id of a fingerprint (hash of its canonical JSON)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Run:
    id: int
    key: str
    fingerprint: dict
    n_samples: int


@dataclass(frozen=True)
class Sample:
    idx: int
    kind: str
    widths: dict[str, int]
    layers: list  # [[layer signature, cin, cout], ...] of the extracted variant's convs
    flops: float
    ratio: float
    ms: float
    dense_ms: float
    spread: float
    attempts: int = 1


class LatencyStore:
    """Read and append latency samples; safe to kill at any point."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        path = Path(path)
        if not create and not path.is_file():
            raise WgatesError(f"latency file {path} does not exist: run `wgates profile` first")
        self.path = path
        try:
            self.db = sqlite3.connect(path)
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise WgatesError(
                f"{path} is not a wgates latency file ({err}): give another --out"
            ) from err

    def close(self) -> None:
        self.db.close()

    def run_for(self, fingerprint: dict) -> int:
        """The run id for `fingerprint`, created on first use."""
        key = fingerprint_key(fingerprint)
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO runs (key, fingerprint, created) VALUES (?, ?, ?)",
                (key, json.dumps(fingerprint, sort_keys=True), time.time()),
            )
        return self.db.execute("SELECT id FROM runs WHERE key = ?", (key,)).fetchone()[0]

    def runs(self) -> list[Run]:
        rows = self.db.execute(
            "SELECT r.id, r.key, r.fingerprint, COUNT(s.idx) FROM runs r "
            "LEFT JOIN samples s ON s.run_id = r.id GROUP BY r.id ORDER BY r.id"
        ).fetchall()
        return [Run(i, k, json.loads(f), n) for i, k, f, n in rows]

    def select_run(self, key: str | None = None) -> Run:
        """The run whose key starts with `key`, or the only run with samples."""
        runs = [r for r in self.runs() if r.n_samples > 0]
        if key is not None:
            runs = [r for r in runs if r.key.startswith(key)]
        if len(runs) == 1:
            return runs[0]
        listing = "; ".join(
            f"{r.key} ({r.fingerprint.get('model')}, {r.fingerprint.get('backend')}, "
            f"{r.n_samples} samples)"
            for r in runs
        )
        if not runs:
            raise WgatesError(
                f"{self.path} has no samples" + (f" for run {key!r}" if key else "")
                + ": run `wgates profile` (or check --run)"
            )
        raise WgatesError(f"{self.path} holds several runs: pick one with --run KEY: {listing}")

    def next_index(self, run_id: int) -> int:
        row = self.db.execute("SELECT MAX(idx) FROM samples WHERE run_id = ?", (run_id,))
        last = row.fetchone()[0]
        return 0 if last is None else last + 1

    def add_sample(
        self,
        run_id: int,
        sample: Sample,
        repeat: tuple[int, Measurement] | None = None,
    ) -> None:
        """Store a sample and, in the same transaction, the probe re-measured alongside it."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, sample.idx, sample.kind, json.dumps(sample.widths),
                    json.dumps(sample.layers), sample.flops, sample.ratio, sample.ms,
                    sample.dense_ms, sample.spread, sample.attempts, now,
                ),
            )
            if repeat is not None:
                probe, m = repeat
                self.db.execute(
                    "INSERT INTO repeats VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, sample.idx, probe, m.ratio, m.ms, m.dense_ms, m.spread, now),
                )

    def samples(self, run_id: int) -> list[Sample]:
        rows = self.db.execute(
            "SELECT idx, kind, widths, layers, flops, ratio, ms, dense_ms, spread, attempts "
            "FROM samples "
            "WHERE run_id = ? ORDER BY idx",
            (run_id,),
        )
        return [
            Sample(i, k, json.loads(w), json.loads(la), *rest) for i, k, w, la, *rest in rows
        ]

    def calm_limit_ms(self, run_id: int) -> float:
        """The dense time over which a sample counts as measured on a contended machine
        (`Protocol.max_slowdown` x `quiet_ms`): its ratio is not trusted."""
        return Protocol.max_slowdown * self.quiet_ms(run_id)

    def calm_samples(self, run_id: int) -> list[Sample]:
        """The samples a predictor may learn from: those measured on a calm machine."""
        limit = self.calm_limit_ms(run_id)
        return [s for s in self.samples(run_id) if s.dense_ms <= limit]

    def counts(self, run_id: int) -> tuple[int, int]:
        """(samples, calm samples) of a run, counted in the database: profiling asks after
        every sample, and the calm limit moves as samples come in."""
        limit = self.calm_limit_ms(run_id)
        return self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(dense_ms <= ?), 0) FROM samples WHERE run_id = ?",
            (limit, run_id)).fetchone()

    def quiet_ms(self, run_id: int) -> float:
        """The dense reference's time with the machine at rest, as the profile saw it: the 5th
        percentile of its readings (inf with none). It seeds `Meter(quiet_ms=)`, so that a
        meter started inside a slow spell of the host knows it is one."""
        times = [row[0] for row in self.db.execute(
            "SELECT dense_ms FROM samples WHERE run_id = ?", (run_id,))]
        return float(np.quantile(times, QUIET_QUANTILE)) if times else math.inf

    def quiet_ms_for(self, fingerprint: dict) -> float:
        """`quiet_ms` of the quickest run whose fingerprint has every item of `fingerprint`
        (the backend's, and the input shape: the same reference on the same machine)."""
        runs = [r for r in self.runs()
                if all(r.fingerprint.get(k) == v for k, v in fingerprint.items())]
        return min((self.quiet_ms(r.id) for r in runs), default=math.inf)

    def repeats(self, run_id: int, max_dense_ms: float = math.inf) -> dict[int, list[float]]:
        """Repeated ratios of each probe configuration (the measurement noise floor), leaving
        out those taken while the dense reference ran slower than `max_dense_ms`."""
        out: dict[int, list[float]] = {}
        for probe, ratio in self.db.execute(
            "SELECT probe, ratio FROM repeats WHERE run_id = ? AND dense_ms <= ? ORDER BY idx",
            (run_id, max_dense_ms),
        ):
            out.setdefault(probe, []).append(ratio)
        return out

    def add_reading(self, setting: dict, arch: str, m: Measurement) -> None:
        """Keep one measurement of the architecture `arch` (`architecture_key`) in the
        `setting` it was taken in (the backend's fingerprint, the dense reference)."""
        with self.db:
            self.db.execute("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?)",
                            (fingerprint_key(setting), arch, m.ratio, m.spread, m.dense_ms,
                             time.time()))

    def readings(self, setting: dict, arch: str) -> list[float]:
        """Every ratio kept for `arch` in `setting`, oldest first."""
        return [row[0] for row in self.db.execute(
            "SELECT ratio FROM readings WHERE setting = ? AND arch = ? ORDER BY rowid",
            (fingerprint_key(setting), arch))]

    def add_lut_entry(
        self, run_id: int, layer: str, cin: int, cout: int, m: Measurement
    ) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO lut VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, layer, cin, cout, m.ratio, m.spread),
            )

    def lut(self, run_id: int) -> dict[str, dict[tuple[int, int], float]]:
        """Per-layer-signature latency (as a fraction of the dense model) by (cin, cout)."""
        out: dict[str, dict[tuple[int, int], float]] = {}
        for layer, cin, cout, ratio in self.db.execute(
            "SELECT layer, cin, cout, ratio FROM lut WHERE run_id = ?", (run_id,)
        ):
            out.setdefault(layer, {})[(cin, cout)] = ratio
        return out


def check_readings(path: str | Path) -> None:
    """Refuse, before any work, a readings file (`LatencyMeter.remember`) that is not a
    latency file or cannot be made: the run would fail at its first measurement."""
    path = Path(path)
    if path.exists():
        LatencyStore(path, create=False).close()
    elif not path.parent.is_dir():
        raise WgatesError(f"readings file {path}: folder {path.parent} does not exist; make it "
                          "or give another --readings")


def architecture_key(model: nn.Module) -> str:
    """What a model's latency depends on, not its weights: its module types and the shapes
    of its parameters and buffers, hashed (a pruned model's key is its widths)."""
    shapes = [type(m).__name__ for m in model.modules()]
    shapes += [f"{k}:{list(v.shape)}" for k, v in model.state_dict().items()]
    return fingerprint_key({"modules": shapes})


def profiled_quiet_ms(path: str | Path, fingerprint: dict) -> float:
    """The dense reference's time at rest in the latency file `path` for the runs matching
    `fingerprint` (`LatencyStore.quiet_ms_for`); inf when there is no such file or run."""
    if not Path(path).is_file():
        return math.inf
    store = LatencyStore(path, create=False)
    try:
        return store.quiet_ms_for(fingerprint)
    finally:
        store.close()
