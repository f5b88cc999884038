"""Recovery accuracy: agreement of (corrected or given) labels with the clean labels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

__all__ = ["RecoveryAccuracy"]


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")


def _check_hard_labels(labels: Tensor, num_classes: int, name: str, validate_args: bool) -> None:
    """Check that ``labels`` is an integer tensor ``[N]`` with values in ``[0, num_classes)``."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must be an integer tensor of class indices, got dtype {labels.dtype}.")
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must have shape [N], got shape {tuple(labels.shape)}.")
    if validate_args and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must contain class indices in [0, {num_classes}), got values in [{low}, {high}]."
            )


def as_hard_labels(labels: Tensor, num_classes: int, name: str = "labels", validate_args: bool = True) -> Tensor:
    """Return hard labels ``[N]`` from hard labels ``[N]`` or soft labels / scores ``[N, C]`` (argmax).

    Args:
        labels: integer class indices ``[N]``, or floating soft labels, probabilities or logits ``[N, C]``.
        num_classes: number of classes ``C``.
        name: the argument's name, used in error messages.
        validate_args: check the value range (one device sync); shapes and dtypes are always checked.

    Raises:
        ValueError: on a wrong shape, dtype, class count, class index or non-finite soft label.
    """
    if labels.ndim == 2:
        if not labels.is_floating_point():
            raise ValueError(f"`{name}` of shape [N, C] must be floating point, got dtype {labels.dtype}.")
        if labels.shape[1] != num_classes:
            raise ValueError(
                f"`{name}` of shape [N, C] must have C == num_classes == {num_classes}, got shape {tuple(labels.shape)}."
            )
        if validate_args and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"`{name}` must contain only finite values, got NaN or inf.")
        return labels.argmax(dim=1)
    _check_hard_labels(labels, num_classes, name, validate_args)
    return labels


class RecoveryAccuracy(Metric):
    """Share of labels that equal the clean label.

    Used both for the *recovery accuracy* of corrected labels and for the *accuracy of the
    given noisy labels* (``1 - `` the actual noise rate). Soft labels are reduced by argmax,
    with ties broken towards the lower class index, as :func:`torch.argmax` does.

    Args:
        num_classes: number of classes ``C`` (>= 2).
        validate_args: check class ranges and finiteness in ``update`` (costs one device sync
            per call); shapes and dtypes are always checked.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = RecoveryAccuracy(num_classes=3)
        >>> metric.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
        >>> metric.compute()
        tensor(0.7500)

    ``compute()`` returns NaN when no sample was seen.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, validate_args: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        if not isinstance(validate_args, bool):
            raise ValueError(f"`validate_args` must be a bool, got {validate_args!r}.")
        self.num_classes = num_classes
        self.validate_args = validate_args
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, labels: Tensor, clean_labels: Tensor) -> None:
        """Accumulate a batch.

        Args:
            labels: hard labels ``[N]`` (integer) or soft labels / probabilities ``[N, C]`` (float).
            clean_labels: clean hard labels ``[N]`` (integer).
        """
        hard = as_hard_labels(labels, self.num_classes, "labels", self.validate_args)
        _check_hard_labels(clean_labels, self.num_classes, "clean_labels", self.validate_args)
        if hard.shape[0] != clean_labels.shape[0]:
            raise ValueError(
                f"`labels` and `clean_labels` must have the same length N, got {hard.shape[0]} and {clean_labels.shape[0]}."
            )
        self.correct += (hard == clean_labels.to(hard.device)).sum()
        self.total += clean_labels.shape[0]

    @override
    def compute(self) -> Tensor:
        """Return the share of labels equal to the clean label (a float scalar, NaN without samples)."""
        return self.correct.float() / self.total.float()
