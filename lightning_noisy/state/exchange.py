"""Moving per-sample rows between ranks with ``torch.distributed``'s all-to-all, for sharded state.

Three movements, each a collective that every rank calls:

- :func:`send_to_owners`: this rank's records go to the ranks that own their rows (the epoch boundary);
- :func:`fetch_rows`: this rank asks the owners for the rows of given samples (before it trains on them);
- :func:`gather_to_rank_zero`: every block of a state goes to rank 0 (what a checkpoint writes);
- :func:`sum_to_owners`: dense per-rank partial sums, added up for the rows each rank owns.

Received bytes are added to :data:`traffic`, which the benchmarks read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_noisy.state.gather import all_gather_uneven, from_row_bytes, is_distributed, row_bytes
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.storage import RowParts


class Traffic:
    """Bytes this process received through the state engine's collectives (records, rows and gathers)."""

    def __init__(self) -> None:
        self.received_bytes = 0

    def add(self, *tensors: Tensor) -> None:
        self.received_bytes += sum(t.numel() * t.element_size() for t in tensors)


traffic = Traffic()


def _exchange_counts(counts: Tensor) -> Tensor:
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts)
    return received


def _all_to_all(tensor: Tensor, send: list[int], receive: list[int]) -> Tensor:
    """``tensor [sum(send), *S]`` split by ``send`` rows per rank; returns ``[sum(receive), *S]`` in rank order.

    Rows travel as their bytes, so any dtype moves (gloo has no int16, which top-k class indices use).
    """
    as_bytes = row_bytes(tensor)
    out = as_bytes.new_empty((sum(receive), as_bytes.shape[1]))
    dist.all_to_all_single(out, as_bytes, output_split_sizes=receive, input_split_sizes=send)
    traffic.add(out)
    return from_row_bytes(out, tensor.dtype, tuple(tensor.shape[1:]))


def _route(index: Tensor, layout: RowLayout, device: torch.device) -> tuple[Tensor, list[int], list[int]]:
    """Order of ``index`` grouped by owner (stable), rows sent to and received from each rank."""
    owner = layout.owner(index)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=layout.world_size).to(device)
    received = _exchange_counts(counts)
    return order, counts.tolist(), received.tolist()


def send_to_owners(
    index: Tensor, parts: RowParts, layout: RowLayout, device: torch.device | str = "cpu"
) -> tuple[Tensor, RowParts, Tensor]:
    """Send records ``(index [M], parts, each [M, ...])`` to the ranks that own their rows. A collective.

    Returns the records this rank owns, ``(index [M'], parts, source [M'])`` with the rank each came
    from, ordered by source rank and, within one source, in the order it recorded them: the order an
    all-gather would give, restricted to this rank's rows.
    """
    device = torch.device(device)
    order, send, receive = _route(index, layout, device)
    received_index = _all_to_all(index[order].to(device), send, receive).cpu()
    received = {name: _all_to_all(part[order].to(device), send, receive).cpu() for name, part in parts.items()}
    source = torch.repeat_interleave(torch.arange(layout.world_size), torch.tensor(receive, dtype=torch.long))
    return received_index, received, source


def fetch_rows(
    index: Tensor,
    layout: RowLayout,
    read: Callable[[Tensor], dict[str, Tensor]],
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """The stored rows of the samples ``index [M]`` (any ranks' rows), from their owners. A collective.

    Args:
        index: ``[M]`` dataset indices this rank needs.
        layout: who owns which rows.
        read: on the owner, the stored parts (e.g. dense rows, or top-k values and classes) of the
            dataset indices it is asked for, each ``[U, ...]``.
        device: device of the collective (CPU for gloo, CUDA for NCCL).

    Returns:
        The parts of ``index``'s rows, each ``[M, ...]`` in the order of ``index``.
    """
    device = torch.device(device)
    order, send, receive = _route(index, layout, device)
    requests = _all_to_all(index[order].to(device), send, receive).cpu()
    parts = read(requests)
    out: dict[str, Tensor] = {}
    for name, part in parts.items():
        rows = _all_to_all(part.to(device), receive, send).cpu()  # the answers go back the way the requests came
        out[name] = torch.empty_like(rows)
        out[name][order] = rows
    return out


def gather_to_rank_zero(tensor: Tensor, layout: RowLayout, device: torch.device | str = "cpu") -> Tensor | None:
    """The blocks ``[R_r, *S]`` of every rank, concatenated ``[N, *S]`` on rank 0 (``None`` elsewhere). A collective."""
    if not is_distributed():
        return tensor
    device = torch.device(device)
    send = [tensor.shape[0]] + [0] * (layout.world_size - 1)
    receive = layout.block_sizes if layout.rank == 0 else [0] * layout.world_size
    out = _all_to_all(tensor.to(device), send, receive).cpu()
    return out if layout.rank == 0 else None


def sum_to_owners(tensor: Tensor, layout: RowLayout, device: torch.device | str = "cpu") -> Tensor:
    """Every rank's dense ``[N, *S]`` partial sums, added up in rank order. A collective.

    With a sharded layout each rank receives only its block's partial sums from the others (one
    all-to-all) and returns its rows ``[R, *S]``; otherwise every rank receives every partial sum
    (all-gather) and returns all ``[N, *S]``. Both add the ranks' parts in the same order, rank 0 first,
    so a sharded sum equals the replicated one bit for bit (an all-reduce leaves the order to the backend).
    """
    if not is_distributed():
        return tensor[layout.start : layout.stop]
    device = torch.device(device)
    world = dist.get_world_size()
    if layout.is_sharded:
        parts = _all_to_all(tensor.to(device), layout.block_sizes, [layout.num_rows] * world).view(world, layout.num_rows, *tensor.shape[1:])
    else:
        parts = torch.stack(all_gather_uneven(tensor.to(device)))
        traffic.add(parts)
    total = parts[0].clone()
    for part in parts[1:]:  # rank order; a loop over ranks, not samples
        total += part
    return total.to(tensor.device)
