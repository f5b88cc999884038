"""When does a network start to memorise the noisy labels? Read from how its predictions change.

While a network fits the patterns most samples share, the predicted class of fewer and fewer training samples
changes from one epoch to the next. Once it starts fitting the mislabelled samples one by one, their
predictions flip towards the given (wrong) labels and the count rises again: the "label wave" of Yuan et al.,
"Early Stopping Against Label Noise Without Validation Data", ICLR 2024. They stop training at the first
minimum of these prediction changes (smoothed over a few epochs), where test accuracy peaks, with no clean
validation data. :class:`MemorisationOnset` finds that minimum; a callback starts its work there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def prediction_changes(previous: Tensor, current: Tensor) -> tuple[int, int]:
    """``(changed, compared)``: how many samples' predicted class differs from the previous epoch's.

    Args:
        previous: ``[R]`` int previous predicted class per sample, ``-1`` where there is none yet.
        current: ``[R]`` int predicted class this epoch.
    """
    if previous.shape != current.shape:
        raise ValueError(f"previous and current must have the same shape, got {tuple(previous.shape)} and {tuple(current.shape)}")
    compared = previous >= 0
    return int((compared & (previous != current.to(previous.dtype))).sum()), int(compared.sum())


class MemorisationOnset:
    """Finds the first minimum of the per-epoch prediction changes, smoothed by a moving average.

    Feed it each epoch's share of training samples whose predicted class changed (:meth:`observe`). The onset is
    the epoch at which the ``window``-epoch moving average has not fallen below its minimum so far for
    ``patience`` epochs in a row; the minimum itself was ``patience`` epochs earlier. It is found once and kept.

    Args:
        window: epochs averaged (Label Wave smooths its curve with a moving average).
        patience: epochs without a new minimum before the onset is declared.
        min_epochs: observations needed before any onset (the first epochs' changes are large and falling).
    """

    def __init__(self, window: int = 3, patience: int = 3, min_epochs: int = 5) -> None:
        for name, value, least in (("window", window, 1), ("patience", patience, 1), ("min_epochs", min_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.window = window
        self.patience = patience
        self.min_epochs = min_epochs
        self.changes: list[float] = []
        self.epochs: list[int] = []
        self.minimum = math.inf
        self.minimum_epoch: int | None = None
        self.onset_epoch: int | None = None

    @property
    def found(self) -> bool:
        """Whether the onset has been found."""
        return self.onset_epoch is not None

    def smoothed(self) -> float:
        """The moving average of the last ``window`` observations (``nan`` before any)."""
        recent = self.changes[-self.window :]
        return sum(recent) / len(recent) if recent else math.nan

    def observe(self, epoch: int, changes: float) -> bool:
        """Record ``changes`` (a share in ``[0, 1]``) for ``epoch``; ``True`` at the epoch the onset is found."""
        if not 0.0 <= float(changes) <= 1.0:
            raise ValueError(f"changes must be a share in [0, 1], got {changes!r}")
        if self.found:
            return False
        self.changes.append(float(changes))
        self.epochs.append(int(epoch))
        if len(self.changes) < self.window:
            return False
        average = self.smoothed()
        if average < self.minimum:
            self.minimum, self.minimum_epoch = average, int(epoch)
            return False
        assert self.minimum_epoch is not None
        if len(self.changes) >= self.min_epochs and int(epoch) - self.minimum_epoch >= self.patience:
            self.onset_epoch = int(epoch)
            return True
        return False

    def reason(self) -> str:
        """Why the onset was declared, in words (for the log)."""
        if self.onset_epoch is None:
            return "the onset has not been found"
        return (
            f"the share of training samples whose predicted class changed from one epoch to the next "
            f"(averaged over {self.window} epochs) reached its minimum {self.minimum:.4f} at epoch "
            f"{self.minimum_epoch} and has not fallen below it for {self.patience} epochs"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"changes": list(self.changes), "epochs": list(self.epochs), "minimum": self.minimum,
                "minimum_epoch": self.minimum_epoch, "onset_epoch": self.onset_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.changes = [float(v) for v in state["changes"]]
        self.epochs = [int(v) for v in state["epochs"]]
        self.minimum = float(state["minimum"])
        self.minimum_epoch = None if state["minimum_epoch"] is None else int(state["minimum_epoch"])
        self.onset_epoch = None if state["onset_epoch"] is None else int(state["onset_epoch"])


__all__ = ["MemorisationOnset", "prediction_changes"]
