"""torchvision ResNets (ResNet-10/50/152, ResNeXt-50 32x4d) with ``features`` + ``classifier``."""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet as tvr


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet whose ``fc`` becomes ``classifier``.

    ``features(x)``: ``(B, C_in, H, W)`` -> ``(B, D)`` with D = 512 (ResNet-10) or 2048.
    """

    def __init__(self, net: tvr.ResNet, num_classes: int, in_channels: int = 3):
        super().__init__()
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.body(x))


def _tv(builder, **kw):
    def make(num_classes: int, in_channels: int = 3, weights_path: str | None = None):
        net = builder(weights=None, **kw)
        if weights_path:  # a local torchvision state dict (no hub download at run time)
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        return TorchvisionResNet(net, num_classes, in_channels)

    return make


def _resnet10(weights=None):
    return tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1])


resnet10 = _tv(_resnet10)
resnet50 = _tv(tvr.resnet50)
resnet152 = _tv(tvr.resnet152)
resnext50_32x4d = _tv(tvr.resnext50_32x4d)
