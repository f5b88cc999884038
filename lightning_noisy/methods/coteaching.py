"""Co-teaching (Han et al., NeurIPS 2018) and Co-teaching+ (Yu et al., ICML 2019): two networks that
train each other on the samples the other one finds easy (small loss)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_noisy.callbacks.base import find_training_labels, log_epoch
from lightning_noisy.losses._targets import check_finite_positive
from lightning_noisy.methods.classifier import (
    OptimizerName,
    SchedulerName,
    batch_index,
    check_optimisation_args,
    split_batch,
    step_schedules,
    two_network_optimizers,
)
from lightning_noisy.models import build_backbone

__all__ = ["CoTeaching", "disagreement_mask", "forget_rate_schedule", "small_loss_selection"]

#: what validation and test score: network a, network b, and the mean of their logits
EVALUATED = ("a", "b", "mean")


def _check_forget_rate(forget_rate: float) -> None:
    if isinstance(forget_rate, bool) or not isinstance(forget_rate, (int, float)) or not 0 <= forget_rate < 1:
        raise ValueError(f"forget_rate must be a number in [0, 1), got {forget_rate!r}")


def forget_rate_schedule(epoch: int, forget_rate: float, num_gradual: int, exponent: float = 1.0) -> float:
    """Share of samples dropped at ``epoch``: ``R(T) = tau * min((T / T_k)^c, 1)`` (Han et al. 2018).

    Args:
        epoch: ``T``, counted from 0 as in the reference code (``R(0) = 0`` when ``num_gradual > 0``).
        forget_rate: ``tau`` in ``[0, 1)``; the paper sets it to the noise rate.
        num_gradual: ``T_k`` (paper: 10) epochs over which the rate rises; 0 gives ``tau`` from the start.
        exponent: ``c`` (paper: 1, a linear ramp).

    Raises:
        ValueError: on a ``forget_rate`` outside ``[0, 1)``, a negative ``num_gradual`` or ``epoch``, or
            a non-positive ``exponent``.
    """
    _check_forget_rate(forget_rate)
    if isinstance(num_gradual, bool) or not isinstance(num_gradual, int) or num_gradual < 0:
        raise ValueError(f"num_gradual must be an integer >= 0, got {num_gradual!r}")
    check_finite_positive("exponent", exponent)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if num_gradual == 0:
        return float(forget_rate)
    return float(forget_rate) * min((epoch / num_gradual) ** exponent, 1.0)


def num_remembered(batch_size: int, forget_rate: float) -> int:
    """``round(B (1 - forget_rate))`` samples kept, at least 1 when ``B > 0``."""
    if batch_size <= 0:
        return 0
    return max(1, round(batch_size * (1.0 - forget_rate)))


def small_loss_selection(loss_a: Tensor, loss_b: Tensor, forget_rate: float) -> tuple[Tensor, Tensor]:
    """Cross-update selection of Co-teaching.

    Each network keeps its ``round(B (1 - forget_rate))`` (at least 1) smallest-loss samples, and each is
    trained on the other's: ties are broken by position (stable sort), so the result is deterministic.

    Args:
        loss_a: per-sample losses ``[B]`` of network a.
        loss_b: per-sample losses ``[B]`` of network b.
        forget_rate: share of samples dropped, in ``[0, 1)``.

    Returns:
        ``(idx_a, idx_b)``: int64 indices ``[K]`` into the batch, ``idx_a`` to train network a on (the
        small-loss samples of b) and ``idx_b`` to train b on (those of a), each in increasing loss order.
    """
    _check_forget_rate(forget_rate)
    if loss_a.ndim != 1 or loss_a.shape != loss_b.shape:
        raise ValueError(
            f"loss_a and loss_b must have the same shape [B], got {tuple(loss_a.shape)} and {tuple(loss_b.shape)}"
        )
    keep = num_remembered(int(loss_a.shape[0]), forget_rate)
    small_a = torch.argsort(loss_a.detach(), stable=True)[:keep]
    small_b = torch.argsort(loss_b.detach(), stable=True)[:keep]
    return small_b, small_a


def disagreement_mask(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Bool mask ``[B]`` of the samples whose argmax predictions differ (Co-teaching+)."""
    if logits_a.ndim != 2 or logits_a.shape != logits_b.shape:
        raise ValueError(
            f"logits_a and logits_b must have the same shape [B, C], got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    return logits_a.argmax(1) != logits_b.argmax(1)


class CoTeaching(pl.LightningModule):
    """Co-teaching (Han et al., NeurIPS 2018), and Co-teaching+ (Yu et al., ICML 2019) with ``disagreement``.

    Two networks of the same architecture, initialised from different seeds, see every batch. Each keeps the
    ``1 - R(T)`` share of the batch with its smallest cross-entropy (``R`` is :func:`forget_rate_schedule`)
    and its peer is updated on those samples only (mean cross-entropy over them); the optimisation is
    manual, one optimiser per network.

    Co-teaching+: from epoch ``disagreement_start_epoch`` on, only the samples on which the two networks'
    predictions disagree are candidates, and the forget rate applies to that subset. A batch without any
    disagreement gives no update (zero loss, no optimiser step), as the reference code does.

    Evaluation (``forward``, validation and test) uses the mean of the two networks' logits by default, as
    the Lightning reproduction of the CIFAR-N study does; ``evaluate="a"`` uses network a alone, as the
    paper reports each network.

    Logged: ``train/loss_a``, ``train/loss_b``, ``train/forget_rate``; ``test/acc`` (the ``evaluate``
    choice), ``test/acc_a``, ``test/acc_b``, ``test/acc_mean`` (mean of the logits) and ``test/acc_best``
    (best ``test/acc`` so far). When the batch carries
    the dataset index (``[x, y, index]``, or taken out by the package's callbacks) and the data exposes
    ``clean_labels`` and ``noisy_labels`` (see :func:`~lightning_noisy.callbacks.base.find_training_labels`),
    also per epoch ``noisy/pure_ratio`` (label precision of the selected samples) and
    ``noisy/selection_recall`` (share of the batch's clean samples selected), both pooled over the two
    networks' selections and summed over DDP ranks. ``training_step`` returns network a's logits under
    ``"logits"``, so :class:`~lightning_noisy.callbacks.NoisyLabelMonitor` follows network a; loss terms that
    callbacks add to the returned loss have no effect (the module runs its own backward).

    Args:
        backbone: backbone name for both networks (see :func:`~lightning_noisy.models.build_backbone`).
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        forget_rate: ``tau``, the final share of each batch dropped; the paper sets it to the noise rate.
        num_gradual: ``T_k``, epochs over which the forget rate rises linearly from 0 (paper: 10).
        exponent: ``c`` of the schedule ``tau min((T / T_k)^c, 1)`` (paper: 1).
        disagreement: Co-teaching+ (select among disagreeing samples only).
        disagreement_start_epoch: first epoch (0-based) of the disagreement selection; before it the
            selection is plain Co-teaching (Yu et al.'s ``init_epoch``; 20 here, dataset-dependent in the paper).
        seed: network a is initialised from ``seed``, network b from ``seed + 1`` (global RNG untouched).
        optimizer: ``"sgd"`` or ``"adamw"`` (the paper: Adam, lr 0.001).
        lr: learning rate of both optimisers.
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"constant"``, ``"multistep"`` (``milestones``, ``gamma``), ``"cosine"`` (over
            ``max_epochs``) or ``"linear"`` (the paper's: to zero at ``max_epochs`` from ``milestones[0]``),
            stepped once per epoch for both optimisers.
        milestones: epochs at which ``"multistep"`` multiplies the learning rate by ``gamma``; for
            ``"linear"``, the epoch its decay starts (the paper: 80 of 200).
        gamma: multiplicative decay of ``"multistep"``.
        evaluate: ``"mean"`` (the mean of both networks' logits) or ``"a"`` (network a alone).
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        forget_rate: float = 0.2,
        num_gradual: int = 10,
        exponent: float = 1.0,
        disagreement: bool = False,
        disagreement_start_epoch: int = 20,
        seed: int = 0,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        scheduler: SchedulerName = "constant",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        evaluate: Literal["mean", "a"] = "mean",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if evaluate not in ("mean", "a"):
            raise ValueError(f"evaluate must be 'mean' (both networks' mean logits) or 'a' (network a), got {evaluate!r}")
        milestones = list(milestones or [])
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, milestones, gamma)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        forget_rate_schedule(0, forget_rate, num_gradual, exponent)  # validates the schedule's arguments
        if isinstance(disagreement_start_epoch, bool) or int(disagreement_start_epoch) < 0:
            raise ValueError(f"disagreement_start_epoch must be >= 0, got {disagreement_start_epoch}")
        self.num_classes = int(num_classes)
        kwargs = backbone_kwargs or {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net_a: nn.Module = build_backbone(backbone, self.num_classes, **kwargs)
            torch.manual_seed(seed + 1)
            self.net_b: nn.Module = build_backbone(backbone, self.num_classes, **kwargs)
        self.val_accuracy = self._accuracies()
        self.test_accuracy = self._accuracies()
        self.register_buffer("best_acc", torch.tensor(0.0))
        self._is_clean: Tensor | None = None  # [N] bool, True where the noisy label is the clean one
        # selected, selected clean, clean seen (pooled over both selections)
        self._selection_counts = torch.zeros(3, dtype=torch.float64)

    def _accuracies(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: MulticlassAccuracy(num_classes=self.num_classes, average="micro") for name in EVALUATED})

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` logits: the mean of both networks' (``evaluate="mean"``) or network a's."""
        if self.hparams.evaluate == "a":
            return self.net_a(x)
        return (self.net_a(x) + self.net_b(x)) / 2

    def _update_accuracies(self, metrics: nn.ModuleDict, x: Tensor, y: Tensor) -> None:
        logits_a, logits_b = self.net_a(x), self.net_b(x)
        for name, logits in zip(EVALUATED, (logits_a, logits_b, (logits_a + logits_b) / 2)):
            metrics[name].update(logits, y)

    def forget_rate_at(self, epoch: int) -> float:
        """``R(epoch)``, the share of candidates dropped at ``epoch``."""
        hp = self.hparams
        return forget_rate_schedule(epoch, hp.forget_rate, hp.num_gradual, hp.exponent)

    def select(self, logits_a: Tensor, logits_b: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Indices of the samples each network is trained on at ``epoch``.

        Args:
            logits_a: ``[B, C]`` logits of network a.
            logits_b: ``[B, C]`` logits of network b.
            targets: ``[B]`` int64 (noisy) labels.
            epoch: 0-based epoch, for the forget rate and the start of the disagreement selection.

        Returns:
            ``(idx_a, idx_b)``: int64 indices into the batch, ``[K]`` each; network a trains on ``idx_a``
            (b's small-loss samples), b on ``idx_b``. Both are empty when Co-teaching+ finds no disagreement.
        """
        if targets.ndim != 1 or targets.is_floating_point():
            raise ValueError(f"Co-teaching needs hard integer labels [B], got {targets.dtype} {tuple(targets.shape)}")
        rate = self.forget_rate_at(epoch)
        with torch.no_grad():
            if self.hparams.disagreement and epoch >= self.hparams.disagreement_start_epoch:
                candidates = disagreement_mask(logits_a, logits_b).nonzero().flatten()
            else:
                candidates = torch.arange(targets.shape[0], device=targets.device)
            if candidates.numel() == 0:
                return candidates, candidates.clone()
            loss_a = F.cross_entropy(logits_a[candidates].float(), targets[candidates], reduction="none")
            loss_b = F.cross_entropy(logits_b[candidates].float(), targets[candidates], reduction="none")
            idx_a, idx_b = small_loss_selection(loss_a, loss_b, rate)
        return candidates[idx_a], candidates[idx_b]

    @override
    def on_train_start(self) -> None:
        self._is_clean = None
        try:
            labels = find_training_labels(self.trainer)
        except ValueError:
            return
        if labels.clean is not None:
            self._is_clean = (labels.clean == labels.noisy).to(self.device)

    @override
    def on_train_epoch_start(self) -> None:
        self._selection_counts = torch.zeros(3, dtype=torch.float64, device=self.device)

    def _count_selection(self, index: Tensor | None, idx_a: Tensor, idx_b: Tensor) -> None:
        if self._is_clean is None or index is None:
            return
        clean = self._is_clean[index.to(self._is_clean.device)].to(self._selection_counts.device)
        picked = torch.cat([clean[idx_a], clean[idx_b]])
        counts = [torch.tensor(picked.numel(), device=clean.device), picked.sum(), 2 * clean.sum()]
        self._selection_counts += torch.stack([c.to(self._selection_counts) for c in counts])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        optimizer_a, optimizer_b = self.optimizers()  # type: ignore[misc]
        logits_a, logits_b = self.net_a(x), self.net_b(x)
        idx_a, idx_b = self.select(logits_a, logits_b, y, self.current_epoch)
        self._count_selection(batch_index(self, batch), idx_a, idx_b)
        selected = idx_a.numel()
        if selected > 0:
            loss_a = F.cross_entropy(logits_a[idx_a], y[idx_a])
            loss_b = F.cross_entropy(logits_b[idx_b], y[idx_b])
        else:  # no disagreement: zero loss through both graphs, so DDP still sees every parameter
            loss_a, loss_b = logits_a.sum() * 0.0, logits_b.sum() * 0.0
        if self.trainer.world_size > 1:  # step on every rank iff any rank selected something
            selected = int(self.trainer.strategy.reduce(torch.tensor(float(selected), device=x.device), reduce_op="sum"))
        optimizer_a.zero_grad()
        optimizer_b.zero_grad()
        self.manual_backward(loss_a + loss_b)  # disjoint graphs: each network gets only its own gradient
        if selected > 0:
            optimizer_a.step()
            optimizer_b.step()
        batch_size = int(x.shape[0])
        log_epoch(self, "train/loss_a", loss_a.detach(), batch_size=batch_size, prog_bar=True)
        log_epoch(self, "train/loss_b", loss_b.detach(), batch_size=batch_size)
        log_epoch(self, "train/forget_rate", self.forget_rate_at(self.current_epoch), batch_size=batch_size)
        return {"loss": (loss_a + loss_b).detach(), "logits": logits_a.detach()}

    @override
    def on_train_epoch_end(self) -> None:
        step_schedules(self)
        if self._is_clean is None:
            return
        counts = self.trainer.strategy.reduce(self._selection_counts.float(), reduce_op="sum")
        selected, selected_clean, clean = counts.tolist()
        if selected > 0:
            self.log("noisy/pure_ratio", selected_clean / selected, sync_dist=True)
        if clean > 0:
            self.log("noisy/selection_recall", selected_clean / clean, sync_dist=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_accuracies(self.val_accuracy, *split_batch(batch))

    @override
    def on_validation_epoch_end(self) -> None:
        accuracies = {name: metric.compute() for name, metric in self.val_accuracy.items()}
        for metric in self.val_accuracy.values():
            metric.reset()
        acc = accuracies[self.hparams.evaluate]
        if not self.trainer.sanity_checking:
            self.best_acc = torch.maximum(self.best_acc, acc.to(self.best_acc))
        log_epoch(self, "test/acc", acc, prog_bar=True)  # the same on every rank (the metrics synced)
        for name, value in accuracies.items():
            log_epoch(self, f"test/acc_{name}", value)
        log_epoch(self, "test/acc_best", self.best_acc)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_accuracies(self.test_accuracy, *split_batch(batch))
        self.log("test/acc", self.test_accuracy[self.hparams.evaluate], on_step=False, on_epoch=True)
        for name, metric in self.test_accuracy.items():
            self.log(f"test/acc_{name}", metric, on_step=False, on_epoch=True)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return two_network_optimizers(self, (self.net_a, self.net_b))
