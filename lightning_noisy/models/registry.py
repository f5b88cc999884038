"""Backbones by name, and a wrapper that gives torchvision classifiers the ``features`` API."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torchvision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy.models.cnn1d import MLP, MNIST1DCNN, _check_int
from lightning_noisy.models.preact_resnet import PreActResNet18

__all__ = ["Backbone", "TorchvisionBackbone", "available_backbones", "build_backbone"]

TORCHVISION_PREFIX = "torchvision:"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": MNIST1DCNN,
    "mlp": MLP,
    "preact_resnet18": PreActResNet18,
}

# torchvision models whose training-mode forward returns auxiliary logits unless told otherwise.
_AUX_LOGITS_MODELS = frozenset({"googlenet", "inception_v3"})


@runtime_checkable
class Backbone(Protocol):
    """What the package's methods need from a network: logits and penultimate features.

    ``forward(x)`` must equal ``classifier(features(x))``.
    """

    feature_dim: int
    classifier: nn.Module

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]``."""
        ...

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        ...


def _find_linear_head(model: nn.Module) -> tuple[nn.Module, str]:
    """Return ``(parent, key)`` of the final ``nn.Linear`` of a torchvision classifier.

    Looks at ``fc`` (ResNet, RegNet, ShuffleNet, GoogLeNet, Inception), ``classifier``
    (DenseNet), ``classifier[-1]`` (VGG, AlexNet, MobileNet, EfficientNet, ConvNeXt, MNASNet,
    MaxViT), ``heads.head`` (ViT) and ``head`` (Swin). ``key`` is the child's name in
    ``parent`` (``"3"`` for the fourth entry of a ``Sequential``), usable with get/setattr.
    """
    for attr in ("fc", "classifier", "head"):
        child = getattr(model, attr, None)
        if isinstance(child, nn.Linear):
            return model, attr
        if attr == "classifier" and isinstance(child, nn.Sequential) and isinstance(child[-1], nn.Linear):
            return child, list(child._modules)[-1]
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Module) and isinstance(getattr(heads, "head", None), nn.Linear):
        return heads, "head"
    raise ValueError(
        f"`model` ({type(model).__name__}) has no final nn.Linear at `fc`, `classifier`, `classifier[-1]`, "
        "`heads.head` or `head`; wrap it by hand to provide `features` and `classifier`."
    )


class TorchvisionBackbone(nn.Module):
    """Give a torchvision classifier the ``features`` / ``classifier`` / ``feature_dim`` API.

    The final ``nn.Linear`` is moved to ``self.classifier`` and replaced by ``nn.Identity`` in
    ``self.model``, so ``features(x) = model(x)`` and ``forward(x) = classifier(features(x))``
    compute exactly what the original model computed; no parameter is copied.

    Args:
        model: a torchvision classification model (see :func:`_find_linear_head` for the heads found).
        num_classes: when given and different from the head's output size, the head is replaced by
            a freshly initialised ``nn.Linear(feature_dim, num_classes)`` (fine-tuning pretrained
            weights on another label set).

    Shapes:
        input as the wrapped model expects; ``features(x)``: ``[B, feature_dim]``;
        ``forward(x)``: logits ``[B, num_classes]``.
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if num_classes is not None:
            _check_int("num_classes", num_classes, 2)
        parent, key = _find_linear_head(model)
        head: nn.Linear = getattr(parent, key)
        setattr(parent, key, nn.Identity())
        if num_classes is not None and head.out_features != num_classes:
            head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        self.model = model
        self.classifier = head
        self.feature_dim = head.in_features
        self.num_classes = head.out_features

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]``."""
        out = self.model(x)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{type(self.model).__name__} returned {type(out).__name__}, not a Tensor; build it "
                "without auxiliary outputs (e.g. `aux_logits=False`)."
            )
        return out

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.classifier(self.features(x))


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`: the package's own, then ``torchvision:<name>``."""
    return sorted(_BUILDERS) + [TORCHVISION_PREFIX + name for name in _torchvision_names()]


def _build_torchvision(name: str, num_classes: int, kwargs: dict[str, Any]) -> TorchvisionBackbone:
    valid = _torchvision_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(
            f"`name` {TORCHVISION_PREFIX + name!r} is not a torchvision classification model.{hint} "
            f"Valid: {', '.join(TORCHVISION_PREFIX + v for v in valid)}."
        )
    if name in _AUX_LOGITS_MODELS:
        kwargs.setdefault("aux_logits", False)
    if kwargs.get("weights") is not None:
        rank_zero_warn(
            f"build_backbone({TORCHVISION_PREFIX + name!r}, weights={kwargs['weights']!r}) downloads pretrained "
            "weights on first use: this needs internet access (or a filled torch hub cache). "
            f"The classification head is replaced by a new one with {num_classes} outputs when the sizes differ."
        )
        return TorchvisionBackbone(torchvision.models.get_model(name, **kwargs), num_classes=num_classes)
    kwargs["weights"] = None
    return TorchvisionBackbone(torchvision.models.get_model(name, num_classes=num_classes, **kwargs))


def build_backbone(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a backbone with ``forward``, ``features``, ``classifier`` and ``feature_dim``.

    Args:
        name: ``"cnn1d"`` (:class:`MNIST1DCNN`), ``"mlp"`` (:class:`MLP`, needs ``in_features``),
            ``"preact_resnet18"`` (:class:`PreActResNet18`) or ``"torchvision:<name>"`` for a
            classification model of ``torchvision.models`` (e.g. ``"torchvision:resnet18"``),
            built with ``weights=None`` unless ``weights`` is passed (which downloads them).
        num_classes: number of classes (>= 2).
        kwargs: forwarded to the model's constructor (torchvision: to ``torchvision.models.get_model``).

    Raises:
        ValueError: on an unknown ``name`` (the message lists valid names) or ``num_classes < 2``.
    """
    _check_int("num_classes", num_classes, 2)
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a string, got {name!r}.")
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, dict(kwargs))
    if name not in _BUILDERS:
        raise ValueError(
            f"`name` must be one of {sorted(_BUILDERS)} or '{TORCHVISION_PREFIX}<name>' for a torchvision "
            f"classification model (see available_backbones()), got {name!r}."
        )
    return _BUILDERS[name](num_classes=num_classes, **kwargs)
