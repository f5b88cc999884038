"""Per-rank records of ``(index, value)`` pairs, gathered across ranks once per epoch."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_noisy.state.exchange import send_to_owners, traffic
from lightning_noisy.state.gather import all_gather_uneven, is_distributed
from lightning_noisy.state.layout import RowLayout

Reduction = Literal["mean", "sum", "first", "last", "max", "min"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_by_index(index: Tensor, values: Tensor, reduction: Reduction = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """Combine the records that share an index by a fixed rule.

    Records are ordered by index with a stable sort, so among equal indices the order of arrival (rank
    order after a gather) is kept: ``"first"``/``"last"`` pick by that order, and ``"mean"``/``"sum"``
    add in that order, so the result is the same on every rank and in every run (two records, the
    DistributedSampler padding case, give the same sum in either order). When no index repeats, the
    values are only reordered: no accumulator is allocated, which matters for ``N x C`` records.

    Args:
        index: ``[M]`` int64 sample indices, possibly repeated.
        values: ``[M, *S]`` values recorded for them.
        reduction: how records of one index combine.

    Returns:
        ``(unique_index [U], reduced [U, *S], counts [U])`` with ``unique_index`` sorted ascending.
    """
    _check_reduction(reduction)
    if index.ndim != 1 or values.shape[:1] != index.shape:
        raise ValueError(
            f"index must be [M] and values [M, ...], got index {tuple(index.shape)} and values {tuple(values.shape)}"
        )
    order = torch.argsort(index, stable=True)
    index, values = index[order], values[order]
    unique, inverse, counts = torch.unique_consecutive(index, return_inverse=True, return_counts=True)
    if unique.shape[0] == index.shape[0]:
        return unique, values, counts
    ends = torch.cumsum(counts, 0)
    if reduction == "first":
        return unique, values[ends - counts], counts
    if reduction == "last":
        return unique, values[ends - 1], counts
    if reduction in ("max", "min"):
        out = values.new_zeros((unique.shape[0], *values.shape[1:]))
        scatter_index = inverse.view(-1, *([1] * (values.ndim - 1))).expand_as(values)
        amax_or_amin = "amax" if reduction == "max" else "amin"
        return unique, out.scatter_reduce(0, scatter_index, values, amax_or_amin, include_self=False), counts
    acc_dtype = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    total = torch.zeros((unique.shape[0], *values.shape[1:]), dtype=acc_dtype, device=values.device)
    total.index_add_(0, inverse, values.to(acc_dtype))
    if reduction == "mean":
        total = total / counts.view(-1, *([1] * (values.ndim - 1))).to(acc_dtype)
    return unique, total.to(values.dtype), counts


class SampleRecorder:
    """Collects this rank's ``(index, value)`` records during an epoch; :meth:`gather` merges all ranks.

    Recording is a detached append with no host sync; the gather is one collective per epoch.

    Args:
        value_shape: shape ``S`` of one record's value (``()`` for a scalar per sample, ``(C,)`` for a vector).
        dtype: dtype the values are stored and gathered in.
    """

    def __init__(self, value_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> None:
        if any(int(d) < 1 for d in value_shape):
            raise ValueError(f"value_shape must have positive sizes, got {tuple(value_shape)}")
        self.value_shape = tuple(int(d) for d in value_shape)
        self.dtype = dtype
        self._index: list[Tensor] = []
        self._values: list[Tensor] = []

    def __len__(self) -> int:
        return sum(int(i.shape[0]) for i in self._index)

    def add(self, index: Tensor, values: Tensor) -> None:
        """Record ``values [B, *S]`` for the samples ``index [B]``."""
        if index.ndim != 1 or tuple(values.shape) != (index.shape[0], *self.value_shape):
            raise ValueError(
                f"expected index [B] and values [B, {', '.join(map(str, self.value_shape))}], "
                f"got index {tuple(index.shape)} and values {tuple(values.shape)}"
            )
        self._index.append(index.detach().to(torch.long))
        self._values.append(values.detach().to(self.dtype))

    def clear(self) -> None:
        """Drop the records of this rank."""
        self._index.clear()
        self._values.clear()

    def gather(
        self, device: torch.device | str = "cpu", reduction: Reduction = "mean", layout: RowLayout | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gather the records of every rank, reduce duplicates and clear. A collective: call on every rank.

        Args:
            device: device of the collective (the strategy's root device: CPU for gloo, CUDA for NCCL).
            reduction: rule for indices recorded more than once (see :func:`reduce_by_index`).
            layout: with a sharded layout, each rank receives only the records of the rows it owns
                (one all-to-all); otherwise every rank receives every record (all-gather).

        Returns:
            ``(index [U], values [U, *S], counts [U])`` on the CPU: identical on every rank, or with a
            sharded layout this rank's rows of what a replicated gather returns, bit for bit.
        """
        _check_reduction(reduction)
        device = torch.device(device)
        if self._index:
            index = torch.cat([i.to(device) for i in self._index])
            self._index.clear()
            values = torch.cat([v.to(device) for v in self._values])
            self._values.clear()  # free the per-batch pieces before the gathered copy exists
        else:
            index = torch.empty(0, dtype=torch.long, device=device)
            values = torch.empty((0, *self.value_shape), dtype=self.dtype, device=device)
        if layout is not None and layout.is_sharded and is_distributed():
            mine_index, mine_values = send_to_owners(index, values, layout, device)
            del index, values
            return reduce_by_index(mine_index, mine_values, reduction)
        all_index = _concatenate(all_gather_uneven(index)).cpu()
        del index
        all_values = _concatenate(all_gather_uneven(values)).cpu()
        del values
        traffic.add(all_index, all_values)
        return reduce_by_index(all_index, all_values, reduction)


def _concatenate(parts: list[Tensor]) -> Tensor:
    """``torch.cat`` without the copy when there is a single part (one process)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
