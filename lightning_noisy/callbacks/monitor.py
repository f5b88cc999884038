"""NoisyLabelMonitor: what a plain run does with noisy labels, logged under ``noisy/`` each epoch."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, log_histogram
from lightning_noisy.state import SampleBuffer, SampleRecorder, StepContext
from lightning_noisy.state.sharded import gather_scalars
from lightning_noisy.state.storage import StateOptions, StorageDtype


class NoisyLabelMonitor(SampleStateCallback):
    """Logs the noise in the data and how the network's training predictions relate to it.

    Each epoch, from the training forward passes (no extra pass over the data):

    - ``noisy/noisy_label_acc``: share of given labels equal to the clean label;
    - ``noisy/train_pred_acc``: share of training samples whose prediction equals the clean label (the
      "recovery accuracy" of a method that corrects no label, Tanaka et al. 2018);
    - ``noisy/memorized_frac``: share of mislabelled samples predicted as their wrong label;
    - a histogram of the per-sample training loss (``noisy/sample_loss``), split by clean and noisy.

    The ``noisy/*_acc`` figures need the clean labels; without them only the loss histogram is logged.
    :attr:`predictions` and :attr:`losses` hold this rank's rows (all ``N`` unless the state is sharded).

    Args:
        histogram: whether to write the per-sample loss histograms to TensorBoard.
        shard_state: each DDP rank keeps only its block of about ``N / W`` rows (``None``: whenever the
            world size is above 1).
        storage_dtype: dtype of the stored losses.
        storage_topk: must be ``None``: the monitor keeps scalars per sample, not ``[C]`` rows.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        histogram: bool = True,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        if storage_topk is not None:
            raise ValueError(f"storage_topk must be None: NoisyLabelMonitor keeps one loss per sample, got {storage_topk!r}")
        self.histogram = histogram
        self._loss: SampleRecorder | None = None
        self._prediction: SampleRecorder | None = None
        self.predictions: SampleBuffer | None = None
        self.losses: SampleBuffer | None = None

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        layout = self.row_layout(trainer, labels.num_samples)
        self._loss = SampleRecorder((), self.state_options.dtype)
        self._prediction = SampleRecorder((), torch.long)
        self.predictions = SampleBuffer(labels.num_samples, (), torch.long, fill=-1, layout=layout)
        self.losses = SampleBuffer(labels.num_samples, (), self.state_options.dtype, fill=0.0, layout=layout)

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
        device, layout = trainer.strategy.root_device, self.losses.layout
        loss_index, loss, _ = self._loss.gather(device, reduction="mean", layout=layout)
        self.losses.write(loss_index, loss)
        index, prediction, _ = self._prediction.gather(device, reduction="first", layout=layout)
        finite = torch.isin(index, loss_index)  # a sample whose loss was non-finite keeps its last prediction too
        self.predictions.write(index[finite], prediction[finite])
        labels, rows = self.training_labels, self.losses.index
        seen, losses = self.predictions.visited, self.losses.values
        if labels.clean is not None:
            noisy, clean, predictions = labels.noisy[rows], labels.clean[rows], self.predictions.values
            is_noisy = noisy != clean
            wrong = is_noisy & seen
            counts = torch.stack([
                (~is_noisy).sum(), seen.sum(), (predictions[seen] == clean[seen]).sum(), wrong.sum(),
                (predictions[wrong] == noisy[wrong]).sum(),
            ])
            counts = self.sum_over_shards(trainer, layout, counts).float()
            metrics = {"noisy/noisy_label_acc": counts[0] / labels.num_samples, "noisy/train_pred_acc": counts[2] / counts[1]}
            if counts[3] > 0:
                metrics["noisy/memorized_frac"] = counts[4] / counts[3]
            self.log_epoch_metrics(pl_module, metrics)
            if self.histogram:
                clean_losses = gather_scalars(losses[seen & ~is_noisy], layout.is_sharded, device)
                noisy_losses = gather_scalars(losses[seen & is_noisy], layout.is_sharded, device)
                log_histogram(trainer, "noisy/sample_loss_clean", clean_losses)
                log_histogram(trainer, "noisy/sample_loss_noisy", noisy_losses)
        elif self.histogram:
            log_histogram(trainer, "noisy/sample_loss", gather_scalars(losses[seen], layout.is_sharded, device))

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer]:
        if self.predictions is None or self.losses is None:
            return {}
        return {"predictions": self.predictions, "losses": self.losses}

    @override
    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        return {"loss": self._loss, "prediction": self._prediction}
