"""ELR+ (Liu, Niles-Weed, Razavian, Fernandez-Granda, NeurIPS 2020): two networks, weight averaging, mixup and
early-learning regularisation towards targets from the peer's averaged weights."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy import augment
from lightning_noisy.callbacks.base import TrainingLabels, log_epoch
from lightning_noisy.callbacks.elr import ELRCallback, clamped_probabilities, elr_term, ensemble_step, normalised
from lightning_noisy.losses._targets import check_finite_non_negative
from lightning_noisy.methods.classifier import (
    HeldOutAccuracy,
    OptimizerName,
    SchedulerName,
    check_optimisation_args,
    split_batch,
    step_schedules,
    two_network_optimizers,
)
from lightning_noisy.methods.semi_supervised import mixmatch_lambda
from lightning_noisy.models import build_backbone
from lightning_noisy.state import StepContext
from lightning_noisy.state.storage import StorageDtype

__all__ = ["ELRPlus", "PeerTargets", "ema_decay", "mixed_elr_loss"]


def ema_decay(step: int, gamma: float, rampup_steps: int) -> float:
    """Weight of the old average at optimiser step ``step``: ``gamma exp(-5 (1 - min(step, R) / R)^2)``.

    The authors' ramp: the average follows the network closely at first and settles at ``gamma`` after
    ``R = rampup_steps`` steps (``R = 0``: ``gamma`` from the start).
    """
    if rampup_steps == 0:
        return gamma
    return gamma * math.exp(-5.0 * (1.0 - min(step, rampup_steps) / rampup_steps) ** 2)


@torch.no_grad()
def update_average(average: nn.Module, online: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * online`` for every parameter; buffers are copied."""
    for mean, value in zip(average.parameters(), online.parameters()):
        mean.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
    for mean, value in zip(average.buffers(), online.buffers()):
        mean.copy_(value)


