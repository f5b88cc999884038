"""Is this epoch's network fit to write per-sample state? Non-finite and collapsed epochs are told apart here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class EpochVerdict:
    """One epoch's training logits, summed over every rank.

    Attributes:
        rows: logit rows seen.
        non_finite_rows: rows holding a NaN or an infinity.
        mean_entropy: mean softmax entropy of the finite rows, as a share of ``ln C`` (1: uniform).
    """

    rows: int
    non_finite_rows: int
    mean_entropy: float

    @property
    def all_non_finite(self) -> bool:
        return self.rows > 0 and self.non_finite_rows == self.rows

    def near_uniform(self, collapse_entropy: float) -> bool:
        """Whether the finite predictions are near uniform: mean entropy at least ``collapse_entropy`` of ``ln C``."""
        return self.rows > self.non_finite_rows and self.mean_entropy >= collapse_entropy


class PredictionHealth:
    """Running totals of one epoch's training logits on this rank, with no host sync per step.

    :meth:`add` takes each step's ``[B, C]`` logits; :meth:`conclude` sums the totals over the ranks (one
    small all-reduce) into an :class:`EpochVerdict` and starts the next epoch. The softmax entropy is only
    computed when asked for (the collapse check), so the non-finite count alone costs one ``isfinite``.
    """

    def __init__(self) -> None:
        self._rows = 0  # rows counted this epoch (known on the host: no sync)
        self._finite: Tensor | None = None  # finite rows, int64 on the logits' device
        self._entropy: Tensor | None = None  # summed normalised entropy of the finite rows, float64

    def add(self, logits: Tensor, entropy: bool = True) -> None:
        """Count ``logits [B, C]`` (``C >= 2``; other shapes are not predictions and are ignored); with
        ``entropy=False`` the entropy total stays 0 (the verdict's ``mean_entropy`` is then meaningless)."""
        if logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] == 0:
            return
        logits = logits.detach()
        finite = torch.isfinite(logits).all(dim=1)
        self._rows += logits.shape[0]
        self._finite = _accumulate(self._finite, finite.sum())
        if entropy:
            log_p = torch.log_softmax(torch.where(finite[:, None], logits, torch.zeros_like(logits)).float(), dim=1)
            normalised = -(log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])
            self._entropy = _accumulate(self._entropy, (normalised * finite).sum().double())

    def conclude(self, device: torch.device, distributed: bool) -> EpochVerdict:
        """The epoch's verdict over every rank (a collective when ``distributed``: call it on every rank)."""
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        totals[0] = self._rows
        if self._finite is not None:
            totals[1] = self._rows - self._finite.to(device)
        if self._entropy is not None:
            totals[2] = self._entropy.to(device)
        self._rows, self._finite, self._entropy = 0, None, None
        if distributed:
            torch.distributed.all_reduce(totals)
        rows, non_finite, entropy = (float(v) for v in totals.cpu())
        finite = rows - non_finite
        return EpochVerdict(int(rows), int(non_finite), entropy / finite if finite > 0 else math.nan)


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + value`` on ``value``'s device (``value`` when nothing was counted yet)."""
    return value if total is None else total.to(value.device) + value


__all__ = ["EpochVerdict", "PredictionHealth"]
