"""Whole-table views of sharded buffers: on demand, as collectives, and said to be so."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_noisy.state.buffer import SampleBuffer, SampleHistory
from lightning_noisy.state.exchange import gather_to_rank_zero
from lightning_noisy.state.gather import all_gather_uneven, is_distributed


def _require_group(buffer: SampleBuffer | SampleHistory) -> None:
    if not is_distributed():
        raise RuntimeError(
            f"this state is sharded over {buffer.layout.world_size} ranks and no process group is running to "
            "gather it: read it during the fit (on every rank), use the per-shard accessor, or pass shard_state=False"
        )


def gather_rows(buffer: SampleBuffer, device: torch.device | str = "cpu") -> Tensor:
    """``[N, *S]`` every row of ``buffer`` on every rank. For a sharded buffer a collective (call on every rank)
    that moves the whole table to each rank; a replicated buffer's rows are returned as they are."""
    if not buffer.layout.is_sharded:
        return buffer.values
    _require_group(buffer)
    device = torch.device(device)
    parts = {name: torch.cat(all_gather_uneven(part.to(device))).cpu() for name, part in buffer.store.parts().items()}
    return buffer.store.decode(parts)


def gather_scalars(values: Tensor, sharded: bool, device: torch.device | str = "cpu") -> Tensor:
    """``[N]`` from every rank's block ``[R]`` of a per-sample scalar (for histograms); as is when not sharded."""
    if not sharded:
        return values
    return torch.cat(all_gather_uneven(values.to(torch.device(device)))).cpu()


def state_on_rank_zero(buffer: SampleBuffer | SampleHistory, device: torch.device | str = "cpu") -> dict[str, Any]:
    """:meth:`state_dict` of the whole table on rank 0 (each block sent once, to rank 0 only); the other ranks
    get their own block's state. A collective for a sharded buffer: call on every rank."""
    state = buffer.state_dict()
    if not buffer.layout.is_sharded:
        return state
    _require_group(buffer)
    rows = {key: value for key, value in state.items() if isinstance(value, Tensor)}  # every tensor leads with rows
    gathered = {key: gather_to_rank_zero(value, buffer.layout, device) for key, value in rows.items()}
    if buffer.layout.rank != 0:
        return state
    return {**state, **gathered, "start": 0, "stop": buffer.num_samples}
