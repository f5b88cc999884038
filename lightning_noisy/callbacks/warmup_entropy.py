"""DivideMix's warm-up confidence penalty (Li, Socher, Hoi, ICLR 2020), as a callback.

During warm-up on asymmetric noise DivideMix adds the negative entropy of the predictions to the
cross-entropy, which penalises confident (low-entropy) predictions so the network does not fit the
noisy labels too early::

    loss = CE + weight * (1/B) sum_i sum_c p_ic log p_ic,    p_i = softmax(z_i)

:class:`WarmupEntropyCallback` adds that term to the loss of an unmodified module through the batch
contract during epochs ``< warmup_epochs``, and logs the mean prediction entropy of every epoch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels
from lightning_noisy.losses._targets import check_finite_non_negative
from lightning_noisy.state import StepContext


def negative_entropy(logits: Tensor) -> Tensor:
    """``(1/B) sum_i sum_c p_ic log p_ic`` of ``logits [B, C]``: DivideMix's confidence penalty (a scalar <= 0)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return (log_p.exp() * log_p).sum(1).mean()


class WarmupEntropyCallback(SampleStateCallback):
    """Adds DivideMix's confidence penalty to the training loss during warm-up.

    For epochs ``< warmup_epochs`` the loss of every training step becomes
    ``loss + weight * mean_i sum_c p_ic log p_ic`` (the negative prediction entropy, so minimising it
    raises the entropy). The term is added through the batch contract, inside the same autocast and DDP
    context as the module's own loss; the module must produce its logits by calling itself (or return
    them under ``"logits"``). Afterwards the loss is left unchanged.

    Logged each epoch: ``noisy/prediction_entropy``, the mean entropy of the training predictions
    (averaged over all ranks), and ``warmup/confidence_penalty`` while the penalty is active.

    Args:
        warmup_epochs: number of epochs (from epoch 0) during which the penalty is added, ``>= 0`` (DivideMix:
            10 on CIFAR-10, the default; 30 on CIFAR-100). :class:`CoDivideCallback`'s default start divides at
            the end of the last of these epochs.
        weight: factor of the penalty, finite and ``>= 0`` (DivideMix: 1.0).
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(self, warmup_epochs: int = 10, weight: float = 1.0, key: str | None = None) -> None:
        super().__init__(key=key)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        check_finite_non_negative("weight", weight)
        self.warmup_epochs = warmup_epochs
        self.weight = float(weight)
        self._active = False
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._entropy_count = 0

    def active(self, epoch: int) -> bool:
        """Whether the penalty is added during ``epoch``."""
        return epoch < self.warmup_epochs

    def penalty(self, context: StepContext) -> Tensor | None:
        """The loss term of the step: ``weight * negative_entropy(logits)``, or ``None`` after warm-up."""
        if not self._active or context.logits is None:
            return None
        return self.weight * negative_entropy(context.logits)

    # -- hooks ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.contract is not None:
            self.contract.add_loss_term(self, "confidence_penalty", self.penalty)

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._entropy_count = 0

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self._active = self.active(trainer.current_epoch)

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self._active = False
        if context.logits is None:
            return
        with torch.no_grad():
            entropy = -negative_entropy(context.logits.detach()) * context.batch_size
        self._entropy_sum = self._entropy_sum + entropy.double().cpu()
        self._entropy_count += context.batch_size

    @override
    def on_skipped_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._entropy_count = 0

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        totals = torch.stack([self._entropy_sum, torch.tensor(float(self._entropy_count), dtype=torch.float64)])
        totals = trainer.strategy.reduce(totals.to(device), reduce_op="sum").cpu()
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._entropy_count = 0
        if float(totals[1]) <= 0:
            return
        metrics = {"noisy/prediction_entropy": (totals[0] / totals[1]).float()}
        if self.active(trainer.current_epoch):
            metrics["warmup/confidence_penalty"] = (-totals[0] / totals[1] * self.weight).float()
        self.log_epoch_metrics(pl_module, metrics)

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"warmup_epochs": self.warmup_epochs, "weight": self.weight}
