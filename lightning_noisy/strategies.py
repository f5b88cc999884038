"""DDP whose checkpoints write the sharded per-sample state with ``torch.distributed.checkpoint``."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from lightning_noisy.state.checkpoint import sample_state_directory, split_local_rows


class ShardedStateDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy, with sharded per-sample state written by every rank, not gathered on rank 0.

    With the default strategies a checkpoint gathers each sharded per-sample buffer on rank 0, which
    writes the file: rank 0 then holds the whole ``N x C`` table for a moment. With this strategy each rank
    writes the rows it owns with ``torch.distributed.checkpoint`` into ``<checkpoint>.sample_state/``
    beside the checkpoint file, and the file keeps a placeholder. The model, the optimiser and replicated
    state go into the file as usual. Resuming reads the rows through ``Trainer.fit(ckpt_path=...)`` on any
    world size, with any strategy, one process included; keep the directory with its file.
    ``remove_checkpoint`` (``ModelCheckpoint(save_top_k=...)``) removes both.

    Registered as ``"ddp_sharded_state"`` (one process per device, launched by Lightning, ``torchrun`` or
    SLURM) and ``"ddp_sharded_state_spawn"``. Arguments are :class:`~lightning.pytorch.strategies.DDPStrategy`'s.
    """

    #: callbacks that shard per-sample state leave their rows to the strategy when it says so
    writes_local_rows = True

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        directory = sample_state_directory(filepath)
        nonce = self.broadcast(uuid.uuid4().hex if self.is_global_zero else None)
        checkpoint, rows = split_local_rows(checkpoint, os.path.basename(directory), nonce)
        if rows:  # the same on every rank: every callback shards or none does
            if self.is_global_zero and os.path.isdir(directory):
                shutil.rmtree(directory)  # a checkpoint saved again under the same name (last.ckpt)
            self.barrier("ShardedStateDDPStrategy.save_checkpoint")
            dcp.save(rows, storage_writer=dcp.FileSystemWriter(directory))
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(sample_state_directory(filepath), ignore_errors=True)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("ddp_sharded_state", "popen"), ("ddp_sharded_state_spawn", "spawn")):
            strategy_registry.register(
                name, cls, description=f"DDP with sharded per-sample state in checkpoints, `start_method` '{start_method}'",
                start_method=start_method,
            )


ShardedStateDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["ShardedStateDDPStrategy"]
