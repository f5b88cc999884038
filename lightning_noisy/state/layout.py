"""Which rank owns which per-sample rows: contiguous blocks of about ``N / W`` rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowLayout:
    """Rows ``[0, N)`` split into ``W`` contiguous blocks; rank ``r`` owns ``[start_r, stop_r)``.

    The blocks follow :func:`torch.tensor_split`: the first ``N % W`` ranks own ``N // W + 1`` rows, the
    others ``N // W``. One rank (``world_size=1``) owns every row: that is the replicated layout, which
    every rank of a replicated run uses.

    Args:
        num_samples: ``N``.
        world_size: ``W``, the number of owners.
        rank: the owner this process is.
    """

    num_samples: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {self.rank!r}")

    @property
    def offsets(self) -> Tensor:
        """``[W + 1]`` int64 block boundaries: rank ``r`` owns ``[offsets[r], offsets[r + 1])``."""
        base, extra = divmod(self.num_samples, self.world_size)
        sizes = torch.full((self.world_size,), base, dtype=torch.long)
        sizes[:extra] += 1
        return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])

    @property
    def block_sizes(self) -> list[int]:
        """Rows owned by each rank, in rank order."""
        return [stop - start for start, stop in map(self.block, range(self.world_size))]

    def block(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of the rows that ``rank`` owns."""
        base, extra = divmod(self.num_samples, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + int(rank < extra)

    @property
    def start(self) -> int:
        return self.block(self.rank)[0]

    @property
    def stop(self) -> int:
        return self.block(self.rank)[1]

    @property
    def num_rows(self) -> int:
        """Rows this rank owns."""
        start, stop = self.block(self.rank)
        return stop - start

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1

    def owner(self, index: Tensor) -> Tensor:
        """``[M]`` int64 owning rank of each sample of ``index [M]``."""
        return torch.bucketize(index.to(torch.long), self.offsets[1:].to(index.device), right=True)
