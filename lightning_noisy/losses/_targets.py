"""Shared argument checks and target handling for the losses in :mod:`lightning_noisy.losses`.

Every loss takes ``logits`` of shape ``[B, C]`` and ``targets`` that are either hard class
indices (an integer tensor of shape ``[B]``) or soft labels (a floating tensor of shape
``[B, C]`` whose rows are probability distributions). :func:`as_probabilities` turns both
into a ``[B, C]`` probability matrix, so each loss is written once against soft targets and
a one-hot soft target gives exactly the hard-target result.

Cost of validation: checking tensor *contents* (label range, non-negative rows summing to
one, sample weights in ``[0, 1]``) needs the result on the host, which is one device
synchronisation on an accelerator. Each check is fused into a single boolean reduction, so
a call costs one sync per checked tensor; details for the error message are only computed
on the failure path.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]

_REDUCTIONS = ("mean", "sum", "none")

#: Rows of soft targets must sum to one within this tolerance.
SOFT_TARGET_ATOL = 1e-3


def check_real(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check that ``value`` is a real number (not a bool) in the given interval and return it as float.

    Raises:
        ValueError: naming ``name`` and the received value, e.g. ``"q must be in (0, 1], got 0.0"``.
    """
    interval = f"{'[' if low_inclusive else '('}{_fmt(low)}, {_fmt(high)}{']' if high_inclusive else ')'}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    number = float(value)
    above_low = number >= low if low_inclusive else number > low
    below_high = number <= high if high_inclusive else number < high
    if not (above_low and below_high):  # also rejects NaN
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_finite_non_negative(name: str, value: object) -> float:
    """Check that ``value`` is a finite real number ``>= 0`` (not a bool) and return it as float.

    Raises:
        ValueError: ``"{name} must be a finite number >= 0, got {value!r}"``.
    """
    return _check_finite_above_zero(name, value, allow_zero=True)


def check_finite_positive(name: str, value: object) -> float:
    """Check that ``value`` is a finite real number ``> 0`` (not a bool) and return it as float.

    Raises:
        ValueError: ``"{name} must be a finite number > 0, got {value!r}"``.
    """
    return _check_finite_above_zero(name, value, allow_zero=False)


def _check_finite_above_zero(name: str, value: object, allow_zero: bool) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def _fmt(bound: float) -> str:
    if math.isinf(bound):
        return "inf" if bound > 0 else "-inf"
    return f"{bound:g}"


def check_reduction(reduction: object) -> None:
    """Check that ``reduction`` is one of ``"mean"``, ``"sum"``, ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")


def reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    """Reduce a per-sample loss ``[B]`` to a scalar (``"mean"``, ``"sum"``) or keep it (``"none"``)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype losses compute in: float32 for half-precision inputs, float64 kept as is."""
    return torch.promote_types(tensor.dtype, torch.float32)


def check_logits(logits: object) -> None:
    """Check that ``logits`` is a floating tensor of shape ``[B, C]`` with ``C >= 1``."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, C], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")


def check_num_classes(num_classes: object) -> int:
    """Check that ``num_classes`` is a positive int and return it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_distributions(name: str, probs: Tensor, *, atol: float = SOFT_TARGET_ATOL) -> None:
    """Check that every row of the floating ``[B, C]`` tensor ``probs`` is a probability distribution.

    Rows must be finite, non-negative and sum to one within ``atol`` (summed in float32 or
    wider). One fused check, i.e. one device synchronisation.
    """
    values = probs.to(compute_dtype(probs))
    row_sums = values.sum(dim=1)
    bad = (values < 0).any(dim=1) | ~torch.isfinite(values).all(dim=1) | ((row_sums - 1).abs() > atol)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} rows must be probability distributions (finite, non-negative, summing to 1 within "
            f"{atol:g}); row {row} sums to {float(row_sums[row]):.6g} with minimum {float(values[row].min()):.6g}"
        )


def check_labels(name: str, labels: Tensor, num_classes: int) -> None:
    """Check that the integer tensor ``labels`` holds class indices in ``[0, num_classes)`` (one sync)."""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"{name} must be class indices in [0, {num_classes}), got {value}")


def as_probabilities(targets: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Convert hard labels ``[B]`` or soft labels ``[B, C]`` to a validated probability matrix ``[B, C]``.

    Args:
        targets: integer class indices of shape ``[B]`` in ``[0, num_classes)``, or a floating
            tensor of shape ``[B, num_classes]`` whose rows are distributions (non-negative,
            summing to 1 within ``1e-3``).
        num_classes: the number of classes ``C``.
        dtype: floating dtype of the result.

    Returns:
        A ``[B, C]`` tensor of ``dtype`` on ``targets.device``: the one-hot encoding of hard
        labels, or the soft labels cast to ``dtype``.

    Raises:
        ValueError: on a wrong type, shape, dtype, out-of-range label or a row that is not a
            distribution. Checking contents costs one device synchronisation.
    """
    num_classes = check_num_classes(num_classes)
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be integer labels or floating soft labels, got dtype {targets.dtype}")
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise ValueError(
                f"soft targets must have shape [B, {num_classes}], got shape {tuple(targets.shape)}"
                + (" (hard labels must be an integer tensor)" if targets.ndim == 1 else "")
            )
        check_distributions("targets", targets)
        return targets.to(dtype)
    if targets.ndim != 1:
        raise ValueError(f"hard targets must have shape [B], got shape {tuple(targets.shape)}")
    check_labels("targets", targets, num_classes)
    return one_hot_rows(targets, num_classes, dtype)


def one_hot_rows(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, C]`` one-hot rows of ``labels [B]`` known to be in ``[0, C)`` (checked, or an arg max), in ``dtype``.

    Unlike ``F.one_hot`` it does not check the range, which costs a host sync per call; a label out of range
    still fails, in the scatter.
    """
    rows = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return rows.scatter_(1, labels.long().unsqueeze(1), 1.0)


def target_probabilities(logits: Tensor, targets: Tensor) -> Tensor:
    """Validate ``logits`` ``[B, C]`` and ``targets`` against it; return targets as ``[B, C]`` probabilities.

    The result has the loss compute dtype (:func:`compute_dtype` of ``logits``).
    """
    check_logits(logits)
    if isinstance(targets, Tensor) and (targets.ndim < 1 or targets.shape[0] != logits.shape[0]):
        raise ValueError(
            f"targets must have the batch size of logits ({logits.shape[0]}), got shape {tuple(targets.shape)}"
        )
    probs = as_probabilities(targets, logits.shape[1], dtype=compute_dtype(logits))
    return probs.to(logits.device)


def soft_cross_entropy(log_probs: Tensor, target_probs: Tensor) -> Tensor:
    """Per-sample cross-entropy ``-sum_j y_j log p_j`` of ``[B, C]`` inputs, shape ``[B]``.

    ``log_probs`` must be finite (as :func:`torch.log_softmax` of finite logits is), so a zero
    target entry contributes exactly zero.
    """
    return -(target_probs * log_probs).sum(dim=1)
