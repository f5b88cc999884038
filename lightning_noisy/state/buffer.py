"""Per-sample buffers indexed by dataset index, with visit counts and checkpointable state."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor


def _check_index(index: Tensor, num_samples: int) -> Tensor:
    if index.ndim != 1 or index.is_floating_point():
        raise ValueError(f"index must be a 1-D integer tensor, got dtype {index.dtype} and shape {tuple(index.shape)}")
    index = index.to(torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
        raise ValueError(
            f"index values must be in [0, {num_samples}), got min {int(index.min())} and max {int(index.max())}"
        )
    return index


def _check_state(state: dict[str, Any], num_samples: int, value_shape: tuple[int, ...], name: str) -> None:
    got = (int(state.get("num_samples", -1)), tuple(state.get("value_shape", ())))
    if got != (num_samples, value_shape):
        raise ValueError(
            f"cannot load {name} state with num_samples={got[0]} and value_shape={got[1]} into a buffer with "
            f"num_samples={num_samples} and value_shape={value_shape}: the checkpoint is from another data set"
        )


class SampleBuffer:
    """One value per training sample: ``values [N, *S]`` and ``visits [N]``.

    Args:
        num_samples: ``N``, the size of the training set.
        value_shape: ``S``: ``()`` for a scalar per sample, ``(C,)`` for a class vector.
        dtype: storage dtype (choose ``float16``/``bfloat16`` to halve the memory of large ``N x C`` buffers).
        fill: initial value of every sample, a scalar or a ``[N, *S]`` tensor.
        device: storage device; CPU by default so the buffer never competes with the model for GPU memory.
    """

    def __init__(
        self,
        num_samples: int,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        fill: float | Tensor = 0.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.value_shape = tuple(int(d) for d in value_shape)
        shape = (self.num_samples, *self.value_shape)
        if isinstance(fill, Tensor):
            if tuple(fill.shape) != shape:
                raise ValueError(f"fill must be a scalar or a tensor of shape {shape}, got {tuple(fill.shape)}")
            self.values = fill.detach().to(device=device, dtype=dtype).clone()
        else:
            self.values = torch.full(shape, float(fill), dtype=dtype, device=device)
        self.visits = torch.zeros(self.num_samples, dtype=torch.long, device=device)

    def write(self, index: Tensor, values: Tensor, mode: Literal["replace", "add"] = "replace") -> None:
        """Write ``values [U, *S]`` for the unique samples ``index [U]`` and count one visit each.

        Everything is checked before anything is written, so a failed call leaves the buffer unchanged.
        """
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
        index = _check_index(index, self.num_samples)
        if tuple(values.shape) != (index.shape[0], *self.value_shape):
            raise ValueError(
                f"values must have shape {(index.shape[0], *self.value_shape)}, got {tuple(values.shape)}"
            )
        if index.unique().numel() != index.numel():
            raise ValueError("index must not repeat a sample; reduce duplicates first (see reduce_by_index)")
        index = index.to(self.values.device)
        values = values.to(device=self.values.device, dtype=self.values.dtype)
        if mode == "replace":
            self.values[index] = values
        else:
            self.values[index] += values
        self.visits[index] += 1

    @property
    def visited(self) -> Tensor:
        """``[N]`` bool: samples written at least once."""
        return self.visits > 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "value_shape": self.value_shape,
            "values": self.values.clone(),
            "visits": self.visits.clone(),
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` is of another ``N`` or shape; changes nothing."""
        _check_state(state, self.num_samples, self.value_shape, "SampleBuffer")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a state of another ``N`` or shape is rejected with nothing changed."""
        self.check_state_dict(state)
        self.values.copy_(state["values"])
        self.visits.copy_(state["visits"])


class SampleHistory:
    """The last ``window`` values of every sample: a ring ``[window, N, *S]`` advanced per sample.

    Each sample has its own write position (its visit count modulo ``window``), so a sample missed in an
    epoch (``drop_last``) keeps its older entries and its average stays over values it really had.

    Args:
        num_samples: ``N``.
        window: ``K``, how many past values are kept per sample.
        value_shape: ``S`` of one value.
        dtype: storage dtype (the history is ``K x N x C`` values: ``float16`` halves it).
        device: storage device, CPU by default.
    """

    def __init__(
        self,
        num_samples: int,
        window: int,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.window = int(window)
        self.value_shape = tuple(int(d) for d in value_shape)
        self.entries = torch.zeros((self.window, self.num_samples, *self.value_shape), dtype=dtype, device=device)
        self.visits = torch.zeros(self.num_samples, dtype=torch.long, device=device)

    def append(self, index: Tensor, values: Tensor) -> None:
        """Append ``values [U, *S]`` for the unique samples ``index [U]``; all-or-nothing."""
        index = _check_index(index, self.num_samples)
        if tuple(values.shape) != (index.shape[0], *self.value_shape):
            raise ValueError(
                f"values must have shape {(index.shape[0], *self.value_shape)}, got {tuple(values.shape)}"
            )
        if index.unique().numel() != index.numel():
            raise ValueError("index must not repeat a sample; reduce duplicates first (see reduce_by_index)")
        index = index.to(self.entries.device)
        slot = self.visits[index] % self.window
        self.entries[slot, index] = values.to(device=self.entries.device, dtype=self.entries.dtype)
        self.visits[index] += 1

    def mean(self, index: Tensor | None = None) -> Tensor:
        """Mean over the stored values of each sample (up to ``window``): ``[N, *S]`` (or ``[U, *S]``) in float32.

        A sample never visited gets zeros; check :attr:`visits` to tell.
        """
        entries = self.entries if index is None else self.entries[:, _check_index(index, self.num_samples)]
        visits = self.visits if index is None else self.visits[index]
        count = visits.clamp(max=self.window, min=1).to(torch.float32)
        total = entries.to(torch.float32).sum(0)  # slots never written are zero
        return total / count.view(-1, *([1] * len(self.value_shape)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "value_shape": self.value_shape,
            "window": self.window,
            "entries": self.entries.clone(),
            "visits": self.visits.clone(),
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` is of another ``N``, shape or window; changes nothing."""
        _check_state(state, self.num_samples, self.value_shape, "SampleHistory")
        if int(state["window"]) != self.window:
            raise ValueError(f"cannot load a history with window={state['window']} into one with window={self.window}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; another ``N``, shape or window is rejected with nothing changed."""
        self.check_state_dict(state)
        self.entries.copy_(state["entries"])
        self.visits.copy_(state["visits"])
