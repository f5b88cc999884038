"""Noise generators, the noisy-label dataset wrapper and LightningDataModules."""

from lightning_noisy.data.datamodules import (
    CIFARDataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageFolderCSVDataModule,
    MNIST1DDataModule,
    NoisyDataModule,
)
from lightning_noisy.data.dataset import NoisyLabelDataset, TensorPairDataset
from lightning_noisy.data.loader import ResumableDataLoader
from lightning_noisy.data.sampler import EpochShuffleSampler
from lightning_noisy.data.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    CIFAR10N_LABEL_KEYS,
    CIFAR100N_LABEL_KEYS,
    MNIST_ASYMMETRIC_MAP,
    NOISE_TYPES,
    NoisyLabels,
    asymmetric_noise,
    instance_dependent_noise,
    load_cifar_n_labels,
    load_noisy_labels,
    make_noisy_labels,
    no_noise,
    pair_flip_noise,
    resolve_class_map,
    save_corrected_labels,
    save_noisy_labels,
    symmetric_noise,
    transition_matrix,
)

__all__ = [
    "CIFAR10N_LABEL_KEYS",
    "CIFAR10_ASYMMETRIC_MAP",
    "CIFAR100N_LABEL_KEYS",
    "MNIST_ASYMMETRIC_MAP",
    "NOISE_TYPES",
    "CIFARDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "ImageFolderCSVDataModule",
    "MNIST1DDataModule",
    "NoisyDataModule",
    "NoisyLabelDataset",
    "NoisyLabels",
    "ResumableDataLoader",
    "TensorPairDataset",
    "asymmetric_noise",
    "instance_dependent_noise",
    "load_cifar_n_labels",
    "load_noisy_labels",
    "make_noisy_labels",
    "no_noise",
    "pair_flip_noise",
    "resolve_class_map",
    "save_corrected_labels",
    "save_noisy_labels",
    "symmetric_noise",
    "transition_matrix",
]
