"""Latency measured on the target hardware: backends, the interleaved protocol, the sampled
width configurations and the SQLite dataset LPNet (`wgates.predictor`) is fitted on."""

from wgates.latency.backends import (
    BACKENDS,
    Backend,
    Measurement,
    Meter,
    Protocol,
    get_backend,
    pin_allocator,
    settled,
)
from wgates.latency.grid import BlockProbe, probe_block
from wgates.latency.sampling import describe, probe_widths, profile, sample_widths
from wgates.latency.store import (
    LatencyStore,
    Run,
    Sample,
    architecture_key,
    check_readings,
    fingerprint_key,
    profiled_quiet_ms,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockProbe",
    "LatencyStore",
    "Measurement",
    "Meter",
    "Protocol",
    "Run",
    "Sample",
    "architecture_key",
    "check_readings",
    "describe",
    "fingerprint_key",
    "get_backend",
    "pin_allocator",
    "probe_block",
    "probe_widths",
    "profile",
    "profiled_quiet_ms",
    "sample_widths",
    "settled",
]
