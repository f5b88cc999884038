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

    :meth:`add` takes each step's ``[B, C]`` logits and holds them (detached) until about ``window`` values
    are held; then they are counted in one pass, so the count costs a few ops per window, not per step.
    :meth:`conclude` counts what is held, sums the totals over the ranks (one small all-reduce) into an
    :class:`EpochVerdict` and starts the next epoch. The softmax entropy is only computed when asked for (the
    collapse check), so the non-finite count alone costs one ``isfinite`` per window.

    Args:
        window: logit values held before they are counted (``>= 1``; 1 counts every step at once).
    """

    def __init__(self, window: int = 1 << 18) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window
        self._rows = 0  # rows counted this epoch (known on the host: no sync)
        self._finite: Tensor | None = None  # finite rows, int64 on the logits' device
        self._entropy: Tensor | None = None  # summed normalised entropy of the finite rows, float64
        self._held: list[Tensor] = []  # detached logits not counted yet, all of one class count, dtype and device
        self._held_values = 0
        self._held_entropy = False  # whether the logits held are counted with their entropy

    def add(self, logits: Tensor, entropy: bool = True) -> None:
        """Count ``logits [B, C]`` (``C >= 2``; other shapes are not predictions and are ignored); with
        ``entropy=False`` the entropy total stays 0 (the verdict's ``mean_entropy`` is then meaningless)."""
        if logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] == 0:
            return
        logits = logits.detach()
        if self._held:
            first = self._held[0]
            if (entropy, logits.shape[1], logits.dtype, logits.device) != (
                self._held_entropy, first.shape[1], first.dtype, first.device
            ):
                self._count_held()
        self._held.append(logits)
        self._held_entropy = entropy
        self._held_values += logits.numel()
        if self._held_values >= self.window:
            self._count_held()

    def _count_held(self) -> None:
        """Add the logits held to the totals, in one pass."""
        if not self._held:
            return
        logits = self._held[0] if len(self._held) == 1 else torch.cat(self._held)
        entropy, self._held, self._held_values = self._held_entropy, [], 0
        finite = torch.isfinite(logits).all(dim=1)
        self._rows += logits.shape[0]
        self._finite = _accumulate(self._finite, finite.sum())
        if entropy:
            log_p = torch.log_softmax(torch.where(finite[:, None], logits, torch.zeros_like(logits)).float(), dim=1)
            normalised = -(log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])
            self._entropy = _accumulate(self._entropy, (normalised * finite).sum().double())

    def conclude(self, device: torch.device, distributed: bool) -> EpochVerdict:
        """The epoch's verdict over every rank (a collective when ``distributed``: call it on every rank)."""
        self._count_held()
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
