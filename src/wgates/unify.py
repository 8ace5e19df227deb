"""Micro-structured weight unification (Lin et al., 2021, arXiv 2106.08301), applied on top of
a channel-pruned model: a kind of compression that removes no connection.

Every conv's weights are cut into blocks of `block` consecutive input channels at one
(output channel, kernel position): the order an NHWC dot product reads them. In a unified
block every coefficient has the same magnitude and keeps its own sign, so the block stores one
value and `block` sign bits; with `zero=True` the value is 0 (micro-structured pruning) and
the block stores nothing. `ratio` of each conv's blocks are unified: those that lose least.

Training is ADMM, as the paper has it: the weights W are trained on the task loss plus
rho/2 * ||W - Z + U||^2, where Z is the projection of W + U onto the constraint (the chosen
blocks unified) and U the scaled dual, both updated every `admm_every` steps; then W is
projected for good and fine-tuned with the chosen blocks kept unified after every step.

Why it is here and what it buys: the stored model gets smaller (`stored_bytes`), but dense
kernels run a unified block as fast as any other, so no backend is expected to get faster.
`wgates unify` measures that rather than claiming it."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.train import LossFn, classification_loss, make_optimizer, train

RHO = 1e-3  # ADMM penalty weight (per coefficient, summed)
ADMM_EVERY = 50  # steps between the Z and U updates


def unified_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convs unification applies to: ungrouped, more than one input channel."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 1]


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[O, I, kh, kw] -> [O * kh * kw, ceil(I / block), block], input channels last (padded
    with zeros where `block` does not divide I)."""
    o, i, kh, kw = weight.shape
    rows = weight.permute(0, 2, 3, 1).reshape(o * kh * kw, i)
    pad = -i % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(rows.shape[0], -1, block)


