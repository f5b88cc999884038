"""Loss correction with a noise transition matrix (Patrini et al., "Making Deep Neural Networks
Robust to Label Noise: a Loss Correction Approach", CVPR 2017).

``T[i, j] = P(noisy label = j | clean label = i)``: rows are clean classes and sum to one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_noisy.losses._targets import (
    Reduction,
    check_distributions,
    check_real,
    check_reduction,
    reduce,
    target_probabilities,
)

__all__ = [
    "backward_corrected_loss",
    "estimate_transition_matrix",
    "forward_corrected_loss",
    "validate_transition_matrix",
]

#: Tolerance on the row sums of a transition matrix.
TRANSITION_ATOL = 1e-4

# Zero entries of T are clamped to this before the log, so log T stays finite.
_LOG_EPS = 1e-12


def validate_transition_matrix(transition: Tensor, num_classes: int) -> None:
    """Check that ``transition`` is a ``[C, C]`` row-stochastic matrix.

    Entries must be finite and non-negative and each row must sum to one within ``1e-4``.
    Checking the contents costs one device synchronisation.

    Raises:
        ValueError: naming the problem, e.g. ``"transition row 2 sums to 0.9, expected 1"``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(transition, Tensor):
        raise ValueError(f"transition must be a torch.Tensor, got {type(transition).__name__}")
    if transition.shape != (num_classes, num_classes):
        raise ValueError(
            f"transition must have shape [{num_classes}, {num_classes}], got shape {tuple(transition.shape)}"
        )
    if not transition.is_floating_point():
        raise ValueError(f"transition must be a floating point tensor, got dtype {transition.dtype}")
    values = transition.detach().to(torch.promote_types(transition.dtype, torch.float32))
    row_sums = values.sum(dim=1)
    bad = (values < 0).any(dim=1) | ~torch.isfinite(values).all(dim=1) | ((row_sums - 1).abs() > TRANSITION_ATOL)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        if not bool(torch.isfinite(values[row]).all()) or bool((values[row] < 0).any()):
            raise ValueError(
                f"transition entries must be finite and non-negative; row {row} is {values[row].tolist()}"
            )
        raise ValueError(
            f"transition rows must sum to 1 (tol {TRANSITION_ATOL:g}); row {row} sums to {float(row_sums[row]):.6g}"
        )


def _check_forward_args(transition: Tensor, reduction: Reduction = "mean") -> None:
    num_classes = transition.shape[0] if isinstance(transition, Tensor) and transition.ndim >= 1 else 1
    validate_transition_matrix(transition, num_classes)
    check_reduction(reduction)


def _check_backward_args(transition: Tensor, reduction: Reduction = "mean", max_condition: float = 1e6) -> None:
    _check_forward_args(transition, reduction)
    check_real("max_condition", max_condition, low=1.0)


