"""Compact storage of per-sample rows: float32, bfloat16 or float16 values, dense or top-k sparse.

A top-k row keeps the ``k`` largest entries of a distribution ``[C]`` and their class indices,
renormalised to sum to 1; it is read back as a dense ``[C]`` row with zeros elsewhere. That is exact
for one-hot rows and keeps ``2k`` numbers of ``C`` for soft labels and prediction histories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

StorageDtype = Literal["float32", "bfloat16", "float16"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
_TINY = torch.finfo(torch.float32).tiny
#: values (rows x entries) decoded or computed at once when a whole block is processed: 64 MiB of float32
CHUNK_VALUES = 1 << 24


def chunk_rows(value_shape: tuple[int, ...]) -> int:
    """Rows of shape ``value_shape`` that make one chunk of at most :data:`CHUNK_VALUES` values."""
    size = 1
    for dim in value_shape:
        size *= int(dim)
    return max(1, CHUNK_VALUES // size)


@dataclass(frozen=True)
class StateOptions:
    """How a callback keeps its per-sample state: the same three arguments on every such callback.

    Args:
        shard_state: each DDP rank owns about ``N / W`` rows (``True``), or every rank holds all ``N``
            (``False``); ``None`` shards whenever the world size is above 1. Both give bit-identical results.
        storage_dtype: dtype of stored float rows: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        storage_topk: keep only the ``k`` largest entries of each distribution row (``None``: dense rows).
    """

    shard_state: bool | None = None
    storage_dtype: StorageDtype = "float32"
    storage_topk: int | None = None

    def __post_init__(self) -> None:
        if self.shard_state is not None and not isinstance(self.shard_state, bool):
            raise ValueError(f"shard_state must be True, False or None (shard when world size > 1), got {self.shard_state!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        topk = self.storage_topk
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"storage_topk must be None (dense rows) or an integer >= 1, got {topk!r}")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.storage_dtype)

    def sharded(self, world_size: int) -> bool:
        """Whether the state is sharded on ``world_size`` ranks."""
        return world_size > 1 if self.shard_state is None else self.shard_state and world_size > 1

    def topk_for(self, num_classes: int) -> int | None:
        """The top-k of rows of ``num_classes`` entries; ``storage_topk >= C`` is refused (it would store more)."""
        if self.storage_topk is not None and self.storage_topk >= num_classes:
            raise ValueError(
                f"storage_topk must be smaller than the number of classes C={num_classes} "
                f"(None keeps dense rows), got {self.storage_topk}"
            )
        return self.storage_topk


def top_k_rows(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``values [R, C]``, renormalised: ``([R, k] float32, [R, k] int64)``."""
    top, classes = values.float().topk(k, dim=1)
    return top / top.sum(1, keepdim=True).clamp_min(_TINY), classes


