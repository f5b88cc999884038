"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy.models.cnn1d import _check_int

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """Basic pre-activation block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    The projection shortcut (1x1 convolution), used when the stride or the width changes,
    takes the pre-activated input, as in He et al. (2016).

    Shapes: ``[B, in_planes, H, W] -> [B, planes, H / stride, W / stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32x32 images (CIFAR), the backbone of DivideMix and others.

    A 3x3 stem (no max-pool), four stages of two :class:`PreActBlock` (64, 128, 256, 512
    channels, strides 1, 2, 2, 2), a final BatchNorm + ReLU (as in He et al.; the DivideMix
    code omits it), global average pooling (any input size works) and a linear head.

    Args:
        num_classes: number of classes (>= 2).
        in_channels: input channels (3 for RGB).

    Shapes:
        input ``[B, in_channels, H, W]``; ``features(x)``: ``[B, 512]``;
        ``forward(x)``: logits ``[B, num_classes]``.
    """

    feature_dim = 512

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = _check_int("num_classes", num_classes, 2)
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, 512]`` (pooled, after the final BatchNorm + ReLU)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"`x` must have shape [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}.")
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.classifier(self.features(x))