def forward_corrected_loss(
    logits: Tensor, targets: Tensor, transition: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """Forward-corrected cross-entropy (Patrini et al., CVPR 2017).

    ``loss_i = -sum_j y_ij log (p_i^T T)_j`` with ``p_i = softmax(logits_i)``: the model's clean
    posterior is pushed through the noise process and compared with the noisy target. In
    log space, ``log (p^T T)_j = logsumexp_k (log p_k + log T_kj)``, with zero entries of ``T``
    clamped to ``1e-12`` so the log stays finite.

    Args:
        logits: ``[B, C]``.
        targets: noisy hard labels ``[B]`` or soft labels ``[B, C]``.
        transition: ``[C, C]`` row-stochastic, ``T[i, j] = P(noisy = j | clean = i)``; moved to
            the device of ``logits``. Gradients flow into it if it requires grad.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
    """
    check_reduction(reduction)
    probs = target_probabilities(logits, targets)
    validate_transition_matrix(transition, logits.shape[1])
    log_t = transition.to(device=logits.device, dtype=probs.dtype).clamp_min(_LOG_EPS).log()
    log_probs = torch.log_softmax(logits.to(probs.dtype), dim=1)
    log_noisy = torch.logsumexp(log_probs[:, :, None] + log_t[None], dim=1)
    return reduce(-(probs * log_noisy).sum(dim=1), reduction)


def backward_corrected_loss(
    logits: Tensor,
    targets: Tensor,
    transition: Tensor,
    *,
    reduction: Reduction = "mean",
    max_condition: float = 1e6,
) -> Tensor:
    """Backward-corrected cross-entropy (Patrini et al., CVPR 2017).

    With ``ell_i = -log softmax(logits_i)`` the vector of per-class losses, the corrected loss is
    ``loss_i = sum_j y_ij (T^{-1} ell_i)_j``, i.e. ``(T^{-1} ell_i)`` picked at the noisy label.
    It is unbiased for the clean loss but can be negative for individual samples.

    ``T^{-1}`` is computed in float64 (float32 on MPS) on every call after a condition-number
    check (one SVD and one device synchronisation).

    Args:
        logits: ``[B, C]``.
        targets: noisy hard labels ``[B]`` or soft labels ``[B, C]``.
        transition: ``[C, C]`` row-stochastic, ``T[i, j] = P(noisy = j | clean = i)``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for ``[B]``.
        max_condition: largest accepted 2-norm condition number of ``T``.

    Raises:
        ValueError: if ``T`` is singular or its condition number exceeds ``max_condition``.
    """
    check_reduction(reduction)
    check_real("max_condition", max_condition, low=1.0)
    probs = target_probabilities(logits, targets)
    validate_transition_matrix(transition, logits.shape[1])
    inverse = _inverse_transition(transition.to(logits.device), max_condition).to(probs.dtype)
    losses = -torch.log_softmax(logits.to(probs.dtype), dim=1)
    corrected = losses @ inverse.T  # corrected[b, i] = sum_j Tinv[i, j] * ell[b, j]
    return reduce((probs * corrected).sum(dim=1), reduction)


def _inverse_transition(transition: Tensor, max_condition: float) -> Tensor:
    """Inverse of ``transition`` in float64 (float32 on MPS), after a condition-number check."""
    dtype = torch.float32 if transition.device.type == "mps" else torch.float64
    matrix = transition.to(dtype)
    condition = float(torch.linalg.cond(matrix.detach()))
    if not math.isfinite(condition) or condition > max_condition:
        raise ValueError(
            f"transition is singular or ill-conditioned for backward correction: condition number "
            f"{condition:.3g} exceeds max_condition={max_condition:g}"
        )
    return torch.linalg.inv(matrix)


def anchor_rank(num_samples: int, percentile: float = 97.0, filter_outlier: bool = True) -> int:
    """How many samples of a class column rank at or above its anchor: ``k``, the anchor is the ``k``-th largest.

    With ``filter_outlier`` the anchor is the sample at ascending position ``ceil(percentile * (N - 1) / 100)``
    (capped at ``N - 1``, numpy's ``method="higher"``), otherwise the maximum (``k = 1``).
    """
    if not filter_outlier:
        return 1
    position = min(math.ceil(percentile * (num_samples - 1) / 100.0), num_samples - 1)
    return num_samples - position


def anchor_candidates(values: Tensor, index: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest entries of each column of ``values [M, C]``, ordered by (value, index) descending.

    Ties in value go to the larger dataset index, so the order, and the anchor taken from it, is one
    total order that does not depend on how the rows are split between ranks: the candidates of a union
    of blocks are the candidates of the blocks' candidates.

    Args:
        values: ``[M, C]`` scores.
        index: ``[M]`` ascending dataset indices of the rows, or ``[M, C]`` an index per entry (any order).
        count: how many to keep per column (at most ``M`` are).

    Returns:
        ``(values [K, C], index [K, C])`` with ``K = min(count, M)``: row 0 holds each column's largest.
    """
    if index.ndim == 1:  # rows ascending by index: reversed, a stable sort by value breaks ties by index descending
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("a 1-D index of anchor candidates must be strictly ascending")
        values, index = values.flip(0), index.flip(0)
        order = values.argsort(dim=0, descending=True, stable=True)[:count]
        return values.gather(0, order), index[order]
    by_index = index.argsort(dim=0, descending=True, stable=True)
    values, index = values.gather(0, by_index), index.gather(0, by_index)
    order = values.argsort(dim=0, descending=True, stable=True)[:count]
    return values.gather(0, order), index.gather(0, order)


def estimate_transition_matrix(probs: Tensor, *, percentile: float = 97.0, filter_outlier: bool = True) -> Tensor:
    """Anchor-point estimate of the transition matrix (Patrini et al., CVPR 2017, Sec. 4).

    For each class ``i`` the anchor ``x_i`` is the sample whose noisy-class probability
    ``probs[:, i]`` is at the ``percentile``-th percentile of that column (taking the next
    higher sample, as numpy's ``method="higher"``; the paper's robust 97th-percentile variant) when
    ``filter_outlier`` is true, or its arg max otherwise; equal probabilities go to the later row (see
    :func:`anchor_candidates`). Row ``i`` of the estimate is ``probs[x_i]``, renormalised to sum to one.
    One sort per column, no loop over classes.

    Args:
        probs: ``[N, C]`` predicted noisy-label posteriors ``p(noisy | x)`` of a network trained on
            the noisy labels (rows are distributions; checked within 1e-3).
        percentile: in ``(0, 100]``; used when ``filter_outlier`` is true.
        filter_outlier: pick the percentile sample instead of the arg max.

    Returns:
        ``[C, C]`` row-stochastic estimate of ``T`` in the compute dtype (float32, or float64
        for float64 input) on the device of ``probs``.
    """
    check_real("percentile", percentile, low=0.0, high=100.0, low_inclusive=False)
    if not isinstance(filter_outlier, bool):
        raise ValueError(f"filter_outlier must be a bool, got {filter_outlier!r}")
    if not isinstance(probs, Tensor) or probs.ndim != 2 or not probs.is_floating_point() or probs.shape[0] < 1:
        got = f"shape {tuple(probs.shape)}, dtype {probs.dtype}" if isinstance(probs, Tensor) else repr(probs)
        raise ValueError(f"probs must be a floating tensor of shape [N, C] with N >= 1, got {got}")
    check_distributions("probs", probs)
    values = probs.detach().to(torch.promote_types(probs.dtype, torch.float32))
    count = anchor_rank(values.shape[0], percentile, filter_outlier)
    _, candidates = anchor_candidates(values, torch.arange(values.shape[0], device=values.device), count)
    rows = values[candidates[count - 1]]  # row i = p(noisy | anchor of class i)
    return rows / rows.sum(dim=1, keepdim=True)
