"""Quality of a selected clean set (or of detected mislabelled samples) against the true noise mask."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

__all__ = ["CleanSelectionMetrics", "selection_scores"]

_POSITIVES = ("clean", "noisy")
_KEYS = ("precision", "recall", "f1", "auroc")


def _rank_scores(scores: Tensor, descending: bool) -> Tensor:
    """Map ``scores`` ``[N]`` to dense ranks in ``[0, 1]`` (float64), ties kept equal.

    The map is strictly monotone (reversed with ``descending``), so AUROC is unchanged, and its
    range is ``[0, 1]``, so torchmetrics never applies a sigmoid (which saturates large scores
    into ties and would change the AUROC).
    """
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(int(rank.max()) if rank.numel() else 0, 1)
    rank = rank.to(torch.float64) / top
    return 1.0 - rank if descending else rank


def selection_scores(
    scores: Tensor,
    selected: Tensor,
    is_clean: Tensor,
    positive: Literal["clean", "noisy"] = "clean",
) -> dict[str, Tensor]:
    """Precision, recall, F1 and AUROC of a selection, for the positive class ``positive``.

    Args:
        scores: clean scores ``[N]`` (higher = more likely clean), any finite real values.
        selected: bool mask ``[N]`` of samples selected as clean.
        is_clean: true bool mask ``[N]`` (True = the given label is correct).
        positive: ``"clean"`` evaluates the selected clean set; ``"noisy"`` evaluates the
            complement as a detection of mislabelled samples (scores reversed for the AUROC).

    Returns:
        ``{"precision", "recall", "f1", "auroc"}`` as float scalars. Precision is 0 when nothing is
        predicted positive, recall and F1 are 0 when no sample is positive (never a division
        warning). AUROC is NaN, with a :class:`UserWarning`, when the targets hold only one class.

    Raises:
        ValueError: on a bad ``positive``, dtype, shape or an empty input.
    """
    if positive not in _POSITIVES:
        raise ValueError(f"`positive` must be one of {_POSITIVES}, got {positive!r}.")
    if selected.dtype != torch.bool or is_clean.dtype != torch.bool:
        raise ValueError(
            f"`selected` and `is_clean` must be bool tensors, got dtypes {selected.dtype} and {is_clean.dtype}."
        )
    if not (scores.ndim == selected.ndim == is_clean.ndim == 1) or not (
        scores.shape == selected.shape == is_clean.shape
    ):
        raise ValueError(
            "`scores`, `selected` and `is_clean` must all have the same shape [N], got shapes "
            f"{tuple(scores.shape)}, {tuple(selected.shape)} and {tuple(is_clean.shape)}."
        )
    if scores.numel() == 0:
        raise ValueError("`scores` must hold at least one sample, got N = 0.")
    if positive == "clean":
        preds, target = selected, is_clean
    else:
        preds, target = ~selected, ~is_clean
    preds_i, target_i = preds.long(), target.long()
    out = {
        "precision": binary_precision(preds_i, target_i, validate_args=False),
        "recall": binary_recall(preds_i, target_i, validate_args=False),
        "f1": binary_f1_score(preds_i, target_i, validate_args=False),
    }
    n_pos = int(target_i.sum())
    if n_pos == 0 or n_pos == target_i.numel():
        warnings.warn(
            f"AUROC is undefined when every sample is {'positive' if n_pos else 'negative'} "
            f"(positive={positive!r}, {target_i.numel()} samples); returning NaN.",
            UserWarning,
            stacklevel=2,
        )
        out["auroc"] = torch.tensor(math.nan, device=scores.device)
    else:
        ranked = _rank_scores(scores, descending=positive == "noisy")
        out["auroc"] = binary_auroc(ranked, target_i, validate_args=False).float()
    return {k: v.float() for k, v in out.items()}


class CleanSelectionMetrics(Metric):
    """Precision, recall, F1 and AUROC of a selected clean set against the true noise mask.

    ``update(scores_or_selected, is_clean)`` takes either a bool mask of samples selected as
    clean, or float clean scores (higher = more likely clean, e.g. DivideMix's GMM clean
    probability, AUM, negative loss) from which the selection is ``scores > threshold``.
    Scores need not lie in ``[0, 1]``; AUROC depends only on their order.

    With a bool mask only, AUROC is computed from the mask itself (scores 0/1), i.e. it equals
    the balanced accuracy ``(TPR + TNR) / 2`` of the selection.

    Args:
        threshold: scores strictly above it are selected as clean (unused for bool masks).
        positive: ``"clean"`` (default) scores the selected clean set; ``"noisy"`` scores the
            unselected samples as detected mislabelled ones, as detection benchmarks report.
        validate_args: check that float scores are finite in ``update`` (one device sync per
            call); shapes and dtypes are always checked.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    ``compute()`` returns ``{"precision", "recall", "f1", "auroc"}`` (float scalars); see
    :func:`selection_scores` for the edge cases. Without any sample all four are NaN, with a
    :class:`UserWarning`. The states are the concatenated per-sample scores, selections and
    targets (``dist_reduce_fx="cat"``), so memory grows with the number of samples seen.

    Example:
        >>> metric = CleanSelectionMetrics(threshold=0.5)
        >>> metric.update(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, False, True, False]))
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'auroc': 0.75}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    selected: list[Tensor]
    is_clean: list[Tensor]

    def __init__(
        self,
        threshold: float = 0.5,
        positive: Literal["clean", "noisy"] = "clean",
        validate_args: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite float, got {threshold!r}.")
        if positive not in _POSITIVES:
            raise ValueError(f"`positive` must be one of {_POSITIVES}, got {positive!r}.")
        if not isinstance(validate_args, bool):
            raise ValueError(f"`validate_args` must be a bool, got {validate_args!r}.")
        self.threshold = float(threshold)
        self.positive = positive
        self.validate_args = validate_args
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("selected", default=[], dist_reduce_fx="cat")
        self.add_state("is_clean", default=[], dist_reduce_fx="cat")

    @override
    def update(self, scores_or_selected: Tensor, is_clean: Tensor) -> None:
        """Accumulate a batch.

        Args:
            scores_or_selected: bool mask ``[N]`` of samples selected as clean, or float clean
                scores ``[N]`` (higher = more likely clean).
            is_clean: true bool mask ``[N]`` (True = the given label is correct).
        """
        if scores_or_selected.ndim != 1:
            raise ValueError(
                f"`scores_or_selected` must have shape [N], got shape {tuple(scores_or_selected.shape)}."
            )
        if is_clean.dtype != torch.bool or is_clean.ndim != 1:
            raise ValueError(
                f"`is_clean` must be a bool tensor of shape [N], got dtype {is_clean.dtype} "
                f"and shape {tuple(is_clean.shape)}."
            )
        if scores_or_selected.shape[0] != is_clean.shape[0]:
            raise ValueError(
                "`scores_or_selected` and `is_clean` must have the same length N, got "
                f"{scores_or_selected.shape[0]} and {is_clean.shape[0]}."
            )
        if scores_or_selected.dtype == torch.bool:
            selected = scores_or_selected
            scores = selected.float()
        elif scores_or_selected.is_floating_point():
            scores = scores_or_selected
            if self.validate_args and not bool(torch.isfinite(scores).all()):
                raise ValueError("`scores_or_selected` must contain only finite scores, got NaN or inf.")
            selected = scores > self.threshold
        else:
            raise ValueError(
                "`scores_or_selected` must be a bool mask or a float tensor of scores, "
                f"got dtype {scores_or_selected.dtype}."
            )
        self.scores.append(scores.detach())
        self.selected.append(selected)
        self.is_clean.append(is_clean.to(selected.device))

    @override
    def compute(self) -> dict[str, Tensor]:
        """Return ``{"precision", "recall", "f1", "auroc"}`` over all samples seen (on all ranks)."""
        # After a DDP sync the "cat" states are tensors; before any update they are empty lists.
        is_clean = dim_zero_cat(self.is_clean) if len(self.is_clean) else torch.zeros(0, dtype=torch.bool)
        if is_clean.numel() == 0:
            warnings.warn("CleanSelectionMetrics has seen no sample; returning NaN.", UserWarning, stacklevel=2)
            return {key: torch.tensor(math.nan, device=self.device) for key in _KEYS}
        return selection_scores(
            dim_zero_cat(self.scores), dim_zero_cat(self.selected), is_clean, positive=self.positive
        )
