"""The one set of defaults `wgates.prune` and `wgates prune` share (imports nothing heavy, so
the command line can read it while building its parser). Each is the setting that measured
best; docs/design.md has the ablations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PruneDefaults:
    method: str = "wgates"  # a name in wgates.baselines.METHODS (`wgates methods`)
    epochs: int = 3  # gate-search epochs
    finetune_epochs: int = 3
    samples: int = 150  # measured variants LPNet is fitted on
    allocation: str = "knapsack"  # how the search sets widths (wgates.search.ALLOCATIONS)
    ramp: float = 0.5  # fraction of the search over which the aim falls to the target
    floor: float = 0.25  # no group below this fraction of its width (docs/design.md: 0.1 vs 0.25)
    # a residual block's inner group may keep no channel, dropping the block (wgates.depth);
    # None: at batch 1, or where widths move in channel blocks (`depth_for`)
    depth: bool | None = None
    importance: str = "taylor"  # what a unit is worth to the knapsack (wgates.search.IMPORTANCES)
    distill: bool = True  # distil from the dense model in the search and the fine-tune
    tolerance: float = 0.05
    lr: float = 0.01
    gate_lr: float = 0.05
    finetune_lr: float = 0.01
    threads: int = 1
    check_threads: tuple[int, ...] = (1, 2)  # the delivered model is also measured at these
    # after the closed loop, widen to these channel blocks where the latency stays in the band
    # (widen_to_blocks; docs/design.md: +1.5 points at batch 32 over 3 seeds, +0.6 at batch 1)
    blocks: tuple[int, ...] = (16, 8)
    isolated: bool = True  # measure in a process that never trains (wgates.latency.worker)


PRUNE = PruneDefaults()


def deployment_threads(threads: int, others: Sequence[int] = PRUNE.check_threads) -> list[int]:
    """The thread counts a delivered model is measured at: the one it was pruned for first,
    then `others` (in their order, without repeats)."""
    return list(dict.fromkeys([threads, *others]))


def depth_for(depth: bool | None, batch: int, multiple: int = 1, block: int = 1) -> bool:
    """Whether the search may drop residual blocks: `depth` as given, or by default (None)
    at batch 1, and at any batch where the delivered widths move in channel blocks wider than
    their multiple (`multiple, block` as the backend's `width_grid` gives them: (1, 1) is no
    grid, (1, 16) `--channel-block 16`, (8, 16) ONNX Runtime on AVX-512). At batch 1
    latency is overhead-bound and a block costs more than its channels: with depth W-Gates
    gained 4.0 points on torch-cpu and 2.3 on ONNX Runtime at 0.5 (ResNet-20, three seeds
    each). At batch 32 on torch-cpu's (1, 16) grid it gained 2.5 (three seeds; 2.4 ahead of
    Torch-Pruning Taylor; docs/design.md, "Depth on the batch-32 grid"): there a narrower
    width buys latency a block at a time, a dropped residual block at once. Without a grid
    at batch 32 it lost 2.4 (one seed, older code and host)."""
    return (batch == 1 or block > multiple) if depth is None else depth
