"""ELRCallback: early-learning regularisation (Liu et al., NeurIPS 2020) for an unmodified classifier."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels
from lightning_noisy.state import SampleBuffer, SampleRecorder, StepContext
from lightning_noisy.state.fetch import RowFetcher, planned_batches
from lightning_noisy.state.storage import StateOptions, StorageDtype

#: the authors' implementation clamps the softmax to [1e-4, 1 - 1e-4] before the target and the term
CLAMP = 1e-4


def clamped_probabilities(logits: Tensor) -> Tensor:
    """``softmax(logits)`` in float32, clamped to ``[1e-4, 1 - 1e-4]`` (not renormalised). ``[B, C]``."""
    return torch.softmax(logits.float(), dim=1).clamp(CLAMP, 1.0 - CLAMP)


def normalised(probabilities: Tensor) -> Tensor:
    """``p / sum(p)`` of clamped probabilities ``[B, C]``, without gradient: what the targets average."""
    p = probabilities.detach()
    return p / p.sum(dim=1, keepdim=True)


def ensemble_targets(targets: Tensor, probabilities: Tensor, beta: float) -> Tensor:
    """One temporal-ensemble step ``beta * t + (1 - beta) * p / sum(p)`` of targets ``[B, C]`` (no gradient)."""
    return ensemble_step(targets, normalised(probabilities), beta)


def ensemble_step(targets: Tensor, predictions: Tensor, beta: float) -> Tensor:
    """``beta * t + (1 - beta) * q`` of targets and normalised predictions ``[B, C]`` (the epoch's end repeats it),
    as one ``lerp`` from ``t`` towards ``q``."""
    return torch.lerp(targets, predictions, 1.0 - beta)


def elr_term(probabilities: Tensor, targets: Tensor) -> Tensor:
    """``mean_i log(1 - <p_i, t_i>)`` of probabilities ``[B, C]`` (with their gradient) and targets ``[B, C]``."""
    return torch.log(1.0 - (targets.detach() * probabilities).sum(dim=1)).mean()


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    """``value`` as a float if it is a finite number in ``[low, high)`` (``>= low`` without ``high``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= low
    if not ok or (high is not None and not value < high):
        span = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {span}, got {value!r}")
    return float(value)


class ELRCallback(SampleStateCallback):
    """Early-learning regularisation (Liu, Niles-Weed, Razavian, Fernandez-Granda, "Early-Learning
    Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020) for a module that knows nothing of it.

    Early in training a network fits the clean labels; later it memorises the wrong ones. ELR keeps, per
    training sample, a target ``t_i``: a temporal ensemble of the network's own predictions. Each time the
    sample is trained on, ``t_i <- beta t_i + (1 - beta) p_i / sum(p_i)`` with ``p_i`` the softmax clamped
    to ``[1e-4, 1 - 1e-4]`` (as in the authors' code; ``t_i`` starts at zero), and the module's loss gains
    ``weight * mean_i log(1 - <p_i, t_i>)``, ``t_i`` without gradient. Its gradient pulls each prediction
    towards its target, which keeps the early, mostly correct predictions and stops the network from
    memorising wrong labels. The module's own loss (cross-entropy on the given labels) stays as it is.

    The targets are per-sample state on the state engine: sharded under DDP, compact if asked, checkpointed.
    A step uses the updated target of its samples at once, and the update is stored at the epoch's end (the
    step's predictions are recorded and sent to the rows' owners), which is the same thing for a sample
    trained on once per epoch, as ``DistributedSampler`` arranges; the duplicate of a padded sample is
    averaged with its first record before the one update.

    Logged each epoch: ``noisy/elr_term`` (mean of the added term before the weight) and, when the clean
    labels are known, ``noisy/elr_target_acc``, the share of samples whose target's arg max is the clean
    label, over the samples trained on so far.

    Args:
        beta: ``beta``, the momentum of the temporal ensemble, in ``[0, 1)`` (paper: 0.7 for CIFAR-10,
            0.9 for CIFAR-100).
        weight: ``lambda``, the weight of the added term, ``>= 0`` (paper: 3 for CIFAR-10, 7 for CIFAR-100).
        start_epoch: first epoch with the term (the targets are updated from epoch 0); the paper uses 0.
        shard_state: each DDP rank keeps only its block of about ``N / W`` targets and fetches the rows
            its batches need from their owners; ``None`` shards whenever the world size is above 1.
        storage_dtype: dtype of the stored targets and of the records (``"float32"``, ``"bfloat16"``,
            ``"float16"``).
        storage_topk: keep each target as its ``k`` largest entries, renormalised (``None``: dense).
        fetch_window: batches whose target rows a sharded state fetches in one collective.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        beta: float = 0.7,
        weight: float = 3.0,
        start_epoch: int = 0,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        fetch_window: int = 16,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        self.beta = _check_number("beta", beta, 0.0, 1.0)
        self.weight = _check_number("weight", weight, 0.0)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        if isinstance(fetch_window, bool) or not isinstance(fetch_window, int) or fetch_window < 1:
            raise ValueError(f"fetch_window must be an integer >= 1, got {fetch_window!r}")
        self.start_epoch = start_epoch
        self.fetch_window = fetch_window
        self._targets: SampleBuffer | None = None
        self._recorder: SampleRecorder | None = None
        self._fetcher: RowFetcher | None = None
        self._batch_targets: Tensor | None = None  # the step's stored targets [B, C], before this step's update
        self._batch_predictions: Tensor | None = None  # the step's normalised predictions [B, C], without gradient
        self._current_epoch = 0
        self._terms: list[Tensor] = []  # this epoch's values of the term (0-d, on the logits' device), summed at its end
        self.metric_suffix = ""  # tells apart the metrics of two instances (ELRPlus: one per network)

    # -- public API ------------------------------------------------------------------------------
    def local_targets(self) -> tuple[Tensor, Tensor]:
        """``(index [R], targets [R, C])``: the stored targets of the rows this rank holds (zeros before a visit)."""
        if self._targets is None:
            raise RuntimeError("the targets exist once training has started (on_train_start)")
        return self._targets.index, self._targets.values

    # -- state -----------------------------------------------------------------------------------
    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        self.allocate_targets(trainer, labels)
        assert self.contract is not None
        self.contract.add_loss_term(self, "elr", self._loss_term)

    def allocate_targets(self, trainer: pl.Trainer, labels: TrainingLabels) -> None:
        """Create the ``[N, C]`` targets (zeros), their recorder and their fetcher."""
        n, c = labels.num_samples, labels.num_classes
        options = self.state_options
        topk = options.topk_for(c)
        self._targets = SampleBuffer(n, (c,), options.dtype, fill=0.0, layout=self.row_layout(trainer, n), topk=topk)
        self._recorder = SampleRecorder((c,), options.dtype, topk)
        self._fetcher = RowFetcher(self._targets, self.fetch_window, trainer.strategy.root_device)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer]:
        return {} if self._targets is None else {"targets": self._targets}

    @override
    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        return {"predictions": self._recorder}

    # -- per step --------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fetcher is not None:  # (a run resumed mid-epoch skips this: its first epoch fetches batch by batch)
            self._fetcher.start_epoch(planned_batches(trainer.train_dataloader))

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert self._fetcher is not None
        self._current_epoch = trainer.current_epoch
        self._batch_predictions = None
        self._batch_targets = self._fetcher.rows(context.index)  # a collective when sharded: every rank, every batch

    def _loss_term(self, context: StepContext) -> Tensor | None:
        assert context.logits is not None and self._batch_targets is not None
        probabilities = clamped_probabilities(context.logits)
        self._batch_predictions = normalised(probabilities)  # recorded by on_batch: computed once per step
        if self._current_epoch < self.start_epoch:
            return None
        targets = ensemble_step(self._batch_targets.to(probabilities.device), self._batch_predictions, self.beta)
        term = elr_term(probabilities, targets)
        self._terms.append(term.detach())  # no op and no host sync per step
        return self.weight * term

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert self._recorder is not None
        predictions = self._batch_predictions
        if predictions is None:  # the module returned no loss, so no term was computed
            if context.logits is None:
                raise RuntimeError("ELRCallback found no logits for this step")
            predictions = normalised(clamped_probabilities(context.logits))
        self._recorder.add(context.index, predictions)
        self._batch_targets = self._batch_predictions = None

    @override
    def on_skipped_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        self._terms = []

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._targets is not None and self._recorder is not None and self.training_labels is not None
        targets = self._targets
        index, predictions, _ = self._recorder.gather(trainer.strategy.root_device, reduction="mean", layout=targets.layout)
        if index.numel():
            targets.write(index, ensemble_step(targets.read(index), predictions, self.beta))
        labels = self.training_labels
        sums = torch.zeros(2, dtype=torch.float64)  # samples trained on so far, and those whose target is right
        if labels.clean is not None:
            for rows in targets.chunks():
                rows = rows[targets.visited[rows - targets.start]]
                right = targets.read(rows).argmax(1) == labels.clean[rows]
                sums += torch.tensor([rows.numel(), int(right.sum())], dtype=torch.float64)
        sums = self.sum_over_shards(trainer, targets.layout, sums)
        device = trainer.strategy.root_device
        term = torch.zeros(2, dtype=torch.float64, device=device)
        term[1] = len(self._terms)
        if self._terms:
            term[0] = torch.stack(self._terms).sum(dtype=torch.float64).to(device)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(term)  # every rank's steps
        term, self._terms = term.cpu(), []
        metrics: dict[str, Tensor] = {}
        if float(term[1]) > 0:
            metrics["noisy/elr_term"] = (term[0] / term[1]).float()
        if labels.clean is not None and float(sums[0]) > 0:
            metrics[f"noisy/elr_target_acc{self.metric_suffix}"] = (sums[1] / sums[0]).float()
        self.log_epoch_metrics(pl_module, metrics)


__all__ = ["ELRCallback", "clamped_probabilities", "elr_term", "ensemble_step", "ensemble_targets", "normalised"]
