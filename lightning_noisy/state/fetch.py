"""Serving a sharded buffer's rows to the batches of this rank, fetched from their owners ahead of time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lightning_noisy.state.buffer import SampleBuffer
from lightning_noisy.state.exchange import fetch_rows


def planned_batches(loader: object) -> Iterator[Tensor] | None:
    """The ``[B]`` dataset positions of each batch ``loader`` will draw this epoch, when they are known ahead.

    They are known for a ``BatchSampler`` over a plain :class:`~torch.utils.data.DistributedSampler` (what
    Lightning's DDP puts in a training loader): its order is a function of ``(seed, epoch)``, so iterating a
    second time draws the same batches without touching the loader. ``None`` otherwise (a custom sampler
    may consume a shared random generator when iterated).
    """
    batch_sampler = getattr(loader, "batch_sampler", None) if isinstance(loader, DataLoader) else None
    if type(batch_sampler) is not BatchSampler or type(batch_sampler.sampler) is not DistributedSampler:
        return None
    return (torch.as_tensor(batch, dtype=torch.long) for batch in batch_sampler)


class RowFetcher:
    """Rows of ``buffer`` for the samples of this rank's batches; a sharded buffer's rows come from their owners.

    With a plan of the epoch's batches (:func:`planned_batches`), the rows of the next ``window`` batches
    are fetched in one collective every ``window`` batches, so the fetched rows held at once stay bounded
    by ``window`` batches. Without a plan, each batch fetches its own rows. Every rank must call
    :meth:`rows` for every training batch (DDP gives every rank the same number of batches).

    Args:
        buffer: the rows to serve.
        window: batches fetched per collective.
        device: device of the collective (CPU for gloo, CUDA for NCCL).
    """

    def __init__(self, buffer: SampleBuffer, window: int = 16, device: torch.device | str = "cpu") -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.buffer, self.window, self.device = buffer, window, torch.device(device)
        self._plan: Iterator[Tensor] | None = None
        self._position = 0
        self._index = torch.empty(0, dtype=torch.long)
        self._parts: dict[str, Tensor] = {}
        self.peak_rows = 0
        self.peak_bytes = 0

    @property
    def planned(self) -> bool:
        """Whether this epoch's batches are known ahead (rows fetched a window at a time), else per batch."""
        return self._plan is not None

    def start_epoch(self, plan: Iterator[Tensor] | None) -> None:
        """Begin an epoch whose batches are ``plan`` (or unknown: ``None``); drops the rows held."""
        self._plan, self._position = plan, 0
        self._index, self._parts = torch.empty(0, dtype=torch.long), {}

    def rows(self, index: Tensor) -> Tensor:
        """``[B, *S]`` rows of the batch's samples ``index [B]``. A collective for a sharded buffer."""
        index = index.cpu()
        if not self.buffer.layout.is_sharded:
            return self.buffer.read(index)
        if self._plan is None:
            self._fetch(index.unique())
        elif self._position % self.window == 0:
            upcoming = [batch for _, batch in zip(range(self.window), self._plan)]
            self._fetch(torch.cat(upcoming).unique() if upcoming else torch.empty(0, dtype=torch.long))
        self._position += 1
        found = torch.searchsorted(self._index, index).clamp(max=max(self._index.numel() - 1, 0))
        if self._index.numel() == 0 or not torch.equal(self._index[found], index):
            raise RuntimeError(
                "the batch holds samples whose rows were not fetched: the training loader's sample indices must "
                "be the dataset positions its DistributedSampler draws (NoisyLabelDataset's are), or pass "
                "shard_state=False"
            )
        return self.buffer.store.decode({name: part[found] for name, part in self._parts.items()})

    def _fetch(self, wanted: Tensor) -> None:
        self._parts = {}  # free the previous window first
        self._index = wanted
        self._parts = fetch_rows(wanted, self.buffer.layout, self.buffer.read_parts, self.device)
        held = sum(p.numel() * p.element_size() for p in self._parts.values())
        self.peak_rows = max(self.peak_rows, int(wanted.numel()))
        self.peak_bytes = max(self.peak_bytes, held)
