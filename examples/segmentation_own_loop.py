"""Prune a segmentation model to a measured latency target inside a training loop of your own.

wgates does not own the loop here: the loop below is the user's, with the user's loss (per-pixel
cross-entropy, distilled from the dense model per pixel). wgates adds a latency term to it, one
call per step, then closes the loop on this machine's hardware (extract, measure, correct),
and the pruned model is fine-tuned with the same loss, saved, loaded back and exported.

The model is torchvision's LRASPP-MobileNetV3-Large, untrained (no download); the data are
generated: smooth random images whose pixel class is their brightest channel. Run

    python examples/segmentation_own_loop.py --out runs/segmentation

and read the summary it prints (also in OUT/summary.json). Every size and step count is an
argument, so that `tests/test_examples.py` runs it in seconds. At 64x64 this network is bound
by per-layer overhead on a CPU: with every width at a quarter (`--floor 0.25`) it still
measured 0.69 of the dense latency on the machine it was written on, so a lower target needs
larger images (`--size`) or a lower floor; the closed loop reports a target it cannot reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import wgates

CLASSES = 3  # one per image channel: a pixel's class is its brightest channel
KD_TEMPERATURE = 2.0


def make_model() -> nn.Module:
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)


def synthetic_data(n: int, size: int, seed: int) -> TensorDataset:
    """Images of smooth noise (upsampled from 1/8 of the size), masks = brightest channel."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, max(1, size // 8), max(1, size // 8), generator=gen)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return TensorDataset(images, images.argmax(1))


def seg_loss(output: dict, masks: torch.Tensor,
             teacher_output: dict | None = None) -> torch.Tensor:
    """The user's own loss: per-pixel cross-entropy on output['out'], plus, with the teacher's
    output, the per-pixel KL divergence to its softened prediction."""
    logits = output["out"]
    loss = F.cross_entropy(logits, masks)
    if teacher_output is not None:
        t = KD_TEMPERATURE
        kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_output["out"] / t, 1),
                      reduction="none").sum(1).mean()
        loss = loss + t * t * kl
    return loss


def pixel_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x)["out"].argmax(1) == y).sum()) for x, y in loader)
    return hits / sum(y.numel() for _, y in loader)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_dense(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    """Stands in for the user's trained model: a few epochs of plain training."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            seg_loss(model(x), y).backward()
            opt.step()
    model.eval()


def prune_in_own_loop(dense: nn.Module, example: torch.Tensor, loader: DataLoader,
                      args: argparse.Namespace) -> tuple[nn.Module, wgates.LatencyMeter, dict]:
    """The user's search loop with wgates' latency term, then the closed loop on the hardware."""
    gated = wgates.gate(dense, example)  # gates on a copy; `dense` stays the teacher
    meter = wgates.LatencyMeter(dense, example, args.backend, args.threads)
    cost = wgates.fit_latency(gated, args.out / "latency.sqlite", backend=args.backend,
                              threads=args.threads, samples=args.samples, progress=False)
    steps = args.search_epochs * len(loader)
    term = wgates.LatencyTerm(gated, cost, args.target, steps, measure=meter, floor=args.floor)
    opt = torch.optim.SGD(gated.parameters(), lr=args.lr, momentum=0.9)  # weights and gates
    trace = []
    gated.train()
    for _ in range(args.search_epochs):
        for x, y in loader:
            with torch.no_grad():
                taught = dense(x)
            loss = seg_loss(gated(x), y, taught) + term()  # the latency term, once per step
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append({"loss": loss.item(), **term.stats})
    small, loop = term.close_loop(loader)  # extract, measure, correct until in the band
    return small, meter, {"search": trace, "calibration": term.calibration,
                          "loop": [vars(s) for s in loop]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/segmentation"))
    p.add_argument("--target", type=float, default=0.75, help="latency / dense latency")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dense-epochs", type=int, default=6)
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=30, help="measured variants LPNet is fit on")
    p.add_argument("--floor", type=float, default=0.25, help="least fraction of a width kept")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--backend", default="torch-cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data = synthetic_data(args.images, args.size, args.seed)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    example = torch.randn(1, 3, args.size, args.size)
    dense = make_model()
    train_dense(dense, loader, args.dense_epochs, args.lr)

    small, meter, record = prune_in_own_loop(dense, example, loader, args)
    before = pixel_accuracy(small, loader)
    wgates.finetune(small, loader, args.finetune_epochs, teacher=dense, loss_fn=seg_loss,
                    progress=False)
    ratio, spread = meter.settled(small)  # the delivered latency, measured here

    wgates.save_pruned(small, args.out / "model")
    loaded = wgates.load_pruned(make_model(), args.out / "model")  # a fresh instance
    wgates.export_onnx(loaded, example, args.out / "model.onnx")  # checked against ORT
    summary = {
        "target": args.target, "ratio": ratio, "spread": spread,
        "dense_ms": meter.dense_ms(), "loop": record["loop"],
        "calibration": record["calibration"],
        "pixel_accuracy": {"dense": pixel_accuracy(dense, loader),
                           "pruned_before_finetune": before,
                           "pruned": pixel_accuracy(small, loader)},
        "params": {"dense": params(dense), "pruned": params(small)},
        "widths": {n: len(k) for n, k in small.wgates_plan.kept.items()},
        "sizes": small.wgates_plan.sizes,
    }
    (args.out / "summary.json").write_text(json.dumps({**summary, **record}, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("widths", "sizes")},
                     indent=1))
    return summary


if __name__ == "__main__":
    main()
