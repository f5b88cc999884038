"""Per-sample buffers indexed by dataset index, with visit counts and checkpointable state.

A buffer holds the rows of one :class:`~lightning_noisy.state.layout.RowLayout` block: all ``N`` rows
(the default, and every rank of a replicated run) or the ``[start, stop)`` block a rank owns when the
state is sharded. Indices are always dataset indices; a write outside the block is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.storage import RowParts, RowStore, chunk_rows



def _check_index(index: Tensor, num_samples: int, low: int = 0, high: int | None = None) -> Tensor:
    """``index`` as int64 after checking it is ``[M]`` integer with values in ``[0, num_samples)``; with
    ``low``/``high`` also in ``[low, high)`` (a rank's block), else a ValueError. One reduction, one host sync."""
    if index.ndim != 1 or index.is_floating_point():
        raise ValueError(f"index must be a 1-D integer tensor, got dtype {index.dtype} and shape {tuple(index.shape)}")
    index = index.to(torch.long)
    if not index.numel():
        return index
    least, most = (int(v) for v in torch.aminmax(index))
    if least < 0 or most >= num_samples:
        raise ValueError(f"index values must be in [0, {num_samples}), got min {least} and max {most}")
    if least < low or (high is not None and most >= high):
        raise ValueError(
            f"index values must be in this rank's rows [{low}, {high}), got min {least} and max {most}: "
            "send records to their owner first"
        )
    return index


def _layout(num_samples: int, layout: RowLayout | None) -> RowLayout:
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if layout is None:
        return RowLayout(int(num_samples))
    if layout.num_samples != int(num_samples):
        raise ValueError(f"the layout is of {layout.num_samples} samples, the buffer of {num_samples}")
    return layout


def _storage_of(store: RowStore) -> dict[str, Any]:
    return {"storage_dtype": str(store.dtype).removeprefix("torch."), "storage_topk": store.topk}


class _Rows:
    """What buffers and histories share: the block of rows owned, index checks and checkpoint rows."""

    def __init__(
        self,
        num_samples: int,
        value_shape: tuple[int, ...],
        device: torch.device | str,
        layout: RowLayout | None,
        window: int | None = None,
    ) -> None:
        if window is not None and int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.layout = _layout(num_samples, layout)
        self.num_samples = int(num_samples)
        self.value_shape = tuple(int(d) for d in value_shape)
        self.visits = torch.zeros(self.layout.num_rows, dtype=torch.long, device=device)

    @property
    def start(self) -> int:
        """First dataset index of the rows held."""
        return self.layout.start

    @property
    def index(self) -> Tensor:
        """``[R]`` int64 dataset indices of the rows held (``arange(start, stop)``)."""
        return torch.arange(self.layout.start, self.layout.stop)

    def chunks(self) -> Iterator[Tensor]:
        """``[U]`` dataset indices of the rows held, a chunk of at most 2^24 values at a time (bounded copies)."""
        step = chunk_rows(self.value_shape)
        for begin in range(0, self.layout.num_rows, step):
            yield torch.arange(begin, min(begin + step, self.layout.num_rows)) + self.layout.start

    def _local(self, index: Tensor) -> Tensor:
        """Row numbers in the block of the dataset indices ``index``; refused outside the block."""
        start, stop = self.layout.start, self.layout.stop
        index = _check_index(index, self.num_samples, start, stop)
        return index - start if start else index

    def _unique_rows(self, index: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Row numbers of the distinct samples ``index [U]``, checked against values of ``shape``."""
        rows = self._local(index)
        if tuple(shape) != (rows.shape[0], *self.value_shape):
            raise ValueError(f"values must have shape {(rows.shape[0], *self.value_shape)}, got {tuple(shape)}")
        if rows.unique().numel() != rows.numel():
            raise ValueError("index must not repeat a sample; reduce duplicates first (see reduce_by_index)")
        return rows.to(self.visits.device)

    def _check_rows(self, state: dict[str, Any], name: str, storage: dict[str, Any]) -> None:
        got = (int(state.get("num_samples", -1)), tuple(state.get("value_shape", ())))
        if got != (self.num_samples, self.value_shape):
            raise ValueError(
                f"cannot load {name} state with num_samples={got[0]} and value_shape={got[1]} into a buffer with "
                f"num_samples={self.num_samples} and value_shape={self.value_shape}: the checkpoint is from another data set"
            )
        saved = {key: state.get(key, storage[key]) for key in storage}
        if saved != storage:
            raise ValueError(f"cannot load {name} state stored as {saved} into a buffer stored as {storage}")
        start, stop = int(state.get("start", 0)), int(state.get("stop", self.num_samples))
        if start > self.layout.start or stop < self.layout.stop:
            raise ValueError(
                f"the {name} state holds rows [{start}, {stop}), which do not cover this rank's rows "
                f"[{self.layout.start}, {self.layout.stop})"
            )

    def _rows_of(self, state: dict[str, Any], tensor: Tensor, dim: int = 0) -> Tensor:
        """This block's rows of a saved ``tensor`` whose rows start at ``state['start']``."""
        begin = self.layout.start - int(state.get("start", 0))
        return tensor.narrow(dim, begin, self.layout.num_rows)

    def _header(self, store: RowStore) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "value_shape": self.value_shape, "start": self.layout.start,
                "stop": self.layout.stop, **_storage_of(store)}


class SampleBuffer(_Rows):
    """One value per training sample: ``values [R, *S]`` and ``visits [R]`` for the rows held.

    Args:
        num_samples: ``N``, the size of the training set.
        value_shape: ``S``: ``()`` for a scalar per sample, ``(C,)`` for a class vector.
        dtype: storage dtype (choose ``float16``/``bfloat16`` to halve the memory of large ``N x C`` buffers).
        fill: initial value of every sample: a scalar, a ``[R, *S]`` tensor of the rows held, or a function of
            dataset indices ``[U]`` returning their ``[U, *S]`` values (evaluated a chunk of rows at a time).
        device: storage device; CPU by default so the buffer never competes with the model for GPU memory.
        layout: the block of rows held; all ``N`` when ``None``.
        topk: store ``[C]`` rows as their ``k`` largest entries, renormalised (see :mod:`~lightning_noisy.state.storage`).
    """

    def __init__(
        self,
        num_samples: int,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        fill: float | Tensor | Callable[[Tensor], Tensor] = 0.0,
        device: torch.device | str = "cpu",
        layout: RowLayout | None = None,
        topk: int | None = None,
    ) -> None:
        super().__init__(num_samples, value_shape, device, layout)
        if callable(fill) and not isinstance(fill, Tensor):
            start, fill_indices = self.layout.start, fill
            fill = lambda rows: fill_indices(rows + start)  # noqa: E731  (row numbers -> dataset indices)
        self.store = RowStore(self.layout.num_rows, self.value_shape, dtype, topk, fill, device)

    @property
    def values(self) -> Tensor:
        """``[R, *S]`` the rows held: float32 for 16-bit float or top-k storage (a decoded copy), else the
        stored tensor itself."""
        return self.store.read()

    def read(self, index: Tensor) -> Tensor:
        """``[U, *S]`` values of the samples ``index [U]`` (in this block)."""
        return self.store.read(self._local(index))

    def read_parts(self, index: Tensor) -> dict[str, Tensor]:
        """The stored form of the rows of ``index [U]`` (in this block), as a fetch sends them."""
        return self.store.parts_of(self._local(index))

    def write(self, index: Tensor, values: Tensor, mode: Literal["replace", "add"] = "replace") -> None:
        """Write ``values [U, *S]`` for the unique samples ``index [U]`` and count one visit each.

        Everything is checked before anything is written, so a failed call leaves the buffer unchanged.
        """
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
        rows = self._unique_rows(index, values.shape)
        self.store.write(rows, values, add=mode == "add")
        self.visits[rows] += 1

    @property
    def visited(self) -> Tensor:
        """``[R]`` bool: samples written at least once."""
        return self.visits > 0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows and visit counts."""
        return self.store.nbytes + self.visits.numel() * self.visits.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {**self._header(self.store), **{k: v.clone() for k, v in self.store.parts().items()},
                "visits": self.visits.clone()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` is of another ``N``, shape or storage, or misses rows held; changes nothing."""
        self._check_rows(state, "SampleBuffer", _storage_of(self.store))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows held from a :meth:`state_dict` holding them (of any block layout).

        A state of another ``N``, shape or storage is rejected with nothing changed.
        """
        self.check_state_dict(state)
        self.store.load_parts({k: self._rows_of(state, state[k]) for k in self.store.parts()})
        self.visits.copy_(self._rows_of(state, state["visits"]))


class SampleHistory(_Rows):
    """The last ``window`` values of every sample: a ring of ``window`` stores of ``[R, *S]``, advanced per sample.

    Each sample has its own write position (its visit count modulo ``window``), so a sample missed in an
    epoch (``drop_last``) keeps its older entries and its average stays over values it really had.

    Args:
        num_samples: ``N``.
        window: ``K``, how many past values are kept per sample.
        value_shape: ``S`` of one value.
        dtype: storage dtype (the history is ``K x N x C`` values: ``bfloat16`` halves it).
        device: storage device, CPU by default.
        layout: the block of rows held; all ``N`` when ``None``.
        topk: store each ``[C]`` entry as its ``k`` largest values, renormalised.
    """

    def __init__(
        self,
        num_samples: int,
        window: int,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: RowLayout | None = None,
        topk: int | None = None,
    ) -> None:
        super().__init__(num_samples, value_shape, device, layout, window)
        self.window = int(window)
        rows = self.layout.num_rows
        self.slots = [RowStore(rows, self.value_shape, dtype, topk, 0.0, device) for _ in range(self.window)]

    @property
    def entries(self) -> Tensor:
        """``[window, R, *S]`` the stored values, decoded (a copy)."""
        return torch.stack([slot.read() for slot in self.slots])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored ring and visit counts."""
        return sum(slot.nbytes for slot in self.slots) + self.visits.numel() * self.visits.element_size()

    def append(self, index: Tensor, values: Tensor) -> None:
        """Append ``values [U, *S]`` for the unique samples ``index [U]``; all-or-nothing."""
        rows = self._unique_rows(index, values.shape)
        self._append_parts(rows, self.slots[0].codec.encode(values))

    def append_parts(self, index: Tensor, parts: RowParts) -> None:
        """:meth:`append` of values already in this history's stored form (``RowCodec.encode``), written as is."""
        rows = self._unique_rows(index, (next(iter(parts.values())).shape[0], *self.value_shape))
        self._append_parts(rows, parts)

    def _append_parts(self, rows: Tensor, parts: RowParts) -> None:
        slot_of_row = self.visits[rows] % self.window
        for slot in slot_of_row.unique().tolist():  # at most `window` slots, never a loop over samples
            chosen = slot_of_row == slot
            self.slots[slot].write_parts(rows[chosen], {name: part[chosen.to(part.device)] for name, part in parts.items()})
        self.visits[rows] += 1

    def mean(self, index: Tensor | None = None) -> Tensor:
        """Mean over the stored values of each sample (up to ``window``): ``[R, *S]`` (or ``[U, *S]``) in float32.

        A sample never visited gets zeros; check :attr:`visits` to tell.
        """
        rows = None if index is None else self._local(index)
        visits = self.visits if rows is None else self.visits[rows]
        count = visits.clamp(max=self.window, min=1).to(torch.float32)
        total = torch.zeros((visits.shape[0], *self.value_shape), dtype=torch.float32, device=visits.device)
        for slot in self.slots:  # in slot order; slots never written are zero
            slot.add_to(total, rows)
        return total / count.view(-1, *([1] * len(self.value_shape)))

    def state_dict(self) -> dict[str, Any]:
        # rows first ([R, window, ...]) like every other row tensor of a state, so blocks concatenate on dim 0
        parts = {name: torch.stack([slot.parts()[name] for slot in self.slots], 1) for name in self.slots[0].parts()}
        return {**self._header(self.slots[0]), "window": self.window, **parts, "visits": self.visits.clone()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` is of another ``N``, shape, storage or window; changes nothing."""
        if state.get("running", False):
            raise ValueError("cannot load a running mean (history='running') into a ring of the last values (history='ring')")
        self._check_rows(state, "SampleHistory", _storage_of(self.slots[0]))
        if int(state["window"]) != self.window:
            raise ValueError(f"cannot load a history with window={state['window']} into one with window={self.window}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows held from a :meth:`state_dict` holding them; a mismatch changes nothing."""
        self.check_state_dict(state)
        for position, slot in enumerate(self.slots):
            slot.load_parts({name: self._rows_of(state, state[name])[:, position] for name in slot.parts()})
        self.visits.copy_(self._rows_of(state, state["visits"]))


class SampleRunningMean(_Rows):
    """The mean of each sample's last ``window`` values in running form: one store of ``[R, *S]``, not ``window``.

    A sample's first ``window`` values are averaged exactly (the mean moves by ``(v - mean) / visits``);
    each later value moves it by ``(v - mean) / window``, an exponential moving average of weight
    ``1 / window`` instead of the ring's window of exactly the last ``window`` values. With storage in
    ``bfloat16`` each update is rounded once, an error below ``window * 2^-9`` of the value in steady state.

    Args:
        num_samples: ``N``.
        window: ``K``.
        value_shape: ``S`` of one value.
        dtype: storage dtype.
        device: storage device, CPU by default.
        layout: the block of rows held; all ``N`` when ``None``.
        topk: store the running mean of ``[C]`` rows as its ``k`` largest entries, renormalised.
    """

    def __init__(
        self,
        num_samples: int,
        window: int,
        value_shape: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: RowLayout | None = None,
        topk: int | None = None,
    ) -> None:
        super().__init__(num_samples, value_shape, device, layout, window)
        self.window = int(window)
        self.store = RowStore(self.layout.num_rows, self.value_shape, dtype, topk, 0.0, device)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored means and visit counts."""
        return self.store.nbytes + self.visits.numel() * self.visits.element_size()

    def append(self, index: Tensor, values: Tensor) -> None:
        """Move the means of the unique samples ``index [U]`` towards ``values [U, *S]``; all-or-nothing."""
        rows = self._unique_rows(index, values.shape)
        step = chunk_rows(self.value_shape)
        for begin in range(0, rows.shape[0], step):  # bounded float32 working copies
            chunk = rows[begin : begin + step]
            weight = (self.visits[chunk] + 1).clamp(max=self.window).to(torch.float32)
            mean = self.store.read(chunk)
            change = values[begin : begin + step].to(mean.device, torch.float32) - mean
            self.store.write(chunk, mean + change / weight.view(-1, *([1] * len(self.value_shape))))
            self.visits[chunk] += 1

    def append_parts(self, index: Tensor, parts: RowParts) -> None:
        """:meth:`append` of values in this store's stored form (decoded here, a chunk at a time)."""
        step = chunk_rows(self.value_shape)
        for begin in range(0, index.shape[0], step):
            piece = {name: part[begin : begin + step] for name, part in parts.items()}
            self.append(index[begin : begin + step], self.store.decode(piece))

    def mean(self, index: Tensor | None = None) -> Tensor:
        """``[R, *S]`` (or ``[U, *S]``) float32 running means; zeros for a sample never visited."""
        return self.store.read(None if index is None else self._local(index))

    def state_dict(self) -> dict[str, Any]:
        parts = {name: tensor.clone() for name, tensor in self.store.parts().items()}
        return {**self._header(self.store), "window": self.window, "running": True, **parts, "visits": self.visits.clone()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` is of another ``N``, shape, storage, window or form; changes nothing."""
        if not state.get("running", False):
            raise ValueError("cannot load a ring of the last values (history='ring') into a running mean (history='running')")
        self._check_rows(state, "SampleRunningMean", _storage_of(self.store))
        if int(state["window"]) != self.window:
            raise ValueError(f"cannot load a running mean with window={state['window']} into one with window={self.window}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rows held from a :meth:`state_dict` holding them; a mismatch changes nothing."""
        self.check_state_dict(state)
        self.store.load_parts({k: self._rows_of(state, state[k]) for k in self.store.parts()})
        self.visits.copy_(self._rows_of(state, state["visits"]))
