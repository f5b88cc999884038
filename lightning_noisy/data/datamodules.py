"""LightningDataModules whose training set carries seeded (or loaded) noisy labels.

Training batches are ``(input, noisy_target, index)``; validation and test batches are clean
``(input, target)`` from the held-out test split. The noise is computed in ``setup("fit")`` from
a local generator, so every DDP rank builds the same labels.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_noisy.data import noise
from lightning_noisy.data.dataset import NoisyLabelDataset, TensorPairDataset
from lightning_noisy.data.loader import ResumableDataLoader
from lightning_noisy.data.sampler import EpochShuffleSampler
from lightning_noisy.data.noise import (
    CIFAR10N_LABEL_KEYS,
    CIFAR100N_LABEL_KEYS,
    NOISE_TYPES,
    NoisyLabels,
    _as_labels,
    _check_rate,
    _check_seed,
    make_noisy_labels,
    resolve_class_map,
)
from lightning_noisy.seeding import stream_generator

__all__ = [
    "CIFARDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageFolderCSVDataModule",
    "MNIST1DDataModule",
    "NoisyDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# per-channel statistics of the training images (the std is over all pixels, not of per-image means)
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    return float(value)


def _check_fraction_or_zero(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_file(value: Any, name: str) -> Path:
    if not isinstance(value, (str, Path)) or not Path(value).is_file():
        raise ValueError(f"{name} must be an existing file, got {value!r}")
    return Path(value)


def _exclude(train: NoisyLabelDataset, path: str) -> Dataset:
    """``train`` without the samples whose indices the ``.pt`` file at ``path`` lists."""
    excluded = torch.load(path, map_location="cpu", weights_only=True)
    n = len(train)
    if not isinstance(excluded, Tensor) or excluded.ndim != 1 or excluded.is_floating_point() or excluded.is_complex():
        raise ValueError(f"exclude_file {path} must hold a 1-D integer tensor of sample indices, got {excluded!r:.80}")
    if excluded.numel() and (int(excluded.min()) < 0 or int(excluded.max()) >= n):
        raise ValueError(f"exclude_file {path}: indices must be in [0, {n}), got [{int(excluded.min())}, {int(excluded.max())}]")
    keep = torch.ones(n, dtype=torch.bool)
    keep[excluded.long()] = False
    if not bool(keep.any()):
        raise ValueError(f"exclude_file {path} leaves out every one of the {n} training samples")
    return Subset(train, torch.nonzero(keep).squeeze(1).tolist())


class NoisyDataModule(LightningDataModule, ABC):
    """Base DataModule: builds the noisy training set in ``setup("fit")`` with :func:`make_noisy_labels`.

    Subclasses set their own attributes, then call ``super().__init__(**shared)`` (which needs
    :attr:`num_classes`), and implement :meth:`_load_train` and :meth:`_load_test`.

    Args:
        batch_size: samples per batch for every dataloader.
        num_workers: dataloader worker processes.
        noise_type: one of ``none``, ``symmetric``, ``asymmetric``, ``pairflip``, ``instance``, ``file``,
            ``cifar_n`` (those a data set supports, see ``supported_noise_types``).
        noise_rate: noise rate in [0, 1] (unused by ``none``, ``file`` and ``cifar_n``).
        noise_seed: seed of the noise generator; the same seed gives the same labels on every rank.
        include_true_class: symmetric noise redraws from all classes (realised rate ``rate * (C-1)/C``,
            Tanaka et al. / DivideMix) instead of from the other classes.
        exact_rate: flip exactly ``round(rate * N)`` samples (per class for asymmetric and pair-flip).
        class_map: ``"cifar10"``, ``"mnist"`` or a ``{clean: noisy}`` dict for asymmetric noise.
        noise_file: labels to load for ``file`` (``.pt``, ``.npy``, ``.csv``) or the CIFAR-N ``.pt`` for ``cifar_n``.
        noise_label_key: the CIFAR-N label set, e.g. ``worse_label``, ``aggre_label`` or ``noisy_label``.
        save_noisy_labels: write the generated labels to this ``.pt`` file (rank 0) for exact reproduction.
        return_index: training batches are ``(x, y, index)``; ``False`` gives ``(x, y)``.
        drop_last: drop the last incomplete training batch.
        exclude_file: a ``.pt`` file holding a ``[R]`` int tensor of training-sample indices to leave out
            of training (e.g. the samples AUM removed); the indices keep their meaning, so per-sample
            callbacks still see ``[0, N)`` and simply never visit the excluded samples.
        clean_subset_size: this many training samples, drawn uniformly from a generator seeded by
            ``noise_seed``, also come with their true label (:attr:`clean_subset`), for methods that learn
            from a small clean set beside the noisy one (CNN-CRF, Vahdat 2017). They stay in the noisy
            training set with their noisy labels; 0 (default): no clean subset.
        noisy_val_fraction: this share of the training samples, drawn uniformly from a generator seeded by
            ``noise_seed``, is held out of training with its *noisy* labels as a validation split
            (:meth:`noisy_val_dataloader`), for choosing a method without clean labels. The noise is drawn
            on all samples first, so every sample keeps the label it has without the split; the training
            set's indices are then ``[0, N - M)`` over the samples kept. 0 (default): no split.
    """

    #: noise types this data set can produce
    supported_noise_types: ClassVar[tuple[str, ...]] = (
        "none",
        "symmetric",
        "asymmetric",
        "pairflip",
        "instance",
        "file",
    )

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        noise_type: str = "symmetric",
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        include_true_class: bool = False,
        exact_rate: bool = False,
        class_map: str | dict[int, int] | None = None,
        noise_file: str | None = None,
        noise_label_key: str | None = None,
        save_noisy_labels: str | None = None,
        return_index: bool = True,
        drop_last: bool = False,
        exclude_file: str | None = None,
        clean_subset_size: int = 0,
        noisy_val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.num_workers = _check_int(num_workers, "num_workers", 0)
        self.noise_type = self._check_noise_type(noise_type)
        self.noise_rate = _check_rate(noise_rate, "noise_rate")
        self.noise_seed = _check_seed(noise_seed, "noise_seed")
        self.include_true_class = _check_bool(include_true_class, "include_true_class")
        self.exact_rate = _check_bool(exact_rate, "exact_rate")
        self.return_index = _check_bool(return_index, "return_index")
        self.drop_last = _check_bool(drop_last, "drop_last")
        self.class_map = self._check_class_map(class_map)
        self.noise_file = self._check_noise_file(noise_file)
        self.noise_label_key = self._check_label_key(noise_label_key)
        self.save_noisy_labels = self._check_save_path(save_noisy_labels)
        self.exclude_file = None if exclude_file is None else str(_check_file(exclude_file, "exclude_file"))
        self.clean_subset_size = _check_int(clean_subset_size, "clean_subset_size", 0)
        self.noisy_val_fraction = _check_fraction_or_zero(noisy_val_fraction, "noisy_val_fraction")
        self.save_hyperparameters()
        self._noise: NoisyLabels | None = None
        self._train: NoisyLabelDataset | None = None
        self._train_kept: Dataset | None = None
        self._train_eval: NoisyLabelDataset | None = None
        self._test: Dataset | None = None
        self._clean_subset: Tensor | None = None  # [M] sorted training indices whose true label is given
        self._noisy_val: NoisyLabelDataset | None = None  # the held-out noisy validation split

    # ------------------------------------------------------------------ validation
    def _check_noise_type(self, noise_type: Any) -> str:
        if noise_type not in self.supported_noise_types:
            raise ValueError(
                f"noise_type must be one of {list(self.supported_noise_types)} for {type(self).__name__},"
                f" got {noise_type!r}"
            )
        return noise_type

    def _check_class_map(self, class_map: Any) -> dict[int, int] | None:
        if class_map is None:
            if self.noise_type == "asymmetric":
                raise ValueError("class_map must be given for noise_type='asymmetric', got None")
            return None
        return resolve_class_map(class_map, self.num_classes)

    def _check_noise_file(self, noise_file: Any) -> str | None:
        if noise_file is None:
            if self.noise_type in ("file", "cifar_n"):
                raise ValueError(f"noise_file must be given for noise_type={self.noise_type!r}, got None")
            return None
        return str(_check_file(noise_file, "noise_file"))

    def _check_label_key(self, key: Any) -> str | None:
        if key is not None and self.noise_type != "cifar_n":
            raise ValueError(f"noise_label_key is only used with noise_type='cifar_n', got {key!r}")
        return key

    @staticmethod
    def _check_save_path(path: Any) -> str | None:
        if path is not None and (not isinstance(path, str) or not path.endswith(".pt")):
            raise ValueError(f"save_noisy_labels must be a path ending with '.pt', got {path!r}")
        return path

    # ------------------------------------------------------------------ subclass interface
    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes ``C``."""

    @abstractmethod
    def _load_train(self) -> tuple[Dataset, Dataset, Tensor]:
        """Return ``(train set with training transforms, same samples with evaluation transforms, [N] labels)``."""

    @abstractmethod
    def _load_test(self) -> Dataset:
        """Return the clean held-out ``(input, target)`` test set."""

    def _noise_features(self, train: Dataset) -> Tensor:
        """``[N, ...]`` features for instance-dependent noise (the raw inputs of an in-memory data set)."""
        if isinstance(train, TensorPairDataset):
            return train.x
        raise NotImplementedError(f"{type(self).__name__} provides no features for instance-dependent noise")

    def _make_noise(self, train: Dataset, labels: Tensor) -> NoisyLabels:
        """Noisy labels for the ``[N]`` training ``labels`` as configured."""
        return make_noisy_labels(
            self.noise_type,
            labels,
            self.num_classes,
            self.noise_rate,
            seed=self.noise_seed,
            features=self._noise_features(train) if self.noise_type == "instance" else None,
            class_map=self.class_map,
            include_true_class=self.include_true_class,
            exact=self.exact_rate,
            path=self.noise_file,
            label_key=self.noise_label_key,
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._noise is None:
            self._setup_train()
        if self._test is None:
            self._test = self._load_test()

    def _setup_train(self) -> None:
        train, train_eval, labels = self._load_train()
        noisy = full_noise = self._make_noise(train, labels)  # on every sample: a held-out split changes no label
        n_cls = self.num_classes
        noisy_val = None
        if self.noisy_val_fraction:
            held, rest = self._noisy_val_split(labels.numel())
            clean = noisy.clean_labels
            noisy_val = NoisyLabelDataset(Subset(train_eval, held.tolist()), noisy.labels[held],
                                          None if clean is None else clean[held], n_cls, return_index=False)
            train, train_eval = Subset(train, rest.tolist()), Subset(train_eval, rest.tolist())
            noisy = NoisyLabels.from_labels(noisy.labels[rest], None if clean is None else clean[rest], n_cls)
        num_train = noisy.labels.numel()
        if self.clean_subset_size > num_train:
            raise ValueError(
                f"clean_subset_size must be at most the {num_train} training samples, got {self.clean_subset_size}"
            )
        if self.clean_subset_size and noisy.clean_labels is None:
            raise ValueError(
                f"clean_subset_size={self.clean_subset_size} needs the true training labels, which "
                f"noise_type={self.noise_type!r} does not give here"
            )
        train_set = NoisyLabelDataset(train, noisy.labels, noisy.clean_labels, n_cls, self.return_index)
        kept = train_set if self.exclude_file is None else _exclude(train_set, self.exclude_file)
        if self.save_noisy_labels is not None:
            self._write_noise(full_noise)
        self._train, self._train_kept, self._noisy_val = train_set, kept, noisy_val
        self._train_eval = NoisyLabelDataset(train_eval, noisy.labels, noisy.clean_labels, n_cls)
        self._noise = noisy
        self._clean_subset = torch.zeros(0, dtype=torch.long)
        if self.clean_subset_size:  # no permutation of N at every setup when there is no subset
            draw = torch.randperm(num_train, generator=stream_generator(self.noise_seed, "clean-subset"))
            self._clean_subset = draw[: self.clean_subset_size].sort().values

    def _noisy_val_split(self, num_samples: int) -> tuple[Tensor, Tensor]:
        """``(held [M], rest [N - M])``: sorted sample indices of the noisy validation split and of the rest."""
        size = round(self.noisy_val_fraction * num_samples)
        if not 0 < size < num_samples:
            raise ValueError(
                f"noisy_val_fraction={self.noisy_val_fraction} holds out {size} of the {num_samples} training "
                "samples; it must leave at least one sample on each side"
            )
        draw = torch.randperm(num_samples, generator=stream_generator(self.noise_seed, "noisy-val"))
        return draw[:size].sort().values, draw[size:].sort().values

    @rank_zero_only
    def _write_noise(self, noisy: NoisyLabels) -> None:
        class_map = None if self.class_map is None else {str(k): v for k, v in self.class_map.items()}
        noise.save_noisy_labels(
            self.save_noisy_labels,
            noisy,
            datamodule=type(self).__name__,
            noise_type=self.noise_type,
            noise_rate=self.noise_rate,
            noise_seed=self.noise_seed,
            include_true_class=self.include_true_class,
            exact_rate=self.exact_rate,
            class_map=class_map,
            noise_file=self.noise_file,
            noise_label_key=self.noise_label_key,
        )

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        # the shuffled order is a function of (noise_seed, epoch) only, so a resumed run sees the same batches;
        # the training loader also resumes mid-epoch at the batch where a checkpoint was taken
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, seed=self.noise_seed) if shuffle else None,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled ``(x [B, ...], noisy_y [B], index [B])`` batches (``(x, y)`` when ``return_index=False``).

        Samples listed in ``exclude_file`` are left out.
        """
        self._require_fit()
        return self._loader(self._train_kept, shuffle=True, drop_last=self.drop_last)

    def train_eval_dataloader(self) -> DataLoader:
        """The training set in order, with evaluation transforms: ``(x [B, ...], noisy_y [B], index [B])``."""
        return self._loader(self._require_fit()[1], shuffle=False)

    def noisy_val_dataloader(self) -> DataLoader:
        """The held-out noisy validation split in order, evaluation transforms: ``(x [B, ...], noisy_y [B])``."""
        self._require_fit()
        if self._noisy_val is None:
            raise RuntimeError(f"{type(self).__name__} holds out no noisy validation split: set noisy_val_fraction > 0")
        return self._loader(self._noisy_val, shuffle=False)

    @property
    def noisy_val_labels(self) -> tuple[Tensor, Tensor | None]:
        """``(noisy [M], clean [M] or None)``: the int64 labels of the noisy validation split (empty without one)."""
        self._require_fit()
        if self._noisy_val is None:
            return torch.zeros(0, dtype=torch.long), None
        return self._noisy_val.noisy_labels.clone(), self._noisy_val.clean_labels

    @override
    def val_dataloader(self) -> DataLoader:
        """Clean ``(x, y)`` batches of the held-out test split."""
        return self._loader(self._require_test(), shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Clean ``(x, y)`` batches of the held-out test split."""
        return self._loader(self._require_test(), shuffle=False)

    def _require_fit(self) -> tuple[NoisyLabelDataset, NoisyLabelDataset, NoisyLabels]:
        if self._train is None or self._train_eval is None or self._noise is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') must run before the training data is used")
        return self._train, self._train_eval, self._noise

    def _require_test(self) -> Dataset:
        if self._test is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the test data is used")
        return self._test

    # ------------------------------------------------------------------ results
    @property
    def noise_info(self) -> NoisyLabels:
        """The training labels: noisy, clean, realised rate and transition matrix."""
        return self._require_fit()[2]

    @property
    def noisy_labels(self) -> Tensor:
        """``[N]`` int64 noisy training labels."""
        return self.noise_info.labels

    @property
    def clean_labels(self) -> Tensor | None:
        """``[N]`` int64 clean training labels, ``None`` when unknown."""
        return self.noise_info.clean_labels

    @property
    def clean_subset(self) -> tuple[Tensor, Tensor]:
        """``(index [M], labels [M])``: the training samples of the clean subset and their true labels (int64),
        ``M = clean_subset_size`` (empty when 0); the only clean labels a method may train with."""
        clean = self.noise_info.clean_labels
        assert self._clean_subset is not None  # set with noise_info
        index = self._clean_subset
        return index.clone(), (clean[index] if clean is not None else index.new_empty(0))


