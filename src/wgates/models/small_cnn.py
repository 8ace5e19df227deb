"""The embedded default model: a plain conv net for scikit-learn's digits upscaled to 32x32.

Widths are chosen so that batch-1 CPU latency is dominated by convolution compute rather
than per-layer framework overhead: halving every width then cuts latency by well over
half, which is what makes a latency-budget pruning demo on this model meaningful.
"""

from __future__ import annotations

from torch import Tensor, nn

from wgates.models import register_model

# (out_channels, max-pool after) per conv layer; input is (1, 32, 32).
_LAYERS: tuple[tuple[int, bool], ...] = ((64, True), (128, True), (256, False), (256, False))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stack with max-pools, global average pool and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width, pool in _LAYERS:
            cout = max(1, round(width * width_mult))
            layers.append(_conv_bn_relu(cin, cout))
            if pool:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("small_cnn", input_shape=(1, 32, 32))
def small_cnn(num_classes: int = 10, **kwargs) -> SmallCNN:
    """Default model for `digits` (1x32x32 input); accepts `width_mult`, `in_channels`."""
    return SmallCNN(num_classes=num_classes, **kwargs)
