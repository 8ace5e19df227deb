"""Multiply-accumulates as a differentiable function of the kept channels, and the share of
layers left: LPNet's prior.

Every conv and linear layer costs its dense MACs times the fraction of its output channels
kept times the fraction of its input channels kept (a depthwise conv: the output fraction
only). Each fraction is affine in the groups' kept fractions, read from the groups' producer
and consumer placements, so the whole is a quadratic in the kept counts, exact for the
layers it covers and cheap enough to evaluate inside the knapsack.

Why LPNet needs it: a plain MLP fitted on a few dozen noisy samples extrapolates freely
where the samples never went, and a greedy knapsack finds exactly those places. Measured on
ResNet-20 at batch 32 (torch-cpu, AMD EPYC, 82 samples whose repeats vary by 20%): the plain
MLP's held-out error was 49%, against 17% for `a + b * MACs`; LPNet predicted 0.49 of the
dense latency for an allocation (one group at 1 channel) that measured 0.72
(docs/design.md, "LPNet on a MACs prior").

Why the layers too: where blocks may be dropped (`wgates.depth`), latency at batch 1 falls by
a block's fixed cost, which MACs do not see. Measured on ONNX Runtime's ResNet-20 profile with
depth (150 samples): LPNet on MACs priced the searched models at 0.371 and 0.279 where they
measured 0.49 and 0.47; `a + b * MACs + c * (layers - 1)` alone prices them at about 0.50
and 0.49 (docs/design.md, "LPNet prices a dropped block by the layers it takes away").
"""

from __future__ import annotations

import torch
from torch import nn

from wgates.gated import GatedModel


class MacsModel(nn.Module):
    """MACs relative to the dense model for kept counts [.., n_groups] (`forward`)."""

    def __init__(self, weights: torch.Tensor, out_map: torch.Tensor, in_map: torch.Tensor,
                 depthwise: torch.Tensor, sizes: torch.Tensor) -> None:
        super().__init__()
        # per layer: share of the dense MACs; per layer and group: share of the layer's
        # output (input) channels that the group's channels are
        self.register_buffer("weights", weights.float())
        self.register_buffer("out_map", out_map.float())
        self.register_buffer("in_map", in_map.float())
        self.register_buffer("depthwise", depthwise.bool())
        self.register_buffer("sizes", sizes.float())

    @classmethod
    def of(cls, gated: GatedModel) -> MacsModel:
        """The map of `gated`'s convs and linears (one forward pass of its dense copy on its
        example inputs)."""
        plain = gated.plain_copy().eval()
        layers: dict[str, tuple[float, int, int, bool]] = {}

        def record(name: str):
            def hook(module: nn.Module, args, out: torch.Tensor) -> None:
                if isinstance(module, nn.Linear):
                    macs = out[0].numel() * module.in_features
                    shape = (module.in_features, module.out_features, False)
                else:
                    macs = out[0].numel() * module.weight[0].numel()
                    dw = module.groups > 1 and module.groups == module.in_channels
                    shape = (module.in_channels, module.out_channels, dw)
                before = layers.get(name, (0.0,))[0]  # a layer called twice costs twice
                layers[name] = (before + macs, *shape)
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in plain.named_modules()
                 if isinstance(m, nn.Conv2d | nn.Linear)]
        try:
            with torch.no_grad():
                plain(*gated.example_inputs)
        finally:
            for h in hooks:
                h.remove()
        names = list(layers)
        row = {n: i for i, n in enumerate(names)}
        groups = gated.channel_groups
        out_map = torch.zeros(len(names), len(groups))
        in_map = torch.zeros(len(names), len(groups))
        for g, group in enumerate(groups):
            for p in group.producers:
                if p.module in row:
                    out_map[row[p.module], g] += len(p.idxs) / layers[p.module][2]
            for p in group.consumers:
                if p.module in row:
                    in_map[row[p.module], g] += len(p.idxs) / layers[p.module][1]
        macs = torch.tensor([layers[n][0] for n in names], dtype=torch.float64)
        return cls((macs / macs.sum()).float(), out_map, in_map,
                   torch.tensor([layers[n][3] for n in names]),
                   torch.tensor([g.size for g in groups]))

    def _shares(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: the share of its output and of its input channels kept."""
        x = kept.to(self.sizes.dtype) / self.sizes
        out = 1 - self.out_map.sum(1) + x @ self.out_map.T
        inp = 1 - self.in_map.sum(1) + x @ self.in_map.T
        return out, torch.where(self.depthwise, torch.ones_like(inp), inp)

    def forward(self, kept: torch.Tensor) -> torch.Tensor:
        out, inp = self._shares(kept)
        return (self.weights * out * inp).sum(-1)

    def layers(self, kept: torch.Tensor) -> torch.Tensor:
        """Share of the convs and linears still there (at least one input and one output
        channel kept), each counted once: a step function, constant unless a group may keep
        0 channels (a dropped block)."""
        out, inp = self._shares(kept)
        return ((out > 1e-6) & (inp > 1e-6)).to(out.dtype).mean(-1)

    @classmethod
    def from_dict(cls, state: dict[str, torch.Tensor]) -> MacsModel:
        """From its `state_dict` (a saved LPNet's `macs.*` entries)."""
        return cls(state["weights"], state["out_map"], state["in_map"], state["depthwise"],
                   state["sizes"])