# ====================================================================== MNIST-1D
@functools.lru_cache(maxsize=4)
def _generate_mnist1d(num_samples: int, train_split: float, seed: int) -> tuple[np.ndarray, ...]:
    """``(x [N, 40] float64, y [N], x_test, y_test)`` from ``mnist1d``, global RNG state restored afterwards."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:  # make_dataset seeds and draws from the global random / numpy generators
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    arrays = tuple(np.ascontiguousarray(data[key]) for key in ("x", "y", "x_test", "y_test"))
    for array in arrays:
        array.flags.writeable = False
    return arrays


class MNIST1DDataModule(NoisyDataModule):
    """MNIST-1D (Greydanus 2020), generated offline; 10 classes, inputs ``[1, 40]`` float32.

    ``make_dataset`` makes ``num_samples // 10`` samples per class; the defaults give the canonical
    4,000 / 1,000 train / test split.

    Args:
        num_samples: total number of samples (train + test), at least 10.
        train_split: share of the samples used for training, in (0, 1).
        data_seed: seed of the data generator (not of the noise).
        **shared: the arguments of :class:`NoisyDataModule`.
    """

    def __init__(self, num_samples: int = 5000, train_split: float = 0.8, data_seed: int = 42, **shared: Any) -> None:
        self.num_samples = _check_int(num_samples, "num_samples", 10)
        self.train_split = _check_fraction(train_split, "train_split")
        total = num_samples // 10 * 10
        if not 0 < int(total * train_split) < total:
            raise ValueError(
                f"train_split must leave both splits non-empty for num_samples={num_samples}, got {train_split!r}"
            )
        if isinstance(data_seed, bool) or not isinstance(data_seed, int) or not 0 <= data_seed < 2**32:
            raise ValueError(f"data_seed must be an int in [0, 2**32), got {data_seed!r}")
        self.data_seed = data_seed
        super().__init__(**shared)

    @property
    @override
    def num_classes(self) -> int:
        return 10

    def _split(self, test: bool) -> tuple[Tensor, Tensor]:
        """``(x [N, 1, 40] float32, y [N] int64)`` of the train or test split (only that split is converted)."""
        x, y, x_test, y_test = _generate_mnist1d(self.num_samples, self.train_split, self.data_seed)
        x, y = (x_test, y_test) if test else (x, y)
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.int64)

    @override
    def _load_train(self) -> tuple[Dataset, Dataset, Tensor]:
        x, y = self._split(test=False)
        train = TensorPairDataset(x, y)
        return train, train, y

    @override
    def _load_test(self) -> Dataset:
        return TensorPairDataset(*self._split(test=True))


# ====================================================================== scikit-learn digits
class DigitsDataModule(NoisyDataModule):
    """scikit-learn's 8x8 digits (1,797 samples, 10 classes); inputs ``[1, 8, 8]`` float32 in [0, 1].

    Args:
        test_fraction: share of the samples held out for testing (stratified), in (0, 1).
        data_seed: seed of the train / test split.
        **shared: the arguments of :class:`NoisyDataModule`.
    """

    _NUM_SAMPLES: ClassVar[int] = 1797

    def __init__(self, test_fraction: float = 0.25, data_seed: int = 0, **shared: Any) -> None:
        self.test_fraction = _check_fraction(test_fraction, "test_fraction")
        n_test = math.ceil(test_fraction * self._NUM_SAMPLES)
        if not 10 <= n_test <= self._NUM_SAMPLES - 10:  # a stratified split needs a sample of each class
            raise ValueError(f"test_fraction must hold out between 10 and 1787 samples, got {test_fraction!r}")
        self.data_seed = _check_int(data_seed, "data_seed", 0)
        super().__init__(**shared)

    @property
    @override
    def num_classes(self) -> int:
        return 10

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=self.test_fraction, random_state=self.data_seed, stratify=y
        )
        return torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test), torch.from_numpy(y_test)

    @override
    def _load_train(self) -> tuple[Dataset, Dataset, Tensor]:
        x, y, _, _ = self._split()
        train = TensorPairDataset(x, y)
        return train, train, train.targets

    @override
    def _load_test(self) -> Dataset:
        _, _, x, y = self._split()
        return TensorPairDataset(x, y)


# ====================================================================== CIFAR-10 / CIFAR-100
def _cifar_transforms(dataset: str, augment: bool) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(train, eval) transforms of ``[3, 32, 32]`` uint8 images to normalised float32."""
    from torchvision.transforms import v2

    mean, std = CIFAR_STATS[dataset]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    evaluation = v2.Compose(to_float)
    if not augment:
        return evaluation, evaluation
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_float]), evaluation


