"""Map-style datasets that carry noisy labels and sample indices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_noisy.data.noise import _as_labels, _check_label_range, _check_num_classes, _to_label_tensor

__all__ = ["NoisyLabelDataset", "TensorPairDataset"]

LabelsLike = Tensor | np.ndarray


def _check_index(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} samples")
    return index % length


class NoisyLabelDataset(Dataset):
    """Wrap a map-style dataset of ``(input, target)`` to give ``(input, noisy_target, index)``.

    The wrapped dataset's own target is ignored; ``noisy_target`` and ``index`` are python ints,
    so the default collate makes ``[B]`` int64 tensors of them.

    Args:
        dataset: map-style dataset of ``(input, target)`` with ``N`` samples.
        noisy_labels: ``[N]`` integer labels handed out as targets.
        clean_labels: ``[N]`` clean labels when known.
        num_classes: ``C``; inferred as ``max(label) + 1`` when ``None``.
        return_index: give ``(input, noisy_target, index)``; ``False`` gives ``(input, noisy_target)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        noisy_labels: LabelsLike,
        clean_labels: LabelsLike | None = None,
        num_classes: int | None = None,
        return_index: bool = True,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"dataset must be a map-style dataset with __len__, got {type(dataset).__name__}")
        noisy = _to_label_tensor(noisy_labels, "noisy_labels")
        clean = None if clean_labels is None else _to_label_tensor(clean_labels, "clean_labels")
        for name, labels in (("noisy_labels", noisy), ("clean_labels", clean)):
            if labels is not None and labels.numel() != len(dataset):
                raise ValueError(f"{name} must have one label per sample ({len(dataset)}), got {labels.numel()}")
        num_classes = self._resolve_num_classes(noisy, clean, num_classes)
        noisy = _as_labels(noisy, num_classes, "noisy_labels")
        clean = None if clean is None else _as_labels(clean, num_classes, "clean_labels")
        self.dataset = dataset
        self.noisy_labels = noisy
        self.clean_labels = clean
        self.num_classes = num_classes
        self.return_index = bool(return_index)
        self._targets = noisy.tolist()  # python ints for fast per-sample access

    @staticmethod
    def _resolve_num_classes(noisy: Tensor, clean: Tensor | None, num_classes: int | None) -> int:
        if num_classes is not None:
            return _check_num_classes(num_classes)
        for name, labels in (("noisy_labels", noisy), ("clean_labels", clean)):
            if labels is not None:
                _check_label_range(labels, None, name)  # negative labels first: they say more than a bad count
        highest = max(int(labels.max()) for labels in (noisy, clean) if labels is not None)
        if highest < 1:
            raise ValueError(
                f"num_classes (inferred as max label + 1) must be >= 2, got {highest + 1} because every label is"
                f" {highest}: pass num_classes"
            )
        return highest + 1

    @property
    def has_clean_labels(self) -> bool:
        """Whether the clean labels are known."""
        return self.clean_labels is not None

    @property
    def is_noisy(self) -> Tensor | None:
        """``[N]`` bool mask of samples whose noisy label differs from the clean one; ``None`` when unknown."""
        return None if self.clean_labels is None else self.noisy_labels != self.clean_labels

    def __len__(self) -> int:
        return len(self._targets)

    @override
    def __getitem__(self, index: int) -> tuple[Any, int, int] | tuple[Any, int]:
        index = _check_index(int(index), len(self))
        sample = self.dataset[index][0]
        if self.return_index:
            return sample, self._targets[index], index
        return sample, self._targets[index]


class TensorPairDataset(Dataset):
    """Map-style dataset of ``(x[i], int(y[i]))`` from in-memory tensors.

    Args:
        x: ``[N, ...]`` inputs.
        y: ``[N]`` integer labels.
        transform: optional callable applied to each input.
    """

    def __init__(self, x: Tensor, y: LabelsLike, transform: Callable[[Tensor], Any] | None = None) -> None:
        if not isinstance(x, Tensor) or x.ndim == 0:
            raise ValueError(f"x must be a tensor with a sample dimension, got {type(x).__name__}")
        y = torch.as_tensor(y) if isinstance(y, np.ndarray) else y
        if not isinstance(y, Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must be a 1-D integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"y must have one label per row of x ({x.shape[0]}), got {y.shape[0]}")
        self.x = x
        self.y = y.to(torch.int64)
        self.transform = transform
        self._targets = self.y.tolist()

    @property
    def targets(self) -> Tensor:
        """``[N]`` int64 labels."""
        return self.y

    def __len__(self) -> int:
        return len(self._targets)

    @override
    def __getitem__(self, index: int) -> tuple[Any, int]:
        index = _check_index(int(index), len(self))
        sample = self.x[index]
        return (sample if self.transform is None else self.transform(sample)), self._targets[index]