def dense_rows(top: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """``[R, C]`` float32 rows with ``top [R, k]`` at ``classes [R, k]`` and zeros elsewhere."""
    out = torch.zeros((top.shape[0], num_classes), dtype=torch.float32, device=top.device)
    return out.scatter_(1, classes.to(torch.long), top.float())


def _class_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


RowParts = dict[str, Tensor]


@dataclass(frozen=True)
class RowCodec:
    """How rows of shape ``S`` are stored: ``{"data": [M, *S]}`` in ``dtype``, or for ``S = (C,)`` with ``topk``
    the parts ``{"top": [M, k] dtype, "classes": [M, k] int16}`` (int32 beyond 32,767 classes)."""

    value_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.topk is not None and (len(self.value_shape) != 1 or not 1 <= int(self.topk) < self.value_shape[0]):
            raise ValueError(f"top-k storage needs rows [C] with 1 <= k < C, got k={self.topk} and rows {self.value_shape}")

    def empty(self, num_rows: int, device: torch.device | str = "cpu") -> RowParts:
        """Parts of ``num_rows`` zero rows."""
        if self.topk is None:
            return {"data": torch.zeros((num_rows, *self.value_shape), dtype=self.dtype, device=device)}
        classes = _class_dtype(self.value_shape[0])
        return {"top": torch.zeros((num_rows, self.topk), dtype=self.dtype, device=device),
                "classes": torch.zeros((num_rows, self.topk), dtype=classes, device=device)}

    def encode(self, values: Tensor) -> RowParts:
        """The stored form of ``values [M, *S]`` (top-k rows renormalised)."""
        if self.topk is None:
            return {"data": values.to(self.dtype)}
        top, classes = top_k_rows(values, self.topk)
        return {"top": top.to(self.dtype), "classes": classes.to(_class_dtype(self.value_shape[0]))}

    def decode(self, parts: RowParts) -> Tensor:
        """``[M, *S]`` rows from their stored form: float32 for 16-bit floats, the stored dtype otherwise."""
        if self.topk is None:
            data = parts["data"]
            return data.float() if data.dtype in (torch.float16, torch.bfloat16) else data
        return dense_rows(parts["top"], parts["classes"], self.value_shape[0])

    def row_bytes(self) -> int:
        """Bytes of one stored row."""
        return sum(p.element_size() * (p[0].numel() if p.ndim > 1 else 1) for p in self.empty(1).values())


class RowStore:
    """``R`` rows of shape ``S`` stored by a :class:`RowCodec`: ``dtype``, and ``[R, C]`` rows optionally as top-k.

    Reads return float32 for 16-bit float storage, the stored dtype otherwise (float64 sums, int64 predictions).

    Args:
        num_rows: ``R``.
        value_shape: ``S`` of one row: ``()`` or ``(C,)``.
        dtype: storage dtype.
        topk: ``k`` for top-k rows (needs ``S = (C,)`` with ``k < C``); ``None`` stores dense rows.
        fill: initial value: a scalar, a ``[R, *S]`` tensor, or a function of row numbers ``[U]`` returning
            their ``[U, *S]`` values (called on chunks of rows, so no dense ``[R, C]`` copy is made).
    """

    def __init__(
        self,
        num_rows: int,
        value_shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        topk: int | None = None,
        fill: float | Tensor | Callable[[Tensor], Tensor] = 0.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_rows = int(num_rows)
        self.codec = RowCodec(tuple(int(d) for d in value_shape), dtype, topk)
        self.value_shape, self.dtype, self.topk = self.codec.value_shape, dtype, topk
        shape = (self.num_rows, *self.value_shape)
        if topk is not None and not callable(fill) and not isinstance(fill, Tensor) and float(fill) != 0.0:
            raise ValueError(f"top-k rows start as zeros, a tensor or a function of the rows, got fill={fill!r}")
        if topk is None and not isinstance(fill, Tensor) and not callable(fill):
            self._parts = {"data": torch.full(shape, fill, dtype=dtype, device=device)}
        else:
            self._parts = self.codec.empty(self.num_rows, device)
        if isinstance(fill, Tensor):
            if tuple(fill.shape) != shape:
                raise ValueError(f"fill must be a scalar or a tensor of shape {shape}, got {tuple(fill.shape)}")
            self.write(torch.arange(self.num_rows), fill.detach())
        elif callable(fill):
            step = chunk_rows(self.value_shape)
            for begin in range(0, self.num_rows, step):
                rows = torch.arange(begin, min(begin + step, self.num_rows))
                self.write(rows, fill(rows))

    @property
    def data(self) -> Tensor:
        """``[R, *S]`` the dense rows themselves (dense storage only)."""
        return self._parts["data"]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows."""
        return sum(t.numel() * t.element_size() for t in self._parts.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self._parts.values())).device

    def read(self, rows: Tensor | None = None) -> Tensor:
        """``[len(rows), *S]`` rows (all when ``None``), float32 for 16-bit float storage."""
        return self.codec.decode(self._parts if rows is None else self.parts_of(rows))

    def add_to(self, total: Tensor, rows: Tensor | None = None) -> None:
        """``total [len(rows), *S] += `` the rows, in float32; top-k rows are scattered in, never made dense."""
        parts = self._parts if rows is None else self.parts_of(rows)
        if self.topk is None:
            total += parts["data"].to(total.dtype)
        else:
            total.scatter_add_(1, parts["classes"].to(torch.long), parts["top"].to(total.dtype))

    def write(self, rows: Tensor, values: Tensor, add: bool = False) -> None:
        """Store ``values [len(rows), *S]`` at ``rows`` (distinct local row numbers), replacing or adding."""
        rows = rows.to(self.device)
        if self.topk is None and add:
            self.data.index_add_(0, rows, values.to(device=self.device, dtype=self.dtype))
            return
        if add:
            values = values.float() + self.read(rows)
        self.write_parts(rows, self.codec.encode(values.to(self.device)))

    def write_parts(self, rows: Tensor, parts: RowParts) -> None:
        """Store rows already in stored form (:meth:`RowCodec.encode`) at ``rows``."""
        rows = rows.to(self.device)
        for name, tensor in self._parts.items():
            tensor[rows] = parts[name].to(device=self.device, dtype=tensor.dtype)

    def parts_of(self, rows: Tensor) -> RowParts:
        """The stored form of ``rows`` (what a fetch sends): dense rows, or top-k values and classes."""
        rows = rows.to(self.device)
        return {name: tensor.index_select(0, rows) for name, tensor in self._parts.items()}

    def decode(self, parts: RowParts) -> Tensor:
        """Rows from their stored form :meth:`parts_of`, as :meth:`read` returns them."""
        return self.codec.decode(parts)

    def parts(self) -> RowParts:
        """The stored tensors, by name (what a checkpoint holds)."""
        return self._parts

    def load_parts(self, parts: dict[str, Any]) -> None:
        """Copy :meth:`parts` of the same storage in; shapes are checked by the caller."""
        for name, tensor in self._parts.items():
            tensor.copy_(parts[name])
