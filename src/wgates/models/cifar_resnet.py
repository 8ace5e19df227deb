"""CIFAR ResNets of He et al. (2016, sec. 4.2): 6n+2 layers in 3 stages of 16/32/64 channels.

Shortcuts that change shape use a 1x1 conv + BN (option B) instead of the paper's
zero-padding (option A): pruning tools trace conv dependencies, not padding tricks.
"""

from __future__ import annotations

from torch import Tensor, nn

from wgates.models import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if i > 0 and j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet20")
def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-20 (~0.27M parameters)."""
    return CifarResNet(20, num_classes=num_classes, **kwargs)


@register_model("resnet32")
def resnet32(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-32 (~0.47M parameters)."""
    return CifarResNet(32, num_classes=num_classes, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-56 (~0.86M parameters)."""
    return CifarResNet(56, num_classes=num_classes, **kwargs)