def _unblocks(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    o, i, kh, kw = shape
    return blocks.reshape(o * kh * kw, -1)[:, :i].reshape(o, kh, kw, i).permute(0, 3, 1, 2)


def unified_values(blocks: torch.Tensor, zero: bool) -> torch.Tensor:
    """Each block with every magnitude set to the block's mean magnitude (signs kept), or 0."""
    if zero:
        return torch.zeros_like(blocks)
    sign = torch.where(blocks < 0, -1.0, 1.0).to(blocks.dtype)  # a 0 is unified too
    return sign * blocks.abs().mean(-1, keepdim=True)


def choose_blocks(weight: torch.Tensor, block: int, ratio: float, zero: bool) -> torch.Tensor:
    """Bool [rows, blocks]: the `ratio` of the conv's whole blocks whose unification changes
    the weights least (squared error; for zero, the smallest norms). A block cut short by the
    end of the input channels is never chosen: its padding would change its magnitude."""
    b = _blocks(weight.detach(), block)
    loss = (b - unified_values(b, zero)).pow(2).sum(-1)
    if weight.shape[1] % block:
        loss[:, -1] = torch.inf
    k = min(int(round(ratio * loss.numel())), int(torch.isfinite(loss).sum()))
    chosen = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
    chosen[loss.flatten().argsort()[:k]] = True
    return chosen.view_as(loss)


def project(weight: torch.Tensor, chosen: torch.Tensor, block: int, zero: bool) -> torch.Tensor:
    """`weight` with the `chosen` blocks unified."""
    b = _blocks(weight, block)
    b = torch.where(chosen.unsqueeze(-1), unified_values(b, zero), b)
    return _unblocks(b, weight.shape)


@dataclass
class Unification:
    """What `unify` did: the setting, the chosen blocks per conv, and what training recorded."""

    block: int
    ratio: float
    zero: bool
    chosen: dict[str, torch.Tensor]
    history: list[dict]


def check_setting(block: int, ratio: float) -> None:
    """Refuse a setting unification cannot take, before any data is read."""
    if block < 2:
        raise WgatesError(f"block must be at least 2 coefficients, got {block}")
    if not 0 < ratio <= 1:
        raise WgatesError(f"ratio must be in (0, 1], the fraction of blocks unified; got {ratio}")


def unify(model: nn.Module, train_loader: Iterable, *, block: int = 4, ratio: float = 0.5,
          zero: bool = False, admm_epochs: int = 1, finetune_epochs: int = 1,
          lr: float = 0.01, rho: float = RHO, admm_every: int = ADMM_EVERY,
          teacher: nn.Module | None = None, loss_fn: LossFn = classification_loss,
          progress: bool = True, seed: int = 0) -> Unification:
    """Unify `ratio` of every conv's blocks of `block` input channels in place (see the
    module docstring): `admm_epochs` of ADMM, then `finetune_epochs` with the blocks held."""
    check_setting(block, ratio)
    convs = unified_convs(model)
    if not convs:
        raise WgatesError(f"{type(model).__name__} has no ungrouped conv to unify")
    weights = [m.weight for _, m in convs]
    chosen = [choose_blocks(w, block, ratio, zero) for w in weights]
    z = [project(w.detach(), c, block, zero) for w, c in zip(weights, chosen, strict=True)]
    u = [torch.zeros_like(w) for w in weights]
    step = 0

    def penalty() -> tuple[torch.Tensor, dict]:
        """The ADMM term; every `admm_every` steps Z is re-projected (with a fresh choice of
        blocks, as W moves) and U takes the residual."""
        nonlocal step
        step += 1
        if step % admm_every == 0:
            with torch.no_grad():
                for j, w in enumerate(weights):
                    chosen[j] = choose_blocks(w + u[j], block, ratio, zero)
                    z[j] = project(w + u[j], chosen[j], block, zero)
                    u[j] += w - z[j]
        term = sum((w - zj + uj).pow(2).sum() for w, zj, uj in zip(weights, z, u, strict=True))
        residual = sum(float((w.detach() - zj).norm()) for w, zj in zip(weights, z, strict=True))
        return rho / 2 * term, {"admm_residual": residual}

    history = []
    if admm_epochs > 0:
        history += train(model, train_loader, admm_epochs, lr=lr, extra_loss=penalty,
                         teacher=teacher, loss_fn=loss_fn, desc="unify (ADMM)",
                         progress=progress, seed=seed).epochs
    with torch.no_grad():
        for j, w in enumerate(weights):
            chosen[j] = choose_blocks(w, block, ratio, zero)
            w.copy_(project(w, chosen[j], block, zero))
    if finetune_epochs > 0:
        optimizer = make_optimizer(model.parameters(), lr)

        def hold(*_) -> None:  # projected gradient descent: the chosen blocks stay unified
            with torch.no_grad():
                for w, c in zip(weights, chosen, strict=True):
                    w.copy_(project(w, c, block, zero))

        optimizer.register_step_post_hook(hold)
        history += train(model, train_loader, finetune_epochs, lr=lr, optimizers=[optimizer],
                         teacher=teacher, loss_fn=loss_fn, desc="unify (fine-tune)",
                         progress=progress, seed=seed).epochs
    return Unification(block, ratio, zero, {n: c.cpu() for (n, _), c in
                                            zip(convs, chosen, strict=True)}, history)


def is_unified(model: nn.Module, result: Unification, atol: float = 1e-6) -> bool:
    """Every chosen block of `model` holds one magnitude (or zeros)."""
    for name, conv in unified_convs(model):
        b = _blocks(conv.weight.detach().cpu(), result.block)[result.chosen[name]]
        if len(b) and not torch.allclose(b, unified_values(b, result.zero), atol=atol):
            return False
    return True


def stored_bytes(model: nn.Module, result: Unification | None = None) -> int:
    """zlib-compressed bytes of the model's parameters and buffers in float32, with each
    unified block stored as one magnitude and its signs as bits (nothing for a zero block)
    and a bit per block saying which it is. Without `result`: the plain float32 tensors,
    compressed alike, for comparison."""
    chosen = result.chosen if result is not None else {}
    convs = dict(unified_convs(model))
    parts: list[bytes] = []
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        t = tensor.detach().cpu()
        if module in chosen and name.endswith("weight") and module in convs:
            b = _blocks(t.float(), result.block)
            mask = chosen[module]
            parts.append(np.packbits(mask.numpy()).tobytes())
            parts.append(b[~mask].numpy().astype(np.float32).tobytes())
            if not result.zero:
                kept = b[mask]
                parts.append(kept.abs().mean(-1).numpy().astype(np.float32).tobytes())
                parts.append(np.packbits((kept < 0).numpy()).tobytes())
        else:
            parts.append(t.numpy().astype(np.float32 if t.is_floating_point() else
                                          t.numpy().dtype).tobytes())
    buffer = io.BytesIO()
    for p in parts:
        buffer.write(p)
    return len(zlib.compress(buffer.getvalue(), 9))
