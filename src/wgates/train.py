"""The one training loop: dense training, the gate search and fine-tuning all run through it.

`extra_loss` lets the search add its latency term; `teacher` turns on knowledge distillation
(Hinton et al.: KL between temperature-softened outputs, mixed with the label loss);
`loss_fn` replaces the classification loss with the task's own (segmentation, detection...).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wgates import distributed
from wgates.defaults import PRUNE
from wgates.errors import WgatesError

KD_TEMPERATURE = 4.0
KD_ALPHA = 0.7


@dataclass
class History:
    """Per-epoch records (loss, accuracy, and whatever `extra_loss` reports)."""

    epochs: list[dict] = field(default_factory=list)


@dataclass
class StepTrace:
    """Every `every`-th training step's loss and what `extra_loss` reported (the search's
    predicted latency, aim or latency weight): what happened inside an epoch, for the
    report's per-step plot. A part of the search's checkpoint, so a resumed search keeps it."""

    every: int = 1
    steps: list[dict] = field(default_factory=list)

    def __call__(self, step: int, record: dict) -> None:
        if step % self.every == 0:
            self.steps.append({"step": step, **record})

    def state_dict(self) -> dict:
        return {"every": self.every, "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.every, self.steps = int(state["every"]), list(state["steps"])


LossFn = Callable[..., torch.Tensor]  # (output, target[, teacher_output]) -> scalar loss


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: GoogLeNet-style tuples give their first, torchvision's
    segmentation dicts their 'out'."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "out" not in output:
            raise WgatesError(f"the model returns a dict with keys {list(output)} and no 'out': "
                              "pass loss_fn= to say how its outputs are scored")
        return output["out"]
    return output[0]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
    """KL to the teacher's softened outputs mixed with cross-entropy on the labels; the KL is
    averaged over every position ([N, C] or [N, C, H, W]: per image, or per pixel)."""
    t = KD_TEMPERATURE
    positions = student.numel() // student.shape[1]
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="sum"
    ) / positions * (t * t)
    return KD_ALPHA * soft + (1 - KD_ALPHA) * F.cross_entropy(student, labels)


def classification_loss(output, target: torch.Tensor, teacher_output=None) -> torch.Tensor:
    """The default `loss_fn`: cross-entropy on the logits, or, given the teacher's output,
    `distillation_loss` (per pixel too: both take [N, C, ...] logits)."""
    logits = logits_of(output).float()
    if teacher_output is None:
        return F.cross_entropy(logits, target)
    return distillation_loss(logits, logits_of(teacher_output).float(), target)


def task_loss(loss_fn: LossFn, output, target: torch.Tensor, teacher_output=None) -> torch.Tensor:
    """`loss_fn(output, target)`, or with a teacher `loss_fn(output, target, teacher_output)`:
    a loss written for plain training needs no teacher argument."""
    if teacher_output is None:
        return loss_fn(output, target)
    return loss_fn(output, target, teacher_output)


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA (the matmuls and convs run on tensor cores; BatchNorm
    and the loss stay in float32); a no-op elsewhere, where float32 is what CPUs run fastest
    for these small nets."""
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` moved to `device`, in channels_last on CUDA (the layout its tensor-core
    convolutions read without a transpose; the parameters stay the same objects, so
    optimizers built before still hold them)."""
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def evaluate(model: nn.Module, loader: Iterable, progress: bool = False) -> float:
    """Top-1 accuracy (fraction) in eval mode; per pixel for dense labels ([N, H, W])."""
    was = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device):
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
            pred = logits_of(model(x.to(device))).argmax(1)
            correct += int((pred == y.to(device)).sum())
            total += y.numel()
    model.train(was)
    return correct / max(total, 1)


def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on `batches` training batches (a
    cumulative mean, no gradient, no weight change) and return `model` in eval mode.

    Why: statistics gathered while the network had other widths (a search whose widths moved,
    a closed loop that re-proposed them) describe activations that no longer occur; pruning
    papers that score candidates without training (MetaPruning, EagleEye) do this first."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    device = next(model.parameters()).device
    model.train()
    # the same batches and augmentations whatever ran before in this process (a resumed run
    # skips the search: its loader's epoch and the random state are not the unbroken run's)
    sampler = getattr(loader, "sampler", None)
    epoch = getattr(sampler, "epoch", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast(device):
        seed_epoch(0, "recalibrate_bn", 0)
        if epoch is not None:
            sampler.set_epoch(0)
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    if epoch is not None:
        sampler.set_epoch(epoch)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


def seed_epoch(seed: int, stage: str, epoch: int) -> None:
    """Seed the global random state from (seed, stage, epoch) only: what an epoch draws must
    not depend on what ran before it in this process (a resumed run skips stages)."""
    torch.manual_seed(zlib.crc32(f"{seed}/{stage}/{epoch}".encode()))


def make_optimizer(params, lr: float, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def train(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int,
    lr: float = 0.05,
    val_loader: Iterable | None = None,
    optimizers: list[torch.optim.Optimizer] | None = None,
    extra_loss: Callable[[], tuple[torch.Tensor, dict]] | None = None,
    teacher: nn.Module | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    loss_fn: LossFn = classification_loss,
    on_step: Callable[[int, dict], None] | None = None,
    seed: int | None = None,
) -> History:
    """Train `model` for `epochs` (cosine learning rate per step) and evaluate each epoch.

    `optimizers` defaults to SGD on all parameters; `start_epoch` and `on_epoch_end` (called
    with the epoch index and its record, e.g. to checkpoint) make runs resumable; `on_step`
    is called after every step with its index from the start and its loss and extra stats
    (`StepTrace`). With `seed`, each epoch starts from the global random state seeded by
    (`seed`, `desc`, epoch) alone (`seed_epoch`), so an epoch run after a resume draws the
    augmentation and dropout it drew in an unbroken run. `loss_fn`
    scores the model's raw output against the loader's target, `loss_fn(output, target)`,
    and with a `teacher` `loss_fn(output, target, teacher_output)` (see `task_loss`). Under
    torchrun the steps run in DistributedDataParallel (`wgates.distributed`); progress is
    shown by rank 0 only.
    """
    device = next(model.parameters()).device
    optimizers = optimizers or [make_optimizer(model.parameters(), lr)]
    stepper = distributed.wrap(model)  # DDP under torchrun: gradients averaged over ranks
    progress = progress and distributed.is_main()
    for o in optimizers:  # a resumed optimizer's lr is annealed: the schedule starts over it
        for group in o.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"])
    steps = max(1, epochs * len(train_loader))
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers]
    for _ in range(start_epoch * len(train_loader)):
        for s in schedulers:
            s.step()
    if teacher is not None:
        teacher.eval()
    history = History()
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(start_epoch, epochs):
        if seed is not None:
            seed_epoch(seed, desc, epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        totals: dict[str, float] = {"loss": 0.0}
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                   disable=not progress)
        for i, (x, y) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            if isinstance(y, torch.Tensor):  # else the user's loss_fn reads it as it is
                y = y.to(device, non_blocking=True)
            with autocast(device):
                output = stepper(x)
                taught = None
                if teacher is not None:
                    with torch.no_grad():
                        taught = teacher(x)
                loss = task_loss(loss_fn, output, y, taught)
            stats = {}
            if extra_loss is not None:
                extra, stats = extra_loss()
                loss = loss + extra
            if distributed.any_rank(not bool(torch.isfinite(loss))):
                raise WgatesError(
                    f"{desc}: the loss became {loss.item()} in epoch {epoch + 1}; the last "
                    "finished epoch's checkpoint is kept: lower the learning rate and resume"
                )
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optimizers:
                o.step()
            for s in schedulers:
                s.step()
            value = loss.item()
            totals["loss"] += value / len(train_loader)
            for k, v in stats.items():
                totals[k] = float(v)
            if on_step is not None:
                on_step(epoch * len(train_loader) + i, {"loss": value, **stats})
            bar.set_postfix({k: f"{v:.3g}" for k, v in {"loss": value, **stats}.items()})
        totals["loss"] = distributed.all_mean(totals["loss"])
        distributed.sync_buffers(model)
        record = {"epoch": epoch + 1, **totals}
        if val_loader is not None:
            record["val_accuracy"] = evaluate(model, val_loader)
        history.epochs.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
    return history


def finetune(model: nn.Module, train_loader: Iterable, epochs: int,
             lr: float = PRUNE.finetune_lr, teacher: nn.Module | None = None,
             loss_fn: LossFn = classification_loss, **kwargs) -> History:
    """The fine-tune `wgates.prune` gives the extracted model: `train` with its learning rate
    (SGD, cosine), distilled from `teacher` (the dense model) when one is given, the teacher's
    output reaching `loss_fn` as its third argument. `kwargs` go to `train`."""
    return train(model, train_loader, epochs, lr=lr, teacher=teacher, loss_fn=loss_fn,
                 **{"desc": "fine-tune", **kwargs})
