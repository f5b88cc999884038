"""The state engine under 2-process CPU DDP (gloo): same records, same buffers, whatever the split."""

import pytest
import torch

from distributed import run_distributed
from lightning_noisy.state import SampleBuffer, SampleRecorder, all_gather_uneven

pytestmark = pytest.mark.ddp

N, C = 23, 3


def _records() -> tuple[torch.Tensor, torch.Tensor]:
    """Records of one epoch as DistributedSampler makes them for 2 ranks: N=23 padded to 24 (index 5 twice)."""
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(N, generator=generator)
    index = torch.cat([order, order[:1]])  # the padding repeats the first index of the permutation
    values = torch.rand(index.shape[0], C, generator=generator)
    return index, values


def _single_process_buffer(reduction: str) -> SampleBuffer:
    index, values = _records()
    recorder = SampleRecorder((C,))
    # rank order: rank 0 gets positions 0, 2, 4, ...; rank 1 gets 1, 3, 5, ... (DistributedSampler's striding)
    recorder.add(index[0::2], values[0::2])
    recorder.add(index[1::2], values[1::2])
    buffer = SampleBuffer(N, (C,), fill=-1.0)
    unique, reduced, _ = recorder.gather(reduction=reduction)  # type: ignore[arg-type]
    buffer.write(unique, reduced)
    return buffer


def _check_two_ranks(rank: int, world_size: int, reduction: str, expected: SampleBuffer) -> None:
    index, values = _records()
    recorder = SampleRecorder((C,))
    # uneven batches per rank: rank 0 records in batches of 5, rank 1 in one batch
    mine_index, mine_values = index[rank::world_size], values[rank::world_size]
    for start in range(0, mine_index.shape[0], 5 if rank == 0 else 100):
        recorder.add(mine_index[start : start + 5 if rank == 0 else None], mine_values[start : start + 5 if rank == 0 else None])
    buffer = SampleBuffer(N, (C,), fill=-1.0)
    unique, reduced, counts = recorder.gather(reduction=reduction)  # type: ignore[arg-type]
    buffer.write(unique, reduced)
    assert torch.equal(buffer.values, expected.values), f"rank {rank}: buffer differs from the single-process one"
    assert torch.equal(buffer.visits, torch.ones(N, dtype=torch.long)), "every index visited exactly once"
    assert int(counts.sum()) == N + 1 and int(counts.max()) == 2  # the padded duplicate, not double-counted


def _check_uneven_gather(rank: int, world_size: int) -> None:
    mine = torch.arange(rank * 10, rank * 10 + 3 + 4 * rank, dtype=torch.float32)  # 3 and 7 elements
    parts = all_gather_uneven(mine)
    assert [p.tolist() for p in parts] == [[0.0, 1.0, 2.0], [10.0 + i for i in range(7)]]
    empty = all_gather_uneven(torch.empty(0, 2) if rank == 0 else torch.ones(2, 2))
    assert [tuple(p.shape) for p in empty] == [(0, 2), (2, 2)]


def _check_all(rank: int, world_size: int, expected: dict[str, SampleBuffer]) -> None:
    for reduction, buffer in expected.items():
        _check_two_ranks(rank, world_size, reduction, buffer)
    _check_uneven_gather(rank, world_size)


def test_two_ranks_equal_one_process_and_uneven_gather() -> None:
    """One spawn (process start-up dominates): both duplicate rules, then uneven and empty gathers."""
    run_distributed(_check_all, {r: _single_process_buffer(r) for r in ("mean", "first")})
