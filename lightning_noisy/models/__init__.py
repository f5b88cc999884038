"""Backbones with a ``features`` / ``classifier`` API, and a registry to build them by name."""

from lightning_noisy.models.cnn1d import MLP, MNIST1DCNN
from lightning_noisy.models.mode import evaluating
from lightning_noisy.models.preact_resnet import PreActBlock, PreActResNet18
from lightning_noisy.models.registry import Backbone, TorchvisionBackbone, available_backbones, build_backbone

__all__ = [
    "MLP",
    "Backbone",
    "MNIST1DCNN",
    "PreActBlock",
    "PreActResNet18",
    "TorchvisionBackbone",
    "available_backbones",
    "build_backbone",
    "evaluating",
]