def mixed_elr_loss(
    logits: Tensor, mixed_labels: Tensor, mixed_targets: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    """``(cross-entropy, ELR term)`` of a mixed batch: ``-mean_i <y~_i, log softmax(z_i)>`` and
    ``weight * mean_i log(1 - <t~_i, p_i>)``, ``p`` the softmax clamped to ``[1e-4, 1 - 1e-4]``.

    Args:
        logits: ``[B, C]`` logits of the mixed inputs.
        mixed_labels: ``[B, C]`` the mixed one-hot given labels ``y~``.
        mixed_targets: ``[B, C]`` the mixed ensemble targets ``t~`` (no gradient).
        weight: ``lambda``.
    """
    ce = -(mixed_labels * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
    return ce, weight * elr_term(clamped_probabilities(logits), mixed_targets)


class PeerTargets(ELRCallback):
    """ELR's per-sample targets for one network of :class:`ELRPlus`, updated from the predictions that the
    module hands to :meth:`ensemble` (its peer's averaged network) instead of the network's own logits.

    The state engine keeps them as it keeps :class:`~lightning_noisy.callbacks.ELRCallback`'s: sharded under
    DDP, compact if asked, checkpointed and resumed. Logged: ``noisy/elr_target_acc_<name>``.
    """

    require_logits = False

    def __init__(self, name: str, beta: float, shard_state: bool | None, storage_dtype: StorageDtype,
                 storage_topk: int | None, fetch_window: int) -> None:
        super().__init__(beta=beta, weight=0.0, shard_state=shard_state, storage_dtype=storage_dtype,
                         storage_topk=storage_topk, fetch_window=fetch_window, key=f"elr_plus_{name}")
        self.metric_suffix = f"_{name}"

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        self.allocate_targets(trainer, labels)  # no loss term: the module computes its own

    def ensemble(self, probabilities: Tensor) -> Tensor:
        """``beta t_i + (1 - beta) p_i / sum(p_i)`` for this step's samples, from ``probabilities [B, C]``
        (clamped softmax, no gradient); they are recorded, and stored at the epoch's end."""
        if self._batch_targets is None:
            raise RuntimeError("PeerTargets.ensemble is called from the training step of the module that owns it")
        self._batch_predictions = normalised(probabilities)
        return ensemble_step(self._batch_targets.to(probabilities.device, probabilities.dtype), self._batch_predictions,
                             self.beta)

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if self._batch_predictions is None:
            raise RuntimeError(f"{type(pl_module).__name__} did not hand this step's predictions to PeerTargets.ensemble")
        super().on_batch(trainer, pl_module, context)


class ELRPlus(HeldOutAccuracy):
    """ELR+ (Liu, Niles-Weed, Razavian, Fernandez-Granda, "Early-Learning Regularization Prevents Memorization
    of Noisy Labels", NeurIPS 2020): the paper's full method.

    Two networks ``a, b`` and a weight average of each (an exponential moving average of the parameters,
    decay :func:`ema_decay`). Every step, per network:

    - the peer's averaged network predicts the (unmixed) batch, and the network's targets take one temporal
      ensemble step ``t_i <- beta t_i + (1 - beta) p_i`` (:class:`PeerTargets`, on the state engine);
    - the batch is mixed (mixup, ``lambda ~ Beta(alpha, alpha)`` and ``lambda <- max(lambda, 1 - lambda)``),
      inputs, one-hot labels and targets alike;
    - the loss is :func:`mixed_elr_loss`: cross-entropy on the mixed labels plus ``weight`` times
      ``log(1 - <t~, p>)``.

    Both networks are trained in every step (the authors train them in alternate epochs); the two
    networks draw independent mixups. Evaluation uses the mean of the two networks' logits, as the
    authors' test. The batch must carry the sample index (the package's DataModules or
    :class:`~lightning_noisy.data.NoisyLabelDataset`).

    Logged: ``train/loss_a``, ``train/loss_b``, ``train/elr_a``, ``train/elr_b``; ``test/acc``,
    ``test/acc_best``; with clean labels, ``noisy/elr_target_acc_a`` and ``noisy/elr_target_acc_b``.

    Args:
        backbone: backbone name for both networks (see :func:`~lightning_noisy.models.build_backbone`).
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        beta: momentum of the targets (the authors' CIFAR-10: 0.7; CIFAR-100: 0.9).
        weight: ``lambda`` of the ELR term (CIFAR-10: 3; CIFAR-100: 7).
        ema_gamma: final decay of the weight average (the authors: 0.997).
        ema_rampup_steps: steps over which the decay rises to ``ema_gamma`` (the authors: 40,000; 0 for none).
        mixup_alpha: ``alpha`` of mixup (the authors: 1); 0 disables mixup.
        seed: network ``a`` from ``seed``, ``b`` from ``seed + 1``; also seeds the mixup draws.
        shard_state: shard the targets across DDP ranks (``None``: whenever the world size is above 1).
        storage_dtype: dtype of the stored targets.
        storage_topk: keep each target as its ``k`` largest entries (``None``: dense).
        fetch_window: batches whose rows a sharded state fetches in one collective.
        optimizer: ``"sgd"`` or ``"adamw"`` (the authors: SGD, lr 0.02, momentum 0.9, weight decay 5e-4).
        lr: learning rate of both networks.
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"constant"``, ``"multistep"`` (the authors: lr / 10 at epoch 150 of 200), ``"cosine"``
            or ``"linear"``.
        milestones: epochs of ``"multistep"``; the start of ``"linear"``.
        gamma: multiplicative decay of ``"multistep"``.
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        beta: float = 0.7,
        weight: float = 3.0,
        ema_gamma: float = 0.997,
        ema_rampup_steps: int = 40_000,
        mixup_alpha: float = 1.0,
        seed: int = 0,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        fetch_window: int = 16,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: SchedulerName = "multistep",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        milestones = [150] if milestones is None and scheduler == "multistep" else list(milestones or [])
        self.save_hyperparameters()
        self.automatic_optimization = False
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, milestones, gamma)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if isinstance(ema_gamma, bool) or not isinstance(ema_gamma, (int, float)) or not 0 <= ema_gamma < 1:
            raise ValueError(f"ema_gamma must be a number in [0, 1), got {ema_gamma!r}")
        if isinstance(ema_rampup_steps, bool) or not isinstance(ema_rampup_steps, int) or ema_rampup_steps < 0:
            raise ValueError(f"ema_rampup_steps must be an integer >= 0, got {ema_rampup_steps!r}")
        check_finite_non_negative("mixup_alpha", mixup_alpha)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        # built here so that bad target arguments fail at construction, with ELRCallback's own messages
        self.peer_targets = tuple(
            PeerTargets(name, beta, shard_state, storage_dtype, storage_topk, fetch_window) for name in ("a", "b")
        )
        check_finite_non_negative("weight", weight)
        self.num_classes = num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net_a: nn.Module = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
            torch.manual_seed(seed + 1)
            self.net_b: nn.Module = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        self.average_a, self.average_b = copy.deepcopy(self.net_a), copy.deepcopy(self.net_b)
        for average in (self.average_a, self.average_b):
            average.requires_grad_(False)
        self.register_buffer("optimiser_steps", torch.tensor(0, dtype=torch.long))
        self.init_accuracy(num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]``: the mean of the two networks' logits."""
        return (self.net_a(x) + self.net_b(x)) / 2

    @override
    def configure_callbacks(self) -> list[Callback]:
        return list(self.peer_targets)

    def _mixup(self, generator: torch.Generator, size: int, device: torch.device) -> tuple[float, Tensor]:
        """``(lambda, permutation [B])`` of one mixup draw: ``lambda >= 0.5``; no mixing when ``alpha = 0``."""
        alpha = float(self.hparams.mixup_alpha)
        if alpha == 0:
            return 1.0, torch.arange(size, device=device)
        return mixmatch_lambda(alpha, generator), torch.randperm(size, generator=generator).to(device)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"ELRPlus trains on the hard given labels [B], got {y.dtype} {tuple(y.shape)}")
        hp = self.hparams
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = augment.step_generator(hp.seed, self.current_epoch, batch_idx, rank, torch.device("cpu"))
        labels = F.one_hot(y, self.num_classes).float()
        nets = ((self.net_a, self.average_b, self.peer_targets[0]), (self.net_b, self.average_a, self.peer_targets[1]))
        losses, terms = [], []
        for net, peer_average, targets in nets:
            with torch.no_grad():
                ensemble = targets.ensemble(clamped_probabilities(peer_average(x)))
            lam, order = self._mixup(generator, int(x.shape[0]), x.device)
            mixed_x = lam * x + (1.0 - lam) * x[order]
            mixed = [lam * t + (1.0 - lam) * t[order] for t in (labels, ensemble)]
            ce, term = mixed_elr_loss(net(mixed_x), mixed[0], mixed[1], float(hp.weight))
            losses.append(ce + term)
            terms.append(term.detach())
        optimizers = self.optimizers()
        for optimizer in optimizers:  # type: ignore[union-attr]
            optimizer.zero_grad()
        self.manual_backward(losses[0] + losses[1])  # disjoint graphs: each network gets its own gradient
        for optimizer in optimizers:  # type: ignore[union-attr]
            optimizer.step()
        decay = ema_decay(int(self.optimiser_steps), float(hp.ema_gamma), int(hp.ema_rampup_steps))
        update_average(self.average_a, self.net_a, decay)
        update_average(self.average_b, self.net_b, decay)
        self.optimiser_steps += 1
        size = int(x.shape[0])
        for name, loss, term in zip("ab", losses, terms):
            log_epoch(self, f"train/loss_{name}", loss.detach(), batch_size=size, prog_bar=name == "a")
            log_epoch(self, f"train/elr_{name}", term, batch_size=size)
        return {"loss": (losses[0] + losses[1]).detach()}

    @override
    def on_train_epoch_end(self) -> None:
        step_schedules(self)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return two_network_optimizers(self, (self.net_a, self.net_b))
