"""Small real pieces the Lightning tests share: a separable toy data set and an unmodified classifier."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_noisy.data import NoisyLabelDataset, TensorPairDataset
from lightning_noisy.strategies import ShardedStateDDPStrategy

NUM_FEATURES, NUM_CLASSES = 4, 3


def toy_dataset(n: int = 24, noisy_every: int = 4, seed: int = 0, return_index: bool = True) -> NoisyLabelDataset:
    """``n`` Gaussian blobs of 3 classes; every ``noisy_every``-th label shifted to the next class."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, NUM_FEATURES, generator=generator) * 0.3 + F.one_hot(clean, NUM_FEATURES).float() * 2
    noisy = clean.clone()
    noisy[::noisy_every] = (clean[::noisy_every] + 1) % NUM_CLASSES
    return NoisyLabelDataset(TensorPairDataset(x, clean), noisy, clean, NUM_CLASSES, return_index=return_index)


def toy_loader(dataset: NoisyLabelDataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class PlainClassifier(pl.LightningModule):
    """A module as users write it: ``x, y = batch`` and cross-entropy; it knows nothing of the package.

    It remembers what ``training_step`` received and what ``forward`` returned, for the tests to compare.
    """

    def __init__(self, lr: float = 0.1, call_self: bool = True) -> None:
        super().__init__()
        self.net = nn.Linear(NUM_FEATURES, NUM_CLASSES)
        self.lr = lr
        self.call_self = call_self
        self.received_targets: list[Tensor] = []
        self.forward_outputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        self.forward_outputs.append(out)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.received_targets.append(y.detach().clone())
        logits = self(x) if self.call_self else self.net(x)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LossProbe(pl.Callback):
    """Keeps the loss each training step returned, by epoch."""

    def __init__(self) -> None:
        self.losses: dict[int, list[Tensor]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.setdefault(trainer.current_epoch, []).append(outputs["loss"].detach())


class _ClosesGroup:
    """Destroys the process group when a spawned worker is done with it.

    Lightning leaves the gloo group alive when a spawned worker returns; the worker then exits with gloo's
    threads still holding work, and interpreter shutdown aborts it now and then (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#190489). Destroying the group after the strategy's own
    teardown closes it while the interpreter is whole.
    """

    def teardown(self) -> None:
        super().teardown()  # type: ignore[misc]
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class SpawnDDPStrategy(_ClosesGroup, DDPStrategy):
    """``ddp_spawn`` that closes its process group; ``timeout`` bounds each collective's wait."""

    def __init__(self, timeout: timedelta = default_pg_timeout) -> None:
        super().__init__(start_method="spawn", timeout=timeout)


class SpawnShardedStateStrategy(_ClosesGroup, ShardedStateDDPStrategy):
    """``ddp_sharded_state_spawn`` that closes its process group."""

    def __init__(self) -> None:
        super().__init__(start_method="spawn")


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer with no checkpoints or logs unless asked."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


N = 10
# softmax outputs per epoch and sample, chosen so the K=2 average is easy to write by hand
TABLE = torch.softmax(torch.randn(4, N, NUM_CLASSES, generator=torch.Generator().manual_seed(3)) * 3, dim=2)


class ScriptedClassifier(PlainClassifier):
    """Predicts TABLE[epoch, sample] exactly (the sample id is the input); ``net`` enters with weight 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x)
        ids = x[:, 0].long() % N
        out = TABLE[self.current_epoch, ids].log() + 0 * self.net(x)
        self.forward_outputs.append(out)
        return out


def scripted_data(n: int = N) -> NoisyLabelDataset:
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4)
    labels = torch.arange(n) % NUM_CLASSES
    return NoisyLabelDataset(TensorPairDataset(x, labels), labels, labels, NUM_CLASSES)
