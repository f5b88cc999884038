"""NoisyClassifier: a plain Lightning classifier whose loss, optimiser and schedule are set from config."""

from __future__ import annotations

import functools
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_noisy.callbacks.base import log_epoch
from lightning_noisy.losses import get_loss
from lightning_noisy.losses.mixup import mixup_batch
from lightning_noisy.models import build_backbone
from lightning_noisy.state import BatchContract

OptimizerName = Literal["sgd", "adamw"]
SchedulerName = Literal["constant", "multistep", "cosine", "linear"]


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(input, target)`` of a batch ``[input, target]`` or ``[input, target, index]`` (index ignored)."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise ValueError(f"expected a batch [input, target] or [input, target, index], got {type(batch).__name__}")
    return batch[0], batch[1]


def batch_index(module: pl.LightningModule, batch: Any) -> Tensor | None:
    """``[B]`` dataset indices of a training batch: its third element, or what the batch contract took out."""
    if isinstance(batch, (list, tuple)) and len(batch) == 3:
        return batch[2]
    return BatchContract.current_index(module)


def build_optimizer(
    params: Any, name: OptimizerName, lr: float, momentum: float, weight_decay: float, nesterov: bool
) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over ``params`` (parameters or param-group dicts)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def check_optimisation_args(
    optimizer: str, lr: float, momentum: float, weight_decay: float, scheduler: str, milestones: list[int], gamma: float
) -> None:
    """Validate the optimiser and schedule arguments shared by the package's modules."""
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if scheduler not in ("constant", "multistep", "cosine", "linear"):
        raise ValueError(f"scheduler must be 'constant', 'multistep', 'cosine' or 'linear', got {scheduler!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if any(m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing positive epochs, got {milestones}")
    if scheduler == "linear" and len(milestones) > 1:
        raise ValueError(f"scheduler 'linear' takes at most one milestone (the epoch its decay starts), got {milestones}")


