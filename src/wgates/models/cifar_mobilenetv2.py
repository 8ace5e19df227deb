"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 inputs.

The stem and the second stage use stride 1 instead of 2 (as is usual for CIFAR), so the
final feature map is 4x4 rather than 1x1 and spatial information survives to the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from wgates.models import register_model

# (expansion t, output channels c, repeats n, first stride s), ImageNet strides 2->1 at stage 2.
_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never dropping more than 10% (as upstream)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs; `width_mult` scales every layer but the 1280-wide head
    (which, as upstream, only grows for width_mult > 1)."""

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.2,
    ):
        super().__init__()
        cin = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [*_conv_bn(in_channels, cin, 3), nn.ReLU6(inplace=True)]
        for t, c, n, s in _CONFIG:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("mobilenetv2_cifar")
def mobilenetv2_cifar(num_classes: int = 10, **kwargs) -> CifarMobileNetV2:
    """MobileNetV2 for CIFAR (~2.2M parameters at width_mult=1); accepts `width_mult`."""
    return CifarMobileNetV2(num_classes=num_classes, **kwargs)
