"""Per-rank records of ``(index, value)`` pairs, gathered across ranks once per epoch."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_noisy.state.exchange import send_to_owners, traffic
from lightning_noisy.state.gather import all_gather_uneven, is_distributed
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.storage import RowCodec, RowParts

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


def reduce_parts(
    index: Tensor, parts: RowParts, codec: RowCodec, reduction: Reduction = "mean"
) -> tuple[Tensor, RowParts, Tensor]:
    """:func:`reduce_by_index` for records in stored form: ``(unique_index [U], parts, counts [U])``.

    Dense parts reduce as values do. Top-k records of an index seen once are kept as they are; only the
    records of repeated indices are decoded, reduced densely and encoded again.
    """
    if codec.topk is None:
        unique, data, counts = reduce_by_index(index, parts["data"], reduction)
        return unique, {"data": data}, counts
    _check_reduction(reduction)
    order = torch.argsort(index, stable=True)
    index, parts = index[order], {name: part[order] for name, part in parts.items()}
    unique, inverse, counts = torch.unique_consecutive(index, return_inverse=True, return_counts=True)
    if unique.shape[0] == index.shape[0]:
        return unique, parts, counts
    repeated = counts[inverse] > 1
    first = torch.cumsum(counts, 0) - counts
    reduced_parts = {name: part[first] for name, part in parts.items()}
    dense = codec.decode({name: part[repeated] for name, part in parts.items()})
    _, reduced, _ = reduce_by_index(index[repeated], dense, reduction)
    for name, part in codec.encode(reduced).items():
        reduced_parts[name][counts > 1] = part
    return unique, reduced_parts, counts


class SampleRecorder:
    """Collects this rank's ``(index, value)`` records during an epoch; :meth:`gather` merges all ranks.

    Recording is a detached append with no host sync and no copy: :meth:`add` holds the step's tensors until
    about ``hold_bytes`` of values are held, then copies them into the recorder's storage at once, so a step
    pays no op for its record. A value must not be changed in place after :meth:`add` (that is detected and
    refused). The gather is one collective per epoch (with a sharded layout, a few all-to-all rounds of at
    most ``round_bytes`` each, which bounds the copies).
    Values are kept in the stored form of a :class:`~lightning_noisy.state.storage.RowCodec`: ``dtype``,
    and for ``[C]`` rows optionally top-k, so records of ``C = 1000`` classes need not be dense.

    Args:
        value_shape: shape ``S`` of one record's value (``()`` for a scalar per sample, ``(C,)`` for a vector).
        dtype: dtype the values are stored and gathered in.
        topk: keep the ``k`` largest entries of each ``[C]`` record, renormalised (``None``: dense).
        round_bytes: most record bytes a rank sends in one all-to-all round of a sharded gather.
        drop_non_finite: leave out of a gather every sample whose reduced record holds a NaN or an
            infinity, so nothing non-finite reaches a buffer; :attr:`non_finite_rows` counts them.
        hold_bytes: most bytes of values held by :meth:`add` before they are stored (0 stores every record at once).
    """

    def __init__(
        self,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        topk: int | None = None,
        round_bytes: int = 256 << 20,
        drop_non_finite: bool = True,
        hold_bytes: int = 1 << 20,
    ) -> None:
        if any(int(d) < 1 for d in value_shape):
            raise ValueError(f"value_shape must have positive sizes, got {tuple(value_shape)}")
        if isinstance(hold_bytes, bool) or not isinstance(hold_bytes, int) or hold_bytes < 0:
            raise ValueError(f"hold_bytes must be an integer >= 0, got {hold_bytes!r}")
        self.value_shape = tuple(int(d) for d in value_shape)
        self.dtype = dtype
        self.codec = RowCodec(self.value_shape, dtype, topk)
        self.round_rows = max(1, int(round_bytes) // self.codec.row_bytes())
        # records go into buffers that double when full: a few large allocations per epoch, not one small
        # one per step that would outlive the step's large temporaries and fragment the heap
        self._index = torch.empty(0, dtype=torch.long)
        self._parts: RowParts = self.codec.empty(0)
        self._size = 0
        self._taken = 0
        # records added but not stored yet: (index, values, their version counters at add)
        self._held: list[tuple[Tensor, Tensor, int | None, int | None]] = []
        self._held_rows = 0
        self._held_bytes = 0
        self.hold_bytes = hold_bytes
        self.drop_non_finite = drop_non_finite
        #: samples the last gather left out for a non-finite record, summed over every rank's rows
        self.non_finite_rows = 0

    def __len__(self) -> int:
        return self._size - self._taken + self._held_rows

    def _reserve(self, rows: int, device: torch.device) -> None:
        capacity = self._index.shape[0]
        if self._size + rows <= capacity and self._index.device == device:
            return
        capacity = max(2 * capacity, self._size + rows, 4096)
        index = torch.empty(capacity, dtype=torch.long, device=device)  # untouched pages cost no memory yet
        index[: self._size] = self._index[: self._size]
        parts = {}
        for name, part in self._parts.items():
            parts[name] = part.new_empty((capacity, *part.shape[1:]), device=device)
            parts[name][: self._size] = part[: self._size]
        self._index, self._parts = index, parts

    def add(self, index: Tensor, values: Tensor) -> None:
        """Record ``values [B, *S]`` for the samples ``index [B]`` (held, not copied: do not change them in place)."""
        if index.ndim != 1 or tuple(values.shape) != (index.shape[0], *self.value_shape):
            raise ValueError(
                f"expected index [B] and values [B, {', '.join(map(str, self.value_shape))}], "
                f"got index {tuple(index.shape)} and values {tuple(values.shape)}"
            )
        index, values = index.detach(), values.detach()
        if self._held and (values.device, values.dtype, index.device) != (
            self._held[0][1].device, self._held[0][1].dtype, self._held[0][0].device
        ):
            self._store_held()
        versions = (_version(index), _version(values))
        self._held.append((index, values, *versions))
        self._held_rows += int(index.shape[0])
        self._held_bytes += values.numel() * values.element_size()
        if self._held_bytes >= self.hold_bytes or None in versions:  # an inference tensor: no version to check later
            self._store_held()

    def _store_held(self) -> None:
        """Copy the records held into the storage, in the order they came."""
        if not self._held:
            return
        held, self._held, self._held_rows, self._held_bytes = self._held, [], 0, 0
        if any(_version(index) != i or _version(values) != v for index, values, i, v in held):
            raise RuntimeError(
                "a tensor given to SampleRecorder.add was changed in place before it was stored; pass a copy "
                "(values.clone()) if the tensor is reused"
            )
        index = _concatenate([index for index, _, _, _ in held])
        values = _concatenate([values for _, values, _, _ in held])
        parts = self.codec.encode(values)
        rows = int(index.shape[0])
        self._reserve(rows, values.device)
        self._index[self._size : self._size + rows] = index
        for name, part in parts.items():
            self._parts[name][self._size : self._size + rows] = part
        self._size += rows

    def add_parts(self, index: Tensor, parts: RowParts) -> None:
        """Record ``index [B]`` with values already in this recorder's stored form (e.g. :meth:`pending` restored)."""
        expected = self.codec.empty(0)
        if index.ndim != 1 or set(parts) != set(expected) or any(
            part.dtype != expected[name].dtype or tuple(part.shape) != (index.shape[0], *expected[name].shape[1:])
            for name, part in parts.items()
        ):
            got = {name: (tuple(part.shape), part.dtype) for name, part in parts.items()}
            want = {name: (("B", *part.shape[1:]), part.dtype) for name, part in expected.items()}
            raise ValueError(f"records in stored form must be {want} for index [B], got index {tuple(index.shape)} and {got}")
        self._store_held()  # keep the order of arrival
        rows = int(index.shape[0])
        self._reserve(rows, self._index.device if self._size else index.device)
        self._index[self._size : self._size + rows] = index
        for name, part in parts.items():
            self._parts[name][self._size : self._size + rows] = part.to(self._parts[name].device)
        self._size += rows

    def pending(self) -> tuple[Tensor, RowParts]:
        """``(index [M], parts)``: copies of this rank's records not yet gathered, in the order they came, on the CPU."""
        self._store_held()
        begin, end = self._taken, self._size
        return self._index[begin:end].cpu().clone(), {name: part[begin:end].cpu().clone() for name, part in self._parts.items()}

    def clear(self) -> None:
        """Drop the records of this rank (and their buffers)."""
        self._held, self._held_rows, self._held_bytes = [], 0, 0
        self._index, self._parts = torch.empty(0, dtype=torch.long), self.codec.empty(0)
        self._size = self._taken = 0

    def gather(
        self, device: torch.device | str = "cpu", reduction: Reduction = "mean", layout: RowLayout | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gather the records of every rank, reduce duplicates and clear. A collective: call on every rank.

        Args:
            device: device of the collective (the strategy's root device: CPU for gloo, CUDA for NCCL).
            reduction: rule for indices recorded more than once (see :func:`reduce_by_index`).
            layout: with a sharded layout, each rank receives only the records of the rows it owns
                (all-to-all); otherwise every rank receives every record (all-gather).

        Returns:
            ``(index [U], values [U, *S], counts [U])`` on the CPU (values decoded: float32 for float
            records): identical on every rank, or with a sharded layout this rank's rows of what a
            replicated gather returns, bit for bit.
        """
        index, parts, counts = self.gather_parts(device, reduction, layout)
        return index, self.codec.decode(parts), counts

    def gather_parts(
        self, device: torch.device | str = "cpu", reduction: Reduction = "mean", layout: RowLayout | None = None
    ) -> tuple[Tensor, RowParts, Tensor]:
        """:meth:`gather`, with the values left in stored form (what a buffer of the same codec writes as is)."""
        _check_reduction(reduction)
        device = torch.device(device)
        if layout is not None and layout.is_sharded and is_distributed():
            index, parts = self._send_to_owners(layout, device)
            return self._finite(*reduce_parts(index, parts, self.codec, reduction), sum_over_ranks=device)
        index, parts = self._take(len(self), device)
        self.clear()
        all_index = _concatenate(all_gather_uneven(index)).cpu()
        del index
        all_parts = {}
        for name in list(parts):
            all_parts[name] = _concatenate(all_gather_uneven(parts.pop(name))).cpu()
        traffic.add(all_index, *all_parts.values())
        return self._finite(*reduce_parts(all_index, all_parts, self.codec, reduction))

    def _finite(
        self, index: Tensor, parts: RowParts, counts: Tensor, sum_over_ranks: torch.device | None = None
    ) -> tuple[Tensor, RowParts, Tensor]:
        """The gathered samples whose reduced record is finite; :attr:`non_finite_rows` counts the others
        (summed over the ranks' blocks, a collective, when ``sum_over_ranks`` names the collective device)."""
        self.non_finite_rows = 0
        floating = [part for part in parts.values() if part.is_floating_point()]
        if not (self.drop_non_finite and floating):
            return index, parts, counts
        finite = torch.ones(index.shape[0], dtype=torch.bool, device=index.device)
        for part in floating:
            finite &= torch.isfinite(part).flatten(1).all(dim=1).to(finite.device) if part.ndim > 1 else \
                torch.isfinite(part).to(finite.device)
        dropped = torch.tensor([int((~finite).sum())], dtype=torch.long)
        if sum_over_ranks is not None:
            dropped = dropped.to(sum_over_ranks)
            dist.all_reduce(dropped)
        self.non_finite_rows = int(dropped.cpu()[0])
        if bool(finite.all()):
            return index, parts, counts
        return index[finite], {name: part[finite] for name, part in parts.items()}, counts[finite]

    def _take(self, rows: int, device: torch.device) -> tuple[Tensor, RowParts]:
        """The oldest ``rows`` records not yet taken (all, if fewer), on ``device``."""
        self._store_held()
        begin, end = self._taken, min(self._taken + rows, self._size)
        self._taken = end
        index = self._index[begin:end].to(device)
        return index, {name: part[begin:end].to(device) for name, part in self._parts.items()}

    def _send_to_owners(self, layout: RowLayout, device: torch.device) -> tuple[Tensor, RowParts]:
        """All records to their owners in rounds of at most ``round_rows`` per rank; in all-gather order."""
        rounds = torch.tensor([-(-len(self) // self.round_rows)], dtype=torch.long, device=device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        received = [send_to_owners(*self._take(self.round_rows, device), layout, device) for _ in range(int(rounds))]
        self.clear()
        if not received:
            return torch.empty(0, dtype=torch.long), self.codec.empty(0)
        # rounds interleave the sources: order by source rank (stable), as one all-gather would have them
        order = torch.argsort(torch.cat([source for _, _, source in received]), stable=True)
        index = torch.cat([index for index, _, _ in received])[order]
        parts = {name: torch.cat([parts[name] for _, parts, _ in received])[order] for name in self.codec.empty(0)}
        return index, parts


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter of ``tensor``; ``None`` for an inference tensor, which has none."""
    return None if tensor.is_inference() else tensor._version


def _concatenate(parts: list[Tensor]) -> Tensor:
    """``torch.cat`` without the copy when there is a single part (one process)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