def build_schedule(
    optimizer: torch.optim.Optimizer, name: SchedulerName, milestones: list[int], gamma: float, max_epochs: int | None
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch schedule ``name`` of ``optimizer``: ``None`` for ``"constant"``.

    ``"linear"`` keeps the learning rate until epoch ``milestones[0]`` (0 without a milestone), then lowers it
    linearly so that it would reach zero at ``max_epochs``: the factor at epoch ``e`` is
    ``min(1, (max_epochs - e) / (max_epochs - start))`` (Co-teaching's schedule, Han et al. 2018: from epoch 80
    of 200).
    """
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs or 1))
    if name == "linear":
        total = max(1, max_epochs or 1)
        start = milestones[0] if milestones else 0
        if start >= total:
            raise ValueError(f"the linear decay must start before max_epochs={total}, got milestones={milestones}")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(linear_decay_factor, start=start, total=total))
    return None


def linear_decay_factor(epoch: int, start: int, total: int) -> float:
    """``min(1, (total - epoch) / (total - start))``: the learning-rate factor of the ``"linear"`` schedule."""
    return min(1.0, (total - epoch) / (total - start))


def one_optimizer(module: pl.LightningModule, params: Any) -> OptimizerLRScheduler:
    """One optimiser over ``params`` and its per-epoch schedule, from ``module.hparams``."""
    hp = module.hparams
    optimizer = build_optimizer(params, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
    if hp.scheduler == "constant":
        return optimizer
    schedule = build_schedule(optimizer, hp.scheduler, list(hp.milestones or []), hp.gamma, module.trainer.max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def two_network_optimizers(module: pl.LightningModule, nets: tuple[torch.nn.Module, torch.nn.Module]) -> OptimizerLRScheduler:
    """One optimiser (and schedule) per network from ``module.hparams``, for the two-network modules."""
    hp = module.hparams
    optimizers = [
        build_optimizer(net.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov) for net in nets
    ]
    max_epochs = module.trainer.max_epochs
    schedules = [build_schedule(o, hp.scheduler, list(hp.milestones or []), hp.gamma, max_epochs) for o in optimizers]
    if schedules[0] is None:
        return optimizers
    return optimizers, schedules  # type: ignore[return-value]


def step_schedules(module: pl.LightningModule) -> None:
    """Step every learning-rate schedule of a manually optimised module once (call at the end of an epoch)."""
    schedules = module.lr_schedulers()
    if schedules is not None:
        for schedule in schedules if isinstance(schedules, list) else [schedules]:
            schedule.step()


def resize_sample_buffers(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, names: tuple[str, ...]) -> None:
    """Give ``module``'s per-sample buffers ``names`` the shape they have in ``state_dict`` before it is loaded.

    Their size ``[N, ...]`` is only known once the data is, so a fresh module holds empty buffers; call this
    from ``_load_from_state_dict`` so that a checkpoint (or ``ddp_spawn`` handing rank 0's weights back to the
    main process) loads into it.
    """
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(saved, Tensor) and saved.shape != current.shape:
            setattr(module, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))


class HeldOutAccuracy(pl.LightningModule):
    """Validation and test accuracy of ``self(x)`` as ``test/acc``, and the best so far as ``test/acc_best``.

    The package's DataModules validate on the held-out test split, as the papers report test accuracy per
    epoch. Subclasses call :meth:`init_accuracy` in ``__init__``.
    """

    def init_accuracy(self, num_classes: int) -> None:
        """Create the accuracy metrics and the checkpointed ``best_acc`` buffer."""
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.register_buffer("best_acc", torch.tensor(0.0))

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        self.val_accuracy.update(self(x), y)

    @override
    def on_validation_epoch_end(self) -> None:
        acc = self.val_accuracy.compute()
        self.val_accuracy.reset()
        if not self.trainer.sanity_checking:
            self.best_acc = torch.maximum(self.best_acc, acc.to(self.best_acc))
        log_epoch(self, "test/acc", acc, prog_bar=True)  # the same on every rank (the metric synced)
        log_epoch(self, "test/acc_best", self.best_acc)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = split_batch(batch)
        self.test_accuracy.update(self(x), y)
        self.log("test/acc", self.test_accuracy, on_step=False, on_epoch=True)


class NoisyClassifier(HeldOutAccuracy):
    """A classifier for noisy labels: backbone by name, a (robust) loss by name, SGD/AdamW and a schedule.

    It follows the batch contract: ``training_step`` takes ``x, y = batch`` (an index left in the batch
    is ignored, so it also runs without the package's callbacks), accepts hard ``[B]`` or soft ``[B, C]``
    targets and returns ``{"loss", "logits"}``. The validation loop reports ``test/acc`` (the package's
    DataModules validate on the held-out test split, as the papers report test accuracy per epoch) and
    the best value so far as ``test/acc_best``.

    Args:
        backbone: backbone name (``"cnn1d"``, ``"mlp"``, ``"preact_resnet18"``, ``"torchvision:<name>"``).
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        loss: loss name (``"ce"``, ``"mae"``, ``"gce"``, ``"sce"``, ...; see ``lightning_noisy.losses``).
        loss_kwargs: the loss's hyperparameters, e.g. ``{"q": 0.7}`` for GCE.
        label_smoothing: label smoothing of the cross-entropy (only with ``loss="ce"``).
        mixup_alpha: mixup's ``Beta(alpha, alpha)`` parameter; 0 disables mixup.
        optimizer: ``"sgd"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"constant"``, ``"multistep"`` (``milestones``, ``gamma``), ``"cosine"`` (over ``max_epochs``)
            or ``"linear"`` (to zero at ``max_epochs``, from ``milestones[0]``; see :func:`build_schedule`).
        milestones: epochs at which ``"multistep"`` multiplies the learning rate by ``gamma``; for
            ``"linear"``, at most one: the epoch its decay starts.
        gamma: multiplicative decay of ``"multistep"``.
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        loss: str = "ce",
        loss_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: SchedulerName = "constant",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        milestones = list(milestones or [])
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, milestones, gamma)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing > 0 and loss != "ce":
            raise ValueError(f"label_smoothing applies to loss='ce' only, got loss={loss!r}")
        if not mixup_alpha >= 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}")
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(backbone, self.num_classes, **(backbone_kwargs or {}))
        if label_smoothing > 0:
            self.criterion = get_loss("label_smoothing", smoothing=label_smoothing)
        else:
            self.criterion = get_loss(loss, **(loss_kwargs or {}))
        self.init_accuracy(self.num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` logits."""
        return self.backbone(x)

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The configured loss of ``logits [B, C]`` against hard ``[B]`` or soft ``[B, C]`` targets."""
        return self.criterion(logits, targets)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        if self.hparams.mixup_alpha > 0:
            x, y, _ = mixup_batch(x, y, self.num_classes, self.hparams.mixup_alpha)
        logits = self(x)
        loss = self.compute_loss(logits, y)
        log_epoch(self, "train/loss", loss, batch_size=x.shape[0], prog_bar=True)
        return {"loss": loss, "logits": logits}

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return one_optimizer(self, self.parameters())