def _torchvision_cifar() -> dict[str, type]:
    from torchvision.datasets import CIFAR10, CIFAR100

    return {"cifar10": CIFAR10, "cifar100": CIFAR100}


class DatasetNotFoundError(FileNotFoundError, RuntimeError):
    """A data set's files are not on this machine (and could not be downloaded): the message says where they
    were looked for and how to put them there."""


# name, torchvision class, extracted folder, its files, archive it comes from
_CIFAR_FILES: dict[str, tuple[str, str, str, str, str]] = {
    "cifar10": (
        "CIFAR-10", "CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python", "train, test, meta", "cifar-100-python.tar.gz"),
}


def _cifar_not_found(dataset: str, root: str, reason: str) -> DatasetNotFoundError:
    """The error for CIFAR files missing under ``root``: where they were looked for and how to put them there."""
    name, cls, folder, files, archive = _CIFAR_FILES[dataset]
    where = Path(root).expanduser().absolute()
    return DatasetNotFoundError(
        f"{name} is not in {where} ({reason}).\n"
        f"Expected {where / folder}{os.sep} with {files} (torchvision's {cls} layout, extracted from"
        f" https://www.cs.toronto.edu/~kriz/{archive}).\n"
        "Without internet here (e.g. on a compute node), download it on a machine with internet (e.g. a login node):\n"
        f"    python -c \"from torchvision.datasets import {cls}; {cls}({str(where)!r}, download=True)\"\n"
        f"then copy the folder {folder} into {where} on this machine, or point root (data.root) at a directory"
        " that holds it."
    )


