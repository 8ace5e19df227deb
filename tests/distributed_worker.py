"""One rank of tests/test_distributed.py: `wgates.prune` on tiny digits, as every rank of a
torchrun job runs it; each rank writes what it ended with to <out>/rank<N>.json.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py OUT RUN_DIR
    python tests/distributed_worker.py OUT RUN_DIR          # the same, one process
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

import wgates.pipeline as pipeline
from wgates import distributed
from wgates.data import make_loaders
from wgates.latency import Protocol
from wgates.models import create_model
from wgates.train import train

FAST = Protocol(rounds=10, min_block_s=0.0005, retries=0, busy_sleep_s=0.2, max_wait_s=5.0)


def main(out: Path, run_dir: Path) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    pipeline.Protocol = lambda: FAST
    pipeline.profile = functools.partial(pipeline.profile, protocol=FAST)
    torch.manual_seed(0)
    train_loader, val_loader, _ = make_loaders("digits", batch_size=32, subset=256)
    dense = create_model("small_cnn")
    train(dense, train_loader, 2, lr=0.05, progress=False)
    result = pipeline.prune(
        dense.eval(), torch.randn(1, 1, 32, 32), train_loader, val_loader, target_latency=0.6,
        epochs=2, finetune_epochs=1, run_dir=run_dir, samples=12, tolerance=0.1,
        progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps({
        "ranks": distributed.world_size(), "widths": result.widths,
        "weights": pipeline.weights_digest(result.model),
        "dense": pipeline.weights_digest(dense), "accuracy": result.accuracy,
        "dense_accuracy": result.dense_accuracy,
        "macs": result.macs, "ratio": result.latency_ratio}))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
