"""Label-update rules of Joint Optimization (Tanaka et al., CVPR 2018), as pure functions.

All take ``labels [N, C]`` (current label distributions; one-hot rows for hard labels) and
``predictions [N, C]`` (the mean softmax output of the last K epochs for each sample).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

UpdateRule = Literal["soft", "hard", "hard_topk"]
UPDATE_RULES: tuple[str, ...] = get_args(UpdateRule)


def _check_pair(labels: Tensor, predictions: Tensor) -> None:
    if labels.ndim != 2 or labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions must both be [N, C], got {tuple(labels.shape)} and {tuple(predictions.shape)}"
        )


def soft_labels(predictions: Tensor) -> Tensor:
    """Eq. (9): the new label is the (averaged) prediction itself, renormalised: ``[N, C]``."""
    predictions = predictions.float()
    return predictions / predictions.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def hard_labels(predictions: Tensor) -> Tensor:
    """Eq. (8): the one-hot of the (averaged) prediction's arg max: ``[N, C]``."""
    return F.one_hot(predictions.argmax(1), predictions.shape[1]).to(torch.float32)


def disagreement(labels: Tensor, predictions: Tensor) -> tuple[Tensor, Tensor]:
    """``(gap [N], predicted [N])``: ``p_max - p_label`` where the prediction's arg max is not the label, else -1.

    Row-wise, so blocks of rows give the same gaps as the whole table.
    """
    _check_pair(labels, predictions)
    predictions = predictions.float()
    current = labels.argmax(1)
    top_p, top_class = predictions.max(1)
    gap = top_p - predictions.gather(1, current[:, None]).squeeze(1)
    return torch.where(top_class != current, gap, torch.full_like(gap, -1.0)), top_class


def most_disagreeing(gap: Tensor, index: Tensor, k: int) -> Tensor:
    """The at most ``k`` entries of ``index [M]`` with the largest ``gap [M] >= 0``; ties go to the lower index.

    Taking the ``k`` most disagreeing of each block of rows and then of their union gives the same set
    as of the whole table, which is how a sharded state selects them.
    """
    order = torch.argsort(index, stable=True)
    gap, index = gap[order], index[order]
    n_change = min(int(k), int((gap >= 0).sum()))
    # stable sort on the negated gap: larger gaps first, lower index first among equal gaps
    return index[torch.argsort(-gap, stable=True)[:n_change]]


def top_k_hard_labels(labels: Tensor, predictions: Tensor, k: int) -> Tensor:
    """Change only the ``k`` hard labels that disagree most with the prediction ("hard-label k").

    A sample disagrees when the arg max of its prediction is not its current label; its disagreement is
    ``p_max - p_label``. The ``k`` most disagreeing samples (fewer if fewer disagree) get the one-hot of
    the arg max; all other rows are returned unchanged. Ties are broken by the lower index.

    Returns:
        ``[N, C]`` float32 labels.
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gap, top_class = disagreement(labels, predictions)
    chosen = most_disagreeing(gap, torch.arange(gap.shape[0], device=gap.device), k)
    new = labels.to(torch.float32).clone()
    new[chosen] = F.one_hot(top_class[chosen], labels.shape[1]).to(torch.float32)
    return new


def update_labels(labels: Tensor, predictions: Tensor, rule: UpdateRule, top_k: int = 50) -> Tensor:
    """Apply ``rule`` (``"soft"``, ``"hard"`` or ``"hard_topk"``) and return the new ``[N, C]`` labels."""
    _check_pair(labels, predictions)
    if rule == "soft":
        return soft_labels(predictions)
    if rule == "hard":
        return hard_labels(predictions)
    if rule == "hard_topk":
        return top_k_hard_labels(labels, predictions, top_k)
    raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}")


def label_entropy(labels: Tensor) -> Tensor:
    """Mean entropy (nats) of the label distributions ``[N, C]``; 0 for one-hot labels."""
    p = labels.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