def _cifar_n_not_found(dataset: str, noise_file: Any) -> DatasetNotFoundError:
    name = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
    return DatasetNotFoundError(
        f"noise_file {str(noise_file)!r} does not exist (looked for {Path(noise_file).absolute()}).\n"
        f"The {name}N labels are data/{name}_human.pt of https://github.com/UCSC-REAL/cifar-10-100n;"
        " on a machine with internet:\n"
        f"    wget https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/{name}_human.pt\n"
        "then copy it to this machine and pass its path as noise_file."
    )


class CIFARDataModule(NoisyDataModule):
    """CIFAR-10 / CIFAR-100 through torchvision, with synthetic noise or CIFAR-10N / CIFAR-100N human labels.

    Training images get a random 32x32 crop (padding 4) and a horizontal flip when ``augment``;
    all images are normalised with the training set's per-channel mean and std. For CIFAR-N use
    ``noise_type="cifar_n"``, ``noise_file`` (``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``) and
    ``noise_label_key``. Instance-dependent noise uses the raw pixels (0-255) as features.

    Args:
        root: directory holding (or receiving) the torchvision files.
        dataset: ``cifar10`` or ``cifar100``.
        download: download the files in ``prepare_data`` when missing. Missing files that cannot be
            downloaded (no internet, ``download=False``) raise :class:`DatasetNotFoundError`, which says
            where they were looked for and how to put them there.
        augment: random crop and horizontal flip for training.
        **shared: the arguments of :class:`NoisyDataModule`.
    """

    supported_noise_types: ClassVar[tuple[str, ...]] = NOISE_TYPES

    def __init__(
        self, root: str = "data", dataset: str = "cifar10", download: bool = True, augment: bool = True, **shared: Any
    ) -> None:
        if dataset not in CIFAR_STATS:
            raise ValueError(f"dataset must be one of {sorted(CIFAR_STATS)}, got {dataset!r}")
        self.root = root
        self.dataset = dataset
        self.download = _check_bool(download, "download")
        self.augment = _check_bool(augment, "augment")
        super().__init__(**shared)

    def dataset_classes(self) -> Mapping[str, type]:
        """``{name: class}`` of the torchvision datasets; a class is called as ``cls(root, train=, download=)``
        and must give ``.data`` (``[N, 32, 32, 3]`` uint8) and ``.targets`` (``N`` ints). Override to substitute."""
        return _torchvision_cifar()

    @override
    def _check_label_key(self, key: Any) -> str | None:
        key = super()._check_label_key(key)
        fine = tuple(k for k in CIFAR100N_LABEL_KEYS if "coarse" not in k)  # 100 classes
        allowed = CIFAR10N_LABEL_KEYS if self.dataset == "cifar10" else fine
        if self.noise_type == "cifar_n" and key not in allowed:
            raise ValueError(
                f"noise_label_key must be one of {list(allowed)} for dataset={self.dataset!r}, got {key!r}"
            )
        return key

    @override
    def _check_noise_file(self, noise_file: Any) -> str | None:
        if self.noise_type == "cifar_n" and isinstance(noise_file, (str, os.PathLike)):
            if not Path(noise_file).is_file():
                raise _cifar_n_not_found(self.dataset, noise_file)
        return super()._check_noise_file(noise_file)

    @property
    @override
    def num_classes(self) -> int:
        return 10 if self.dataset == "cifar10" else 100

    @override
    def prepare_data(self) -> None:
        if self.download:
            cls = self.dataset_classes()[self.dataset]
            for train in (True, False):
                try:
                    cls(self.root, train=train, download=True)
                except (OSError, RuntimeError) as err:  # URLError, HTTPError, timeouts; torchvision's checksum error
                    reason = f"the download failed: {type(err).__name__}: {err}"
                    raise _cifar_not_found(self.dataset, self.root, reason) from err

    def _split(self, train: bool) -> tuple[Tensor, Tensor]:
        """``(images [N, 3, 32, 32] uint8, labels [N] int64)``."""
        try:
            raw = self.dataset_classes()[self.dataset](self.root, train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            reason = "download=False" if not self.download else f"torchvision: {err}"
            raise _cifar_not_found(self.dataset, self.root, reason) from err
        images = torch.from_numpy(np.asarray(raw.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
        labels = _as_labels(torch.as_tensor(raw.targets), self.num_classes, "targets")
        return images, labels

    @override
    def _load_train(self) -> tuple[Dataset, Dataset, Tensor]:
        images, labels = self._split(train=True)
        train_tf, eval_tf = _cifar_transforms(self.dataset, self.augment)
        return TensorPairDataset(images, labels, train_tf), TensorPairDataset(images, labels, eval_tf), labels

    @override
    def _load_test(self) -> Dataset:
        images, labels = self._split(train=False)
        return TensorPairDataset(images, labels, _cifar_transforms(self.dataset, False)[1])


# ====================================================================== image folder + CSV
class _ImageFileDataset(Dataset):
    """``(transform(RGB image), label)`` for image files."""

    def __init__(self, paths: list[str], labels: Tensor, transform: Callable[[Any], Tensor]) -> None:
        self.paths = paths
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    @override
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def _read_image_csv(path: Path, root: Path, name: str) -> tuple[list[str], Tensor, Tensor | None]:
    """``(image paths, [N] label column, [N] clean_label column or None)`` of a ``path,label[,clean_label]`` CSV."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header = [cell.strip() for cell in rows[0]] if rows else []
    if "path" not in header or "label" not in header or len(rows) < 2 or {len(r) for r in rows} != {len(header)}:
        raise ValueError(f"{name} must be a CSV with a 'path,label[,clean_label]' header and rows, got {str(path)!r}")
    table = np.array(rows[1:], dtype=str)
    column = lambda key: table[:, header.index(key)]  # noqa: E731
    paths = [str(root / p) for p in np.char.strip(column("path")).tolist()]  # absolute paths stay absolute
    try:
        labels = torch.from_numpy(np.char.strip(column("label")).astype(np.int64))
        clean = (
            torch.from_numpy(np.char.strip(column("clean_label")).astype(np.int64)) if "clean_label" in header else None
        )
    except ValueError:
        raise ValueError(f"{name} must hold integer labels, got non-integer values in {str(path)!r}") from None
    return paths, labels, clean


class ImageFolderCSVDataModule(NoisyDataModule):
    """Images listed in CSV files (Clothing1M / WebVision style).

    ``train_csv`` has the columns ``path,label`` (the given, possibly noisy label) and optionally
    ``clean_label``; image paths are relative to ``root``. With ``noise_type="none"`` the ``label``
    column is used as is, and clean labels are known only from a ``clean_label`` column. A
    synthetic noise type treats ``label`` as clean and adds noise to it. Test labels are
    ``clean_label`` when present, else ``label``. Images are resized to ``image_size * 256/224``
    on the short side, cropped to ``image_size`` (random crop and flip for training, centre crop
    otherwise) and normalised with the ImageNet statistics.

    Args:
        root: directory the image paths are relative to.
        train_csv: the training CSV (relative paths are tried as given, then under ``root``).
        test_csv: the clean test CSV; without it there is no validation or test data.
        image_size: side of the square crop.
        num_classes: number of classes; inferred as the largest label + 1 when ``None``.
        noise_type: ``none`` (default: the CSV labels are the noisy labels), ``symmetric``,
            ``asymmetric``, ``pairflip`` or ``file``.
        **shared: the other arguments of :class:`NoisyDataModule`.
    """

    supported_noise_types: ClassVar[tuple[str, ...]] = ("none", "symmetric", "asymmetric", "pairflip", "file")

    def __init__(
        self,
        root: str,
        train_csv: str,
        test_csv: str | None = None,
        image_size: int = 224,
        num_classes: int | None = None,
        noise_type: str = "none",
        **shared: Any,
    ) -> None:
        if not isinstance(root, (str, Path)) or not Path(root).is_dir():
            raise ValueError(f"root must be an existing directory, got {root!r}")
        self.root = str(root)
        self.train_csv = str(self._find_csv(train_csv, "train_csv"))
        self.test_csv = None if test_csv is None else str(self._find_csv(test_csv, "test_csv"))
        self.image_size = _check_int(image_size, "image_size", 1)
        self._train_table = _read_image_csv(Path(self.train_csv), Path(root), "train_csv")
        self._test_table = None if test_csv is None else _read_image_csv(Path(self.test_csv), Path(root), "test_csv")
        self._num_classes = self._resolve_num_classes(num_classes)
        if noise_type not in ("none", "file") and self._train_table[2] is not None:
            raise ValueError(
                f"noise_type={noise_type!r} adds noise to the 'label' column as if it were clean, but train_csv"
                " also has a 'clean_label' column: use noise_type='none' or drop the column"
            )
        super().__init__(noise_type=noise_type, **shared)

    def _find_csv(self, path: Any, name: str) -> Path:
        if isinstance(path, (str, Path)) and not Path(path).is_file() and (Path(self.root) / path).is_file():
            return Path(self.root) / path
        return _check_file(path, name)

    def _resolve_num_classes(self, num_classes: int | None) -> int:
        tables = [self._train_table] + ([self._test_table] if self._test_table is not None else [])
        columns = [c for _, labels, clean in tables for c in (labels, clean) if c is not None]
        if num_classes is None:
            for column in columns:  # negative labels first: an inferred count from them would only confuse
                noise._check_label_range(column, None, "CSV labels")
            num_classes = max(int(c.max()) for c in columns) + 1
            name = "num_classes (inferred as the largest CSV label + 1)"
        else:
            name = "num_classes"
        num_classes = noise._check_num_classes(num_classes, name)
        for column in columns:
            _as_labels(column, num_classes, "CSV labels")
        return num_classes

    @property
    @override
    def num_classes(self) -> int:
        return self._num_classes

    def _transforms(self, train: bool) -> Callable[[Any], Tensor]:
        from torchvision.transforms import v2

        crop = (
            [v2.RandomCrop(self.image_size), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(self.image_size)]
        )
        resize = round(self.image_size * 256 / 224)
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize),
                *crop,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @override
    def _make_noise(self, train: Dataset, labels: Tensor) -> NoisyLabels:
        clean = self._train_table[2]
        if self.noise_type == "none":
            return NoisyLabels.from_labels(labels, clean, self.num_classes)
        if self.noise_type == "file":
            return noise.load_noisy_labels(self.noise_file, self.num_classes, clean_labels=clean)
        return super()._make_noise(train, labels)

    @override
    def _load_train(self) -> tuple[Dataset, Dataset, Tensor]:
        paths, labels, _ = self._train_table
        train = _ImageFileDataset(paths, labels, self._transforms(train=True))
        return train, _ImageFileDataset(paths, labels, self._transforms(train=False)), labels

    @override
    def _load_test(self) -> Dataset:
        if self._test_table is None:
            return _ImageFileDataset([], torch.zeros(0, dtype=torch.int64), self._transforms(train=False))
        paths, labels, clean = self._test_table
        return _ImageFileDataset(paths, labels if clean is None else clean, self._transforms(train=False))
