"""SOP+ (Liu, Zhu, Qu, You, ICML 2022): sparse over-parameterisation plus consistency and class balance."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from typing_extensions import override

from lightning_noisy import augment
from lightning_noisy.callbacks.base import log_epoch
from lightning_noisy.callbacks.sop import EPS, SOPCallback
from lightning_noisy.losses._targets import check_finite_non_negative
from lightning_noisy.methods.classifier import (
    HeldOutAccuracy,
    OptimizerName,
    SchedulerName,
    check_optimisation_args,
    one_optimizer,
    split_batch,
)
from lightning_noisy.models import build_backbone
from lightning_noisy.state import BatchContract

__all__ = ["SOPPlus", "class_balance_loss", "consistency_loss"]


def class_balance_loss(probabilities: Tensor) -> Tensor:
    """``-(1/C) sum_c log max(mean_i p_ic, 1e-4)``: large when the batch's mean prediction leaves a class out.

    Args:
        probabilities: ``[B, C]`` predicted distributions (SOP+: the noise-corrected ones).
    """
    return -probabilities.float().mean(dim=0).clamp_min(EPS).log().mean()


def consistency_loss(weak_logits: Tensor, strong_logits: Tensor) -> Tensor:
    """``mean_i KL(sg(softmax(weak_i)) || softmax(strong_i))``: the strong view is pulled to the weak one's prediction.

    Args:
        weak_logits: ``[B, C]`` logits of the weak views (no gradient flows through them).
        strong_logits: ``[B, C]`` logits of the strong views of the same samples.
    """
    target = torch.softmax(weak_logits.detach().float(), dim=1)
    return F.kl_div(torch.log_softmax(strong_logits.float(), dim=1), target, reduction="batchmean")


class SOPPlus(HeldOutAccuracy):
    """SOP+ (Liu, Zhu, Qu, You, "Robust Training under Label Noise by Over-parameterization", ICML 2022).

    SOP (see :class:`~lightning_noisy.callbacks.SOPCallback`) plus the two terms the paper adds for its best
    results, on two random views of every training sample:

    - the cross-entropy of the noise-corrected prediction ``p~ = softmax(z) + u^2 y - sg(v^2 (1 - y))`` of the
      weak view against the given label (SOP's loss; the callback also trains ``v``);
    - ``balance_weight`` times :func:`class_balance_loss` of ``p~`` (keeps every class predicted);
    - ``consistency_weight`` times :func:`consistency_loss`: the KL divergence from the weak view's plain
      prediction to the strong view's.

    The per-sample ``u, v`` live in the :class:`~lightning_noisy.callbacks.SOPCallback` that this module adds
    to the Trainer (``configure_callbacks``), so they are sharded, checkpointed and resumed by the state
    engine. The batch must carry the sample index (the package's DataModules, or
    :class:`~lightning_noisy.data.NoisyLabelDataset`).

    Views: ``weak_augment`` and ``strong_augment`` take a batch ``[B, ...]`` and return one random view. By
    default, series get :func:`~lightning_noisy.augment.default_augment` (weak) and
    :func:`~lightning_noisy.augment.strong_augment` (strong), drawn from a generator seeded by ``(seed, epoch,
    batch index, rank)``; images are used as loaded for the weak view (the DataModule's crop and flip) and
    get ``strong_augment``'s flip, shift and Cutout. The paper's strong view is AutoAugment plus Cutout: pass
    it (e.g. a torchvision transform) from Python. User callables draw from torch's global RNG.

    Logged: ``train/loss``, ``train/ce``, ``train/balance``, ``train/consistency``; ``test/acc``,
    ``test/acc_best``; and the callback's ``noisy/sop_u_mean``, ``noisy/sop_noise_auroc``.

    Args:
        backbone: backbone name (see :func:`~lightning_noisy.models.build_backbone`).
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        lr_u: learning rate of ``u`` (the authors' CIFAR-10 value: 10).
        lr_v: learning rate of ``v`` (the authors' CIFAR-10 value: 10).
        init_std: standard deviation of the start values of ``u, v`` (the authors: 1e-8).
        consistency_weight: weight of the consistency term (the authors: 0.9).
        balance_weight: weight of the class-balance term (the authors: 0.1).
        weak_augment: the weak view; ``None`` for the default described above.
        strong_augment: the strong view; ``None`` for the default described above.
        seed: seeds the start values of ``u, v`` and the default views.
        shard_state: shard ``u, v`` across DDP ranks (``None``: whenever the world size is above 1).
        fetch_window: batches whose rows a sharded state fetches in one collective.
        optimizer: ``"sgd"`` or ``"adamw"`` (the authors: SGD, lr 0.02, momentum 0.9, weight decay 5e-4).
        lr: learning rate of the network.
        momentum: SGD momentum.
        weight_decay: weight decay of the network (not of ``u, v``).
        nesterov: Nesterov momentum for SGD.
        scheduler: ``"constant"``, ``"multistep"``, ``"cosine"`` (the authors') or ``"linear"``.
        milestones: epochs of ``"multistep"``; the start of ``"linear"``.
        gamma: multiplicative decay of ``"multistep"``.
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        lr_u: float = 10.0,
        lr_v: float = 10.0,
        init_std: float = 1e-8,
        consistency_weight: float = 0.9,
        balance_weight: float = 0.1,
        weak_augment: augment.Augment | None = None,
        strong_augment: augment.Augment | None = None,
        seed: int = 0,
        shard_state: bool | None = None,
        fetch_window: int = 16,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: SchedulerName = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["weak_augment", "strong_augment"])
        milestones = list(milestones or [])
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, milestones, gamma)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        check_finite_non_negative("consistency_weight", consistency_weight)
        check_finite_non_negative("balance_weight", balance_weight)
        augment.check_augment("weak_augment", weak_augment)
        augment.check_augment("strong_augment", strong_augment)
        # built here so that bad u, v arguments fail at construction, with the callback's own messages
        self.sop = SOPCallback(lr_u=lr_u, lr_v=lr_v, init_std=init_std, seed=seed, shard_state=shard_state,
                               fetch_window=fetch_window)
        self.num_classes = num_classes
        self.weak_augment, self.strong_augment = weak_augment, strong_augment
        self.backbone = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        self.init_accuracy(num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` logits (in training, the SOP callback turns them into ``log p~``)."""
        return self.backbone(x)

    @override
    def configure_callbacks(self) -> list[Callback]:
        return [self.sop]

    def views(self, x: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """``(weak, strong)`` random views of a training batch ``x [B, ...]``, each shaped as ``x``."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = augment.step_generator(self.hparams.seed, self.current_epoch, batch_idx, rank, x.device)
        return augment.draw_views(x, generator, self.weak_augment, self.strong_augment)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"SOPPlus trains on the hard given labels [B], got {y.dtype} {tuple(y.shape)}")
        weak, strong = self.views(x, batch_idx)
        corrected = self(weak)  # log p~: the SOP callback's transform of the weak view's logits
        raw = BatchContract.current_raw_logits(self)
        if raw is None:
            raise RuntimeError(
                "SOPPlus found no SOP noise term on its logits: it must be trained by a Trainer that runs its "
                "SOPCallback (added by configure_callbacks) on batches [input, target, index]"
            )
        ce = F.cross_entropy(corrected, y)  # of log p~, a distribution: SOP's loss, as a plain classifier's CE
        balance = class_balance_loss(corrected.exp())
        consistency = consistency_loss(raw, self.backbone(strong))
        hp = self.hparams
        loss = ce + hp.balance_weight * balance + hp.consistency_weight * consistency
        size = int(x.shape[0])
        for name, value in (("loss", loss), ("ce", ce), ("balance", balance), ("consistency", consistency)):
            log_epoch(self, f"train/{name}", value.detach(), batch_size=size, prog_bar=name == "loss")
        return {"loss": loss, "logits": corrected}

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return one_optimizer(self, self.backbone.parameters())
