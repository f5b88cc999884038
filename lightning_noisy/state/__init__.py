"""Per-sample state gathered across DDP ranks, and the batch contract the callbacks share."""

from lightning_noisy.state.batch import LOGITS_KEY, BatchContract, StepContext
from lightning_noisy.state.buffer import SampleBuffer, SampleHistory, SampleRunningMean
from lightning_noisy.state.fetch import RowFetcher, planned_batches
from lightning_noisy.state.gather import all_gather_uneven, is_distributed
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.records import REDUCTIONS, Reduction, SampleRecorder, reduce_by_index
from lightning_noisy.state.sharded import gather_rows, state_on_rank_zero
from lightning_noisy.state.storage import STORAGE_DTYPES, RowCodec, RowStore, StateOptions, StorageDtype

__all__ = [
    "LOGITS_KEY",
    "REDUCTIONS",
    "STORAGE_DTYPES",
    "BatchContract",
    "Reduction",
    "RowCodec",
    "RowFetcher",
    "RowLayout",
    "RowStore",
    "SampleBuffer",
    "SampleHistory",
    "SampleRecorder",
    "SampleRunningMean",
    "StateOptions",
    "StepContext",
    "StorageDtype",
    "all_gather_uneven",
    "gather_rows",
    "is_distributed",
    "planned_batches",
    "reduce_by_index",
    "state_on_rank_zero",
]
