"""A shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import RandomSampler


class EpochShuffleSampler(RandomSampler):
    """``RandomSampler`` reseeded from ``seed + epoch`` each epoch.

    Lightning calls :meth:`set_epoch` at the start of every training epoch, as it does for
    ``DistributedSampler``; so the order of epoch ``e`` is the same whether the run was resumed from a
    checkpoint or not. Being a ``RandomSampler``, Lightning still recognises the loader as shuffled and
    substitutes a shuffling ``DistributedSampler`` under DDP.

    Args:
        data_source: the dataset.
        seed: base seed of the permutation.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator().manual_seed(int(seed)))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration's order a function of ``seed`` and ``epoch`` only."""
        self.epoch = int(epoch)
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)
