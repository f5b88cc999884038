"""NoisyLabelMonitor: what a plain run does with noisy labels, logged under ``noisy/`` each epoch."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, log_histogram
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, StepContext


class NoisyLabelMonitor(SampleStateCallback):
    """Logs the noise in the data and how the network's training predictions relate to it.

    Each epoch, from the training forward passes (no extra pass over the data):

    - ``noisy/noisy_label_acc``: share of given labels equal to the clean label;
    - ``noisy/train_pred_acc``: share of training samples whose prediction equals the clean label (the
      "recovery accuracy" of a method that corrects no label, Tanaka et al. 2018);
    - ``noisy/memorized_frac``: share of mislabelled samples predicted as their wrong label;
    - a histogram of the per-sample training loss (``noisy/sample_loss``), split by clean and noisy.

    The ``noisy/*_acc`` figures need the clean labels; without them only the loss histogram is logged.

    Args:
        histogram: whether to write the per-sample loss histograms to TensorBoard.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(self, histogram: bool = True, key: str | None = None) -> None:
        super().__init__(key=key)
        self.histogram = histogram
        self._loss: SampleRecorder | None = None
        self._prediction: SampleRecorder | None = None
        self.predictions: SampleBuffer | None = None
        self.losses: SampleBuffer | None = None

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        self._loss = SampleRecorder((), torch.float32)
        self._prediction = SampleRecorder((), torch.long)
        self.predictions = SampleBuffer(labels.num_samples, (), torch.long, fill=-1)
        self.losses = SampleBuffer(labels.num_samples, (), torch.float32, fill=float("nan"))

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert self._loss is not None and self._prediction is not None and context.logits is not None
        logits = context.logits.detach().float()
        # the batch's own targets are the given labels, already on the device (read before any substitution)
        self._loss.add(context.index, F.cross_entropy(logits, context.targets, reduction="none"))
        self._prediction.add(context.index, logits.argmax(1))

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._loss is not None and self._prediction is not None
        assert self.predictions is not None and self.losses is not None and self.training_labels is not None
        device = trainer.strategy.root_device
        index, loss, _ = self._loss.gather(device, reduction="mean")
        self.losses.write(index, loss)
        index, prediction, _ = self._prediction.gather(device, reduction="first")
        self.predictions.write(index, prediction)
        labels = self.training_labels
        if labels.clean is not None:
            seen = self.predictions.visited
            is_noisy = labels.noisy != labels.clean
            metrics = {
                "noisy/noisy_label_acc": (~is_noisy).float().mean(),
                "noisy/train_pred_acc": (self.predictions.values[seen] == labels.clean[seen]).float().mean(),
            }
            if bool((is_noisy & seen).any()):
                wrong = is_noisy & seen
                metrics["noisy/memorized_frac"] = (self.predictions.values[wrong] == labels.noisy[wrong]).float().mean()
            self.log_epoch_metrics(pl_module, metrics)
            if self.histogram:
                log_histogram(trainer, "noisy/sample_loss_clean", self.losses.values[seen & ~is_noisy])
                log_histogram(trainer, "noisy/sample_loss_noisy", self.losses.values[seen & is_noisy])
        elif self.histogram:
            log_histogram(trainer, "noisy/sample_loss", self.losses.values[self.losses.visited])

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        if self.predictions is None or self.losses is None:
            return {}
        return {"predictions": self.predictions, "losses": self.losses}
