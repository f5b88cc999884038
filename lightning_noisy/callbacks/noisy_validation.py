"""Score a model on a held-out split of the noisy training data: model selection without clean labels."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import log_epoch
from lightning_noisy.models.mode import evaluating


class NoisyValidationScore(Callback):
    """After each validation epoch, logs the model's accuracy on the DataModule's noisy validation split.

    The split holds training samples with their *noisy* labels, kept out of training
    (``noisy_val_fraction`` of the package's DataModules). Under class-conditional noise the accuracy on
    noisy labels ranks models as the clean accuracy does (Chen et al., "Robustness of Accuracy Metric and
    its Inspirations in Learning with Noisy Labels", AAAI 2021), so it can choose a method and its settings
    where no clean label exists. The prediction is ``argmax pl_module(x)``, eval mode, no gradient.

    Logged: ``noisy_val/acc`` (against the noisy labels) and, when the split's clean labels are known,
    ``noisy/noisy_val_clean_acc``, for measurement only. :attr:`predictions` keeps the ``[M]`` predicted
    classes of the last epoch, :attr:`history` the score of every epoch. Every DDP rank scores the whole
    split (it is small), so all ranks hold the same values.

    Args:
        monitor: the name the score is logged under.
    """

    def __init__(self, monitor: str = "noisy_val/acc") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty string, got {monitor!r}")
        self.monitor = monitor
        self.predictions: Tensor | None = None
        self.history: list[float] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        make = getattr(trainer.datamodule, "noisy_val_dataloader", None)
        if not callable(make):
            raise ValueError(
                "NoisyValidationScore needs a DataModule with noisy_val_dataloader(), such as the package's "
                f"with noisy_val_fraction > 0; got {type(trainer.datamodule).__name__}"
            )
        self.history = []

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        noisy, clean = datamodule.noisy_val_labels
        predictions = self._predict(pl_module, datamodule.noisy_val_dataloader())
        self.predictions = predictions
        score = (predictions == noisy).float().mean()
        self.history.append(float(score))
        log_epoch(pl_module, self.monitor, score)
        if clean is not None:
            log_epoch(pl_module, "noisy/noisy_val_clean_acc", (predictions == clean).float().mean())

    @staticmethod
    def _predict(pl_module: pl.LightningModule, loader: torch.utils.data.DataLoader) -> Tensor:
        """``[M]`` int64 predicted classes (CPU) of the loader's inputs, in order."""
        parts = []
        with torch.no_grad(), evaluating(pl_module):
            for x, _ in loader:
                parts.append(pl_module(x.to(pl_module.device)).argmax(1).cpu())
        return torch.cat(parts)
