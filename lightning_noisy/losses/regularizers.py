"""Target regularisers and prediction penalties: label smoothing, bootstrapping, entropy, prior, KL.

All functions take logits ``[B, C]`` (any floating dtype; computed in float32, or float64
for float64 inputs) and, where they use targets, hard labels ``[B]`` or soft labels
``[B, C]`` (see :mod:`lightning_noisy.losses._targets`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_noisy.losses._targets import (
    Reduction,
    check_distributions,
    check_logits,
    check_real,
    check_reduction,
    compute_dtype,
    one_hot_rows,
    reduce,
    soft_cross_entropy,
    target_probabilities,
)

__all__ = [
    "bootstrap_hard_loss",
    "bootstrap_soft_loss",
    "entropy_loss",
    "kl_div_loss",
    "label_smoothing_loss",
    "prior_loss",
]


def _check_label_smoothing_args(smoothing: float = 0.1, reduction: Reduction = "mean") -> None:
    check_real("smoothing", smoothing, low=0.0, high=1.0, high_inclusive=False)
    check_reduction(reduction)


def _check_bootstrap_args(beta: float = 0.95, reduction: Reduction = "mean") -> None:
    check_real("beta", beta, low=0.0, high=1.0)
    check_reduction(reduction)


def label_smoothing_loss(
    logits: Tensor, targets: Tensor, *, smoothing: float = 0.1, reduction: Reduction = "mean"
) -> Tensor:
    """Cross-entropy against smoothed targets (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016).

    ``loss_i = -sum_j y'_ij log p_ij`` with ``y' = (1 - smoothing) * y + smoothing / C`` and
    ``p = softmax(logits)``. Equals ``F.cross_entropy(logits, targets, label_smoothing=smoothing)``.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        smoothing: mass spread uniformly over all classes, in ``[0, 1)``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for the ``[B]`` losses.
    """
    _check_label_smoothing_args(smoothing, reduction)
    probs = target_probabilities(logits, targets)
    smoothed = probs * (1.0 - smoothing) + smoothing / logits.shape[1]
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    return reduce(soft_cross_entropy(log_probs, smoothed), reduction)


def bootstrap_soft_loss(
    logits: Tensor, targets: Tensor, *, beta: float = 0.95, reduction: Reduction = "mean"
) -> Tensor:
    """Soft bootstrapping (Reed et al., "Training Deep Neural Networks on Noisy Labels with Bootstrapping", 2015).

    ``loss_i = -sum_j (beta * y_ij + (1 - beta) * p_ij) log p_ij`` with ``p = softmax(logits)``.

    The ``p`` inside the target is **detached**, as in common practice: the target is a
    constant mix of the given label and the current prediction. (Differentiating through it,
    as the paper's formula literally reads, adds ``(1 - beta)`` times an entropy-minimisation
    gradient.)

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        beta: weight of the given label, in ``[0, 1]`` (the paper uses 0.95).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_bootstrap_args(beta, reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    mixed = beta * probs + (1.0 - beta) * log_probs.detach().exp()
    return reduce(soft_cross_entropy(log_probs, mixed), reduction)


def bootstrap_hard_loss(
    logits: Tensor, targets: Tensor, *, beta: float = 0.8, reduction: Reduction = "mean"
) -> Tensor:
    """Hard bootstrapping (Reed et al., 2015).

    ``loss_i = -sum_j (beta * y_ij + (1 - beta) * z_ij) log p_ij`` with ``z_i`` the one-hot
    encoding of ``argmax_j p_ij`` (no gradient flows through ``z``).

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        beta: weight of the given label, in ``[0, 1]`` (the paper uses 0.8).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    _check_bootstrap_args(beta, reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    predicted = one_hot_rows(logits.detach().argmax(dim=1), logits.shape[1], probs.dtype)
    mixed = beta * probs + (1.0 - beta) * predicted
    return reduce(soft_cross_entropy(log_probs, mixed), reduction)


def entropy_loss(logits: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Entropy of the predictions, ``H(p_i) = -sum_j p_ij log p_ij`` with ``p = softmax(logits)``.

    Minimised as Joint Optimization's ``L_e`` (Tanaka et al., CVPR 2018); used with a negative
    sign as the confidence penalty of DivideMix's warm-up (Li et al., ICLR 2020).

    Args:
        logits: ``[B, C]``.
        reduction: ``"mean"`` (the mean entropy) / ``"sum"``, or ``"none"`` for ``[B]``.
    """
    check_logits(logits)
    check_reduction(reduction)
    log_probs = torch.log_softmax(logits.to(compute_dtype(logits)), dim=1)
    return reduce(-(log_probs.exp() * log_probs).sum(dim=1), reduction)


def prior_loss(logits: Tensor, prior: Tensor | None = None) -> Tensor:
    """Prior term of Joint Optimization (Tanaka et al., CVPR 2018), ``L_p``.

    ``L_p = sum_j prior_j log(prior_j / s_j)`` with ``s = (1/B) sum_i softmax(logits_i)`` the
    mean prediction over the batch: the KL divergence from the prior to the mean prediction,
    which stops the network from assigning every sample to one class. ``0 log 0 = 0``;
    ``log s`` is computed as ``logsumexp_i log p_ij - log B`` so it stays finite.

    Args:
        logits: ``[B, C]`` with ``B >= 1``.
        prior: class prior ``[C]`` (non-negative, summing to 1 within 1e-3); uniform if ``None``.

    Returns:
        A scalar (the term is defined on the batch, not per sample).
    """
    check_logits(logits)
    if logits.shape[0] < 1:
        raise ValueError(f"logits must hold at least one sample, got shape {tuple(logits.shape)}")
    dtype = compute_dtype(logits)
    num_classes = logits.shape[1]
    if prior is None:
        prior = torch.full((num_classes,), 1.0 / num_classes, dtype=dtype, device=logits.device)
    else:
        if not isinstance(prior, Tensor) or not prior.is_floating_point() or prior.shape != (num_classes,):
            got = f"shape {tuple(prior.shape)}, dtype {prior.dtype}" if isinstance(prior, Tensor) else repr(prior)
            raise ValueError(f"prior must be a floating tensor of shape [{num_classes}], got {got}")
        check_distributions("prior", prior[None])
        prior = prior.to(device=logits.device, dtype=dtype)
    log_probs = torch.log_softmax(logits.to(dtype), dim=1)
    log_mean_prediction = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    return (torch.xlogy(prior, prior) - prior * log_mean_prediction).sum()


def kl_div_loss(logits: Tensor, targets: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """``KL(y_i || softmax(logits_i)) = sum_j y_ij (log y_ij - log p_ij)`` with ``0 log 0 = 0``.

    Joint Optimization's classification term ``L_c`` (Tanaka et al., CVPR 2018). It equals the
    cross-entropy minus the target entropy ``H(y_i)``, which has no gradient w.r.t. the logits,
    so it is zero when the prediction matches the (soft) target.

    Args:
        logits: ``[B, C]``.
        targets: hard labels ``[B]`` or soft labels ``[B, C]``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    check_reduction(reduction)
    probs = target_probabilities(logits, targets)
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    return reduce((torch.xlogy(probs, probs) - probs * log_probs).sum(dim=1), reduction)
