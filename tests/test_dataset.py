"""Tests of NoisyLabelDataset and TensorPairDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_noisy.data import NoisyLabelDataset, TensorPairDataset


@pytest.fixture
def base() -> TensorPairDataset:
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    return TensorPairDataset(x, torch.tensor([0, 1, 2, 0, 1, 2]))


def test_tensor_pair_dataset(base: TensorPairDataset) -> None:
    assert len(base) == 6
    x, y = base[4]
    assert torch.equal(x, torch.tensor([8.0, 9.0])) and y == 1 and type(y) is int
    assert base.targets.dtype == torch.int64
    doubled = TensorPairDataset(base.x, np.array([0, 1, 2, 0, 1, 2]), transform=lambda t: 2 * t)
    assert torch.equal(doubled[1][0], torch.tensor([4.0, 6.0]))


def test_noisy_dataset_returns_noisy_target_and_index(base: TensorPairDataset) -> None:
    noisy = torch.tensor([0, 2, 2, 1, 1, 0])
    data = NoisyLabelDataset(base, noisy, clean_labels=base.targets, num_classes=3)
    x, y, index = data[3]
    assert torch.equal(x, torch.tensor([6.0, 7.0])) and y == 1 and index == 3
    assert type(y) is int and type(index) is int
    assert data[-1][2] == 5  # negative indices are normalised
    assert data.has_clean_labels and data.num_classes == 3
    assert data.is_noisy.tolist() == [False, True, False, True, False, True]


def test_default_collate_gives_int64_index(base: TensorPairDataset) -> None:
    data = NoisyLabelDataset(base, torch.tensor([0, 2, 2, 1, 1, 0]))
    x, y, index = next(iter(DataLoader(data, batch_size=6)))
    assert x.shape == (6, 2)
    assert y.dtype == torch.int64 and index.dtype == torch.int64
    assert index.tolist() == list(range(6)) and y.tolist() == [0, 2, 2, 1, 1, 0]


def test_unknown_clean_labels_and_inferred_classes(base: TensorPairDataset) -> None:
    data = NoisyLabelDataset(base, np.array([0, 3, 2, 1, 1, 0]))
    assert data.clean_labels is None and data.is_noisy is None and not data.has_clean_labels
    assert data.num_classes == 4  # max label + 1


def test_without_index(base: TensorPairDataset) -> None:
    data = NoisyLabelDataset(base, torch.zeros(6, dtype=torch.int64), num_classes=2, return_index=False)
    assert len(data[2]) == 2 and data[2][1] == 0


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"noisy_labels": torch.zeros(5, dtype=torch.int64), "num_classes": 3}, ["noisy_labels", "(6)", "got 5"]),
        (
            {"noisy_labels": torch.zeros(6, dtype=torch.int64), "clean_labels": torch.zeros(7, dtype=torch.int64)},
            ["clean_labels", "got 7"],
        ),
        ({"noisy_labels": torch.tensor([0, 1, 2, 3, 0, 0]), "num_classes": 3}, ["noisy_labels", "[0, 3]"]),
        (
            {"noisy_labels": torch.zeros(6, dtype=torch.int64), "clean_labels": torch.full((6,), 5), "num_classes": 3},
            ["clean_labels", "[5, 5]"],
        ),
        ({"noisy_labels": torch.zeros(6, dtype=torch.int64), "num_classes": 1}, ["num_classes", "1"]),
        ({"noisy_labels": torch.zeros(6)}, ["noisy_labels", "torch.float32"]),
    ],
)
def test_noisy_dataset_bad_input(base: TensorPairDataset, kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        NoisyLabelDataset(base, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (  # issue 16: this said "num_classes (inferred as max label + 1) must be an int >= 2, got 0"
            {"noisy_labels": torch.tensor([-1, -1, -1, -1, -1, -1])},
            r"noisy_labels must be in \[0, num_classes\), got values in \[-1, -1\]; 6 of 6 are negative,"
            r" the first at index 0 \(value -1\)",
        ),
        (
            {"noisy_labels": torch.tensor([0, 1, 2, -4, 1, -1])},
            r"noisy_labels must be in \[0, num_classes\), got values in \[-4, 2\]; 2 of 6 are negative,"
            r" the first at index 3 \(value -4\)",
        ),
        (
            {"noisy_labels": torch.tensor([0, 1, 2, 0, 1, 2]), "clean_labels": torch.tensor([0, 1, 2, 0, -2, 2])},
            r"clean_labels must be in \[0, num_classes\), got values in \[-2, 2\]; 1 of 6 are negative,"
            r" the first at index 4 \(value -2\)",
        ),
        (
            {"noisy_labels": torch.tensor([0, -1, 2, 3, 0, 7]), "num_classes": 3},
            r"noisy_labels must be in \[0, 3\) for num_classes=3, got values in \[-1, 7\]; 3 of 6 are outside it,"
            r" the first at index 1 \(value -1\)",
        ),
        (
            {"noisy_labels": torch.zeros(6, dtype=torch.int64)},
            r"num_classes \(inferred as max label \+ 1\) must be >= 2, got 1 because every label is 0:"
            r" pass num_classes",
        ),
    ],
)
def test_labels_outside_the_classes_are_named(base: TensorPairDataset, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoisyLabelDataset(base, **kwargs)


def test_tensor_pair_bad_input() -> None:
    with pytest.raises(ValueError, match=r"y must have one label per row of x \(3\), got 2"):
        TensorPairDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"y must be a 1-D integer tensor, got torch.float32"):
        TensorPairDataset(torch.zeros(3, 2), torch.zeros(3))


def test_index_out_of_range(base: TensorPairDataset) -> None:
    data = NoisyLabelDataset(base, torch.zeros(6, dtype=torch.int64), num_classes=2)
    with pytest.raises(IndexError, match="index 6 is out of range for a dataset of 6 samples"):
        data[6]
