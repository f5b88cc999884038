"""Noise-robust classification losses and the loss registry.

Every loss has the signature ``loss(logits [B, C], targets, *, ..., reduction="mean")`` where
``targets`` are hard labels ``[B]`` or soft labels ``[B, C]``; a one-hot soft target gives the
hard-target result. Inputs of any floating dtype are computed in float32 (float64 kept), so
half-precision logits give a float32 loss.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_noisy.losses._targets import (
    Reduction,
    check_real,
    check_reduction,
    reduce,
    soft_cross_entropy,
    target_probabilities,
)
from lightning_noisy.losses.correction import (
    _check_backward_args,
    _check_forward_args,
    backward_corrected_loss,
    forward_corrected_loss,
)
from lightning_noisy.losses.regularizers import (
    _check_bootstrap_args,
    _check_label_smoothing_args,
    bootstrap_hard_loss,
    bootstrap_soft_loss,
    label_smoothing_loss,
)

__all__ = [
    "available_losses",
    "cross_entropy_loss",
    "gce_loss",
    "get_loss",
    "mae_loss",
    "rce_loss",
    "sce_loss",
    "truncated_gce_loss",
]


# --------------------------------------------------------------------------- argument checks


def _check_ce_args(reduction: Reduction = "mean") -> None:
    check_reduction(reduction)


def _check_gce_args(q: float = 0.7, reduction: Reduction = "mean") -> None:
    check_real("q", q, low=0.0, high=1.0, low_inclusive=False)
    check_reduction(reduction)


def _check_truncated_gce_args(
    q: float = 0.7, k: float = 0.5, weights: Tensor | None = None, reduction: Reduction = "mean"
) -> None:
    _check_gce_args(q, reduction)
    check_real("k", k, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if weights is not None:
        _check_weights(weights, None)


def _check_rce_args(log_clamp: float = -4.0, reduction: Reduction = "mean") -> None:
    check_real("log_clamp", log_clamp, high=0.0, high_inclusive=False)
    check_reduction(reduction)


def _check_sce_args(
    alpha: float = 0.1, beta: float = 1.0, log_clamp: float = -4.0, reduction: Reduction = "mean"
) -> None:
    check_real("alpha", alpha, low=0.0)
    check_real("beta", beta, low=0.0)
    _check_rce_args(log_clamp, reduction)


def _check_weights(weights: Tensor, batch_size: int | None) -> None:
    """Sample weights: a real tensor ``[B]`` with values in ``[0, 1]`` (one sync)."""
    if not isinstance(weights, Tensor) or weights.ndim != 1 or weights.is_complex():
        got = f"shape {tuple(weights.shape)}" if isinstance(weights, Tensor) else repr(weights)
        raise ValueError(f"weights must be a real tensor of shape [B], got {got}")
    if batch_size is not None and weights.shape[0] != batch_size:
        raise ValueError(f"weights must have shape [{batch_size}], got shape {tuple(weights.shape)}")
    values = weights.detach().to(torch.float32) if weights.dtype == torch.bool else weights.detach()
    bad = (values < 0) | (values > 1) | torch.isnan(values)
    if bool(bad.any()):
        raise ValueError(f"weights must be in [0, 1], got {float(values[bad][0])}")


# --------------------------------------------------------------------------- losses


def cross_entropy_loss(logits: Tensor, targets: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy ``loss_i = -sum_j y_ij log softmax(logits_i)_j``; equals ``F.cross_entropy``.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_ce_args(reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    return reduce(soft_cross_entropy(log_probs, probs), reduction)


def mae_loss(logits: Tensor, targets: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Mean absolute error (Ghosh, Kumar, Sastry, "Robust Loss Functions under Label Noise for Deep
    Neural Networks", AAAI 2017).

    ``loss_i = sum_j |p_ij - y_ij|`` with ``p = softmax(logits)``: the L1 distance between the
    prediction and the target distribution, as in the paper. For a hard label ``y`` it is
    ``2 (1 - p_y)``. Some implementations use ``1 - p_y`` instead (half of ours; the same
    minimiser, half the gradient); :func:`gce_loss` with ``q = 1`` gives that.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    check_reduction(reduction)
    probs = target_probabilities(logits, targets)
    predictions = torch.softmax(logits.to(probs.dtype), dim=1)
    return reduce((predictions - probs).abs().sum(dim=1), reduction)


def _gce_terms(log_probs: Tensor, q: float) -> Tensor:
    """Elementwise ``(1 - p^q) / q = -expm1(q log p) / q``, accurate as ``q -> 0`` (-> ``-log p``)."""
    return -torch.expm1(q * log_probs) / q


def gce_loss(logits: Tensor, targets: Tensor, *, q: float = 0.7, reduction: Reduction = "mean") -> Tensor:
    """Generalized cross-entropy ``L_q`` (Zhang & Sabuncu, "Generalized Cross Entropy Loss for
    Training Deep Neural Networks with Noisy Labels", NeurIPS 2018).

    ``loss_i = (1 - p_iy^q) / q`` for a hard label ``y``; ``sum_j y_ij (1 - p_ij^q) / q`` for soft
    targets. ``q -> 0`` gives the cross-entropy, ``q = 1`` gives ``1 - p_y`` (half of
    :func:`mae_loss`).

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        q: in ``(0, 1]`` (the paper uses 0.7).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_gce_args(q, reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    return reduce((probs * _gce_terms(log_probs, q)).sum(dim=1), reduction)


def truncated_gce_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    q: float = 0.7,
    k: float = 0.5,
    weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Truncated ``L_q`` loss (Zhang & Sabuncu, NeurIPS 2018, ``L_trunc``).

    ``loss_i = L_q(p_iy)`` if ``p_iy > k`` else the constant ``L_q(k) = (1 - k^q) / q``, with
    ``L_q(p) = (1 - p^q) / q``; the constant has no gradient, so samples the model finds
    unlikely are ignored. For soft targets the rule applies per class:
    ``sum_j y_ij (L_q(p_ij) if p_ij > k else L_q(k))``.

    In the paper the truncation is carried out by pruning: sample weights ``w_i`` in {0, 1} are
    refreshed every few epochs (``w_i = 1`` iff ``p_iy > k``) and the loss is
    ``w_i L_q(p_i) + (1 - w_i) L_q(k)``. Pass those ``weights`` to use them instead of the live
    threshold; values in ``[0, 1]`` are accepted.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        q: in ``(0, 1]`` (the paper uses 0.7).
        k: truncation threshold in ``(0, 1)`` (the paper uses 0.5).
        weights: optional sample weights ``[B]`` in ``[0, 1]`` (checked: one sync).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_truncated_gce_args(q, k, None, reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    floor = -math.expm1(q * math.log(k)) / q
    terms = _gce_terms(log_probs, q)
    if weights is None:
        truncated = torch.where(log_probs.exp() > k, terms, torch.full_like(terms, floor))
        loss = (probs * truncated).sum(dim=1)
    else:
        _check_weights(weights, logits.shape[0])
        w = weights.to(device=logits.device, dtype=probs.dtype)
        loss = w * (probs * terms).sum(dim=1) + (1.0 - w) * floor
    return reduce(loss, reduction)


def rce_loss(logits: Tensor, targets: Tensor, *, log_clamp: float = -4.0, reduction: Reduction = "mean") -> Tensor:
    """Reverse cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy
    Labels", ICCV 2019).

    ``loss_i = -sum_j p_ij log y_ij`` with ``p = softmax(logits)`` and the target probabilities
    clamped to ``[exp(A), 1]`` before the log (``A = log_clamp``, so ``log 0 = A``). For a hard
    label it is ``-A (1 - p_y)``.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        log_clamp: ``A < 0``, the value given to ``log 0`` (the paper uses -4).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_rce_args(log_clamp, reduction)
    probs = target_probabilities(logits, targets)
    predictions = torch.softmax(logits.to(probs.dtype), dim=1)
    log_targets = probs.clamp(min=math.exp(log_clamp), max=1.0).log()
    return reduce(-(predictions * log_targets).sum(dim=1), reduction)


def sce_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 1.0,
    log_clamp: float = -4.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Symmetric cross-entropy ``alpha * CE + beta * RCE`` (Wang et al., ICCV 2019).

    See :func:`cross_entropy_loss` and :func:`rce_loss`. The paper uses ``alpha = 0.1,
    beta = 1.0`` on CIFAR-10 and ``A = -4``.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        alpha: weight of the cross-entropy, ``>= 0``.
        beta: weight of the reverse cross-entropy, ``>= 0``.
        log_clamp: ``A < 0``, the value given to ``log 0`` in the RCE term.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_sce_args(alpha, beta, log_clamp, reduction)
    ce = cross_entropy_loss(logits, targets, reduction="none")
    rce = rce_loss(logits, targets, log_clamp=log_clamp, reduction="none")
    return reduce(alpha * ce + beta * rce, reduction)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[Callable[..., Tensor], Callable[..., None]]] = {
    "ce": (cross_entropy_loss, _check_ce_args),
    "mae": (mae_loss, _check_ce_args),
    "gce": (gce_loss, _check_gce_args),
    "truncated_gce": (truncated_gce_loss, _check_truncated_gce_args),
    "sce": (sce_loss, _check_sce_args),
    "rce": (rce_loss, _check_rce_args),
    "bootstrap_soft": (bootstrap_soft_loss, _check_bootstrap_args),
    "bootstrap_hard": (
        bootstrap_hard_loss,
        functools.partial(_check_bootstrap_args, beta=0.8),
    ),
    "label_smoothing": (label_smoothing_loss, _check_label_smoothing_args),
    "forward": (forward_corrected_loss, _check_forward_args),
    "backward": (backward_corrected_loss, _check_backward_args),
}


def available_losses() -> list[str]:
    """Names accepted by :func:`get_loss`, sorted."""
    return sorted(_REGISTRY)


def get_loss(name: str, **kwargs: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the loss called ``name`` with ``kwargs`` bound, as ``loss(logits, targets)``.

    The keyword arguments are checked now, not at the first call: unknown names, missing
    required ones (``transition`` for ``"forward"`` / ``"backward"``) and out-of-range values
    raise ``ValueError``. Call-time keywords (e.g. ``weights`` of ``"truncated_gce"``) can still be
    passed to the returned callable.

    Example:
        >>> loss_fn = get_loss("gce", q=0.7)
        >>> loss = loss_fn(logits, targets)

    Raises:
        ValueError: for an unknown name (listing the valid ones) or invalid arguments.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    fn, check = _REGISTRY[name]
    parameters = inspect.signature(fn).parameters
    accepted = [p for p, param in parameters.items() if param.kind is inspect.Parameter.KEYWORD_ONLY]
    required = [p for p, param in parameters.items() if param.kind is not inspect.Parameter.KEYWORD_ONLY]
    required = [p for p in required if p not in ("logits", "targets")]
    for key in kwargs:
        if key not in accepted + required:
            raise ValueError(
                f"unknown argument {key!r} for loss {name!r}; accepted: {', '.join(required + accepted) or 'none'}"
            )
    for key in required:
        if key not in kwargs:
            raise ValueError(f"loss {name!r} requires the argument {key!r}")
    check(**kwargs)
    return functools.partial(fn, **kwargs)
