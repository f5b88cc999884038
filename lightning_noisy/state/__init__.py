"""Per-sample state gathered across DDP ranks, and the batch contract the callbacks share."""

from lightning_noisy.state.batch import LOGITS_KEY, BatchContract, StepContext
from lightning_noisy.state.buffer import SampleBuffer, SampleHistory
from lightning_noisy.state.gather import all_gather_uneven, is_distributed
from lightning_noisy.state.records import REDUCTIONS, Reduction, SampleRecorder, reduce_by_index

__all__ = [
    "LOGITS_KEY",
    "REDUCTIONS",
    "BatchContract",
    "Reduction",
    "SampleBuffer",
    "SampleHistory",
    "SampleRecorder",
    "StepContext",
    "all_gather_uneven",
    "is_distributed",
    "reduce_by_index",
]
