"""CNN-CRF (Vahdat, "Toward Robustness against Label Noise in Training Deep Discriminative Neural Networks",
NeurIPS 2017): a CRF over the clean label, the noisy label and hidden units, on top of a network.

The model, for one sample ``x`` with clean label ``y``, noisy label ``y~`` (both one of ``C`` classes) and hidden
binary units ``h`` (``K`` of them), is ``p(y, y~, h | x) ∝ exp(a(x)_y + b_y~ + W[y~, y] + c·h + U[y~]·h)``: the
network's logits ``a(x)`` score the clean label, ``W`` links the noisy label to the clean one, ``U`` links it
to the hidden units, which connect to nothing else. With one-hot labels every sum is small, so inference is
exact here: summing ``h`` out adds ``s_y~ = sum_k softplus(c_k + U[y~, k])``, and the partition function is a
log-sum-exp over the ``C^2`` label pairs (the paper's code samples instead, with persistent Gibbs chains,
because it also serves multi-label data).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy.callbacks.base import log_epoch
from lightning_noisy.methods.classifier import (
    HeldOutAccuracy,
    OptimizerName,
    SchedulerName,
    batch_index,
    check_optimisation_args,
    one_optimizer,
    split_batch,
)
from lightning_noisy.models import build_backbone

__all__ = [
    "CNNCRF",
    "alpha_schedule",
    "auxiliary_log_posterior",
    "clean_label_logits",
    "crf_loss",
    "hidden_offset",
    "log_partition",
    "posterior_target",
]


# ---------------------------------------------------------------------------------------------- pure functions
def hidden_offset(hidden_bias: Tensor | None, hidden_pairwise: Tensor | None, num_classes: int) -> Tensor:
    """``[C]`` ``s_j = sum_k softplus(c_k + U[j, k])``: what summing the hidden units out adds to noisy label ``j``.

    Args:
        hidden_bias: ``[K]`` biases ``c`` of the hidden units (``None``: no hidden units, ``s = 0``).
        hidden_pairwise: ``[C, K]`` noisy-label-to-hidden interactions ``U``.
        num_classes: ``C``.
    """
    if hidden_bias is None or hidden_pairwise is None:
        return torch.zeros(num_classes)
    return F.softplus(hidden_bias[None, :] + hidden_pairwise).sum(dim=1)


def _joint_scores(logits: Tensor, noisy_bias: Tensor, pairwise: Tensor, offset: Tensor) -> Tensor:
    """``[B, C(noisy), C(clean)]`` unnormalised ``log p(y, y~ | x)``: ``a_i + b_j + s_j + W[j, i]``."""
    return logits[:, None, :] + (noisy_bias + offset.to(noisy_bias))[None, :, None] + pairwise[None, :, :]


def log_partition(logits: Tensor, noisy_bias: Tensor, pairwise: Tensor, offset: Tensor) -> Tensor:
    """``[B]`` ``log Z(x) = logsumexp_{i, j} (a_i + b_j + s_j + W[j, i])`` (``h`` summed out).

    Args:
        logits: ``[B, C]`` the network's scores ``a(x)`` of the clean label.
        noisy_bias: ``[C]`` ``b``.
        pairwise: ``[C, C]`` ``W``, rows the noisy label, columns the clean label.
        offset: ``[C]`` :func:`hidden_offset`.
    """
    return _joint_scores(logits, noisy_bias, pairwise, offset).flatten(1).logsumexp(dim=1)


def clean_label_logits(logits: Tensor, noisy_bias: Tensor, pairwise: Tensor, offset: Tensor) -> Tensor:
    """``[B, C]`` logits of the model's ``p(y | x)``: ``a_i + logsumexp_j (b_j + s_j + W[j, i])`` (``y~`` summed out).

    This, not ``softmax(a)``, is the CRF's prediction of the clean label (the paper's code predicts the model's
    marginal too).
    """
    return logits + (noisy_bias + offset.to(noisy_bias))[:, None].add(pairwise).logsumexp(dim=0)[None, :]


def posterior_target(
    logits: Tensor, pairwise: Tensor, noisy: Tensor, auxiliary: Tensor, alpha: float,
) -> Tensor:
    """``[B, C]`` the regularised E-step's target over the clean label of noisy samples.

    The distribution ``q`` minimising ``KL(q || p(y | y~, x)) + alpha KL(q || p_aux(y | y~))``, the weighted
    geometric mean ``q ∝ (p(y | y~, x) p_aux(y | y~)^alpha)^(1 / (1 + alpha))``; with ``p(y | y~, x) =
    softmax(a + W[y~])`` that is ``softmax((a + W[y~] + alpha log p_aux(y | y~)) / (1 + alpha))``. No gradient.

    Args:
        logits: ``[B, C]`` ``a(x)``.
        pairwise: ``[C, C]`` ``W``.
        noisy: ``[B]`` the given labels ``y~``.
        auxiliary: ``[C(noisy), C(clean)]`` ``log p_aux(y | y~)`` (:func:`auxiliary_log_posterior`).
        alpha: ``>= 0``; large early in training, so the targets follow the clean subset's statistics.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    with torch.no_grad():
        scores = logits.float() + pairwise[noisy].float() + alpha * auxiliary[noisy].to(logits.device).float()
        return torch.softmax(scores / (1.0 + alpha), dim=1)


def crf_loss(logits: Tensor, noisy_bias: Tensor, pairwise: Tensor, offset: Tensor, noisy: Tensor, target: Tensor) -> Tensor:
    """``[B]`` ``-E_{y ~ target}[log p(y, y~ | x)] = -sum_i t_i (a_i + W[y~, i]) - b_y~ - s_y~ + log Z(x)``.

    The M-step's loss with the target held fixed; its gradient on ``a`` is ``p(y | x) - target``.

    Args:
        target: ``[B, C]`` a distribution over the clean label: :func:`posterior_target` for noisy samples,
            the one-hot true label for samples of the clean subset.
    """
    positive = (target * (logits + pairwise[noisy])).sum(dim=1) + (noisy_bias + offset.to(noisy_bias))[noisy]
    return log_partition(logits, noisy_bias, pairwise, offset) - positive


def alpha_schedule(epoch_progress: float, anneal_epochs: float, floor: float = 0.5) -> float:
    """The weight of the auxiliary distribution: ``max(w / (1 - w), floor)`` with ``w = 0.99 - t / anneal_epochs``.

    As in the author's code: 99 at the start, below ``floor`` by ``t = anneal_epochs * (0.99 - floor / (1 +
    floor))`` epochs (6.6 of 10 with floor 0.5), then ``floor`` to the end.

    Args:
        epoch_progress: ``t = epoch + batch_idx / num_batches``.
        anneal_epochs: ``> 0`` (the author's CIFAR-10 value: 10).
        floor: ``>= 0``.
    """
    if not anneal_epochs > 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    if not floor >= 0:
        raise ValueError(f"floor must be >= 0, got {floor!r}")
    w = 0.99 - float(epoch_progress) / float(anneal_epochs)
    return max(w / (1.0 - w), float(floor)) if w > 0 else float(floor)


def auxiliary_log_posterior(noisy: Tensor, clean: Tensor, num_classes: int, smoothing: float = 1.0) -> Tensor:
    """``[C(noisy), C(clean)]`` ``log p_aux(y | y~)`` from the clean subset's label pairs, add-``smoothing`` counts.

    The paper fits an auxiliary model of the labels alone to the clean data and keeps it fixed; for one-hot
    labels its conditional is this table of counts (``count(y~, y) + smoothing``, normalised per row).
    """
    if noisy.shape != clean.shape or noisy.ndim != 1:
        raise ValueError(f"noisy and clean must be [M] label tensors of one shape, got {tuple(noisy.shape)} and {tuple(clean.shape)}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing!r}")
    counts = torch.full((num_classes, num_classes), float(smoothing), dtype=torch.float64)
    counts.index_put_((noisy.long().cpu(), clean.long().cpu()), torch.ones(noisy.numel(), dtype=torch.float64),
                      accumulate=True)
    return (counts / counts.sum(dim=1, keepdim=True)).log().float()


# ---------------------------------------------------------------------------------------------- module
class CNNCRF(HeldOutAccuracy):
    """CNN-CRF (Vahdat, NeurIPS 2017): a network and a CRF over clean, noisy and hidden labels, trained with a
    small clean subset beside the noisy training set.

    Every training sample contributes ``-E_q[log p(y, y~ | x)]`` (:func:`crf_loss`) for its given label ``y~``.
    For a sample of the clean subset ``q`` is its true label; for the others ``q`` is the regularised E-step's
    :func:`posterior_target`, which mixes the model's ``p(y | y~, x)`` with an auxiliary ``p_aux(y | y~)`` of the
    clean subset's label pairs (:func:`auxiliary_log_posterior`) at a weight ``alpha`` that falls from 99 to
    ``alpha_floor`` over the first epochs (:func:`alpha_schedule`), so early targets follow the clean statistics
    and later ones the model. The network and the CRF (``b``, ``W``, and ``c``, ``U`` with hidden units) are
    trained together; ``W`` has its own L2 term, the network the optimiser's weight decay. Test predictions are
    the model's ``p(y | x)`` (:func:`clean_label_logits`).

    Where this differs from the paper's code: inference and the partition function are exact instead of
    sampled (the labels are one-hot, so the ``C^2`` pairs are enumerated); the auxiliary model is the smoothed
    table of label pairs and has no hidden units, so the hidden units are summed out exactly rather than given
    a mixed target; samples of both sets weigh alike (the code's 0.5 and 0.5). With one-hot labels the hidden
    units only add a per-noisy-class offset to ``b``, so ``hidden_units`` defaults to 0.

    The clean subset comes from the DataModule: ``clean_subset_size`` of the package's DataModules (its
    ``clean_subset`` property: ``(index [M], true labels [M])``). Training batches must carry the sample index.
    Logged: ``train/loss``, ``crf/alpha``; returns the ``p(y | x)`` logits so that ``NoisyLabelMonitor``
    reports ``noisy/train_pred_acc`` (the recovery of the paper's baselines).

    Args:
        backbone: backbone name (see :func:`~lightning_noisy.models.build_backbone`).
        num_classes: ``C``.
        backbone_kwargs: extra arguments of the backbone.
        hidden_units: ``K`` hidden binary units linked to the noisy label.
        anneal_epochs: epochs over which ``alpha`` falls (the author's CIFAR-10 code: 10).
        alpha_floor: the smallest ``alpha`` (the author's code: 0.5).
        aux_smoothing: add-``s`` smoothing of the clean subset's label-pair counts.
        pairwise_l2: weight of ``||W||^2 / 2`` (the author's code: 5e-4).
        optimizer, lr, momentum, weight_decay, nesterov, scheduler, milestones, gamma: as
            :class:`~lightning_noisy.methods.NoisyClassifier` (the weight decay applies to the network only).
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        hidden_units: int = 0,
        anneal_epochs: float = 10.0,
        alpha_floor: float = 0.5,
        aux_smoothing: float = 1.0,
        pairwise_l2: float = 5e-4,
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
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, list(milestones or []), gamma)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(hidden_units, bool) or not isinstance(hidden_units, int) or hidden_units < 0:
            raise ValueError(f"hidden_units must be an int >= 0, got {hidden_units!r}")
        alpha_schedule(0.0, anneal_epochs, alpha_floor)  # validates both
        for name, value in (("aux_smoothing", aux_smoothing), ("pairwise_l2", pairwise_l2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if name == "aux_smoothing" else value < 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'aux_smoothing' else '>= 0'}, got {value!r}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
        # the CRF starts at zero, as in the author's code: early targets come from the auxiliary distribution
        self.noisy_bias = nn.Parameter(torch.zeros(num_classes))
        self.pairwise = nn.Parameter(torch.zeros(num_classes, num_classes))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden_units)) if hidden_units else None
        self.hidden_pairwise = nn.Parameter(torch.zeros(num_classes, hidden_units)) if hidden_units else None
        self.init_accuracy(num_classes)
        self._auxiliary: Tensor | None = None  # [C, C] log p_aux(y | y~), from the clean subset
        self._clean_label: Tensor | None = None  # [N] true label of the clean subset's samples, -1 elsewhere

    def _offset(self) -> Tensor:
        return hidden_offset(self.hidden_bias, self.hidden_pairwise, self.num_classes).to(self.noisy_bias)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` logits of the model's ``p(y | x)``."""
        return clean_label_logits(self.backbone(x).float(), self.noisy_bias, self.pairwise, self._offset())

    @override
    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        subset = getattr(datamodule, "clean_subset", None)
        if subset is None or subset[0].numel() == 0:
            raise RuntimeError(
                "CNNCRF learns from a clean subset beside the noisy labels: use one of the package's DataModules "
                "with clean_subset_size > 0 (e.g. 10% of the training set)"
            )
        index, clean = subset
        noisy = datamodule.noisy_labels
        self._auxiliary = auxiliary_log_posterior(noisy[index], clean, self.num_classes,
                                                  float(self.hparams.aux_smoothing)).to(self.device)
        lookup = torch.full((noisy.numel(),), -1, dtype=torch.long)
        lookup[index] = clean
        self._clean_label = lookup.to(self.device)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, noisy = split_batch(batch)
        index = batch_index(self, batch)
        if index is None:
            raise ValueError("CNNCRF needs the sample index in the training batches ([input, target, index])")
        if self._auxiliary is None or self._clean_label is None:
            raise RuntimeError("CNNCRF's clean subset is read in on_train_start; train it with Trainer.fit")
        if noisy.ndim != 1:
            raise ValueError(f"CNNCRF trains on hard given labels [B], got targets of shape {tuple(noisy.shape)}")
        logits = self.backbone(x).float()
        offset = self._offset()
        progress = self.current_epoch + batch_idx / max(1, int(self.trainer.num_training_batches))
        alpha = alpha_schedule(progress, float(self.hparams.anneal_epochs), float(self.hparams.alpha_floor))
        target = posterior_target(logits, self.pairwise, noisy, self._auxiliary, alpha)
        clean = self._clean_label[index.to(self._clean_label.device)].to(noisy.device)
        known = clean >= 0
        target = torch.where(known[:, None], F.one_hot(clean.clamp_min(0), self.num_classes).to(target), target)
        loss = crf_loss(logits, self.noisy_bias, self.pairwise, offset, noisy, target).mean()
        loss = loss + 0.5 * float(self.hparams.pairwise_l2) * self.pairwise.square().sum()
        size = int(x.shape[0])
        log_epoch(self, "train/loss", loss.detach(), batch_size=size, prog_bar=True)
        log_epoch(self, "crf/alpha", alpha, batch_size=size)
        predictions = clean_label_logits(logits.detach(), self.noisy_bias.detach(), self.pairwise.detach(), offset.detach())
        return {"loss": loss, "logits": predictions}

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        crf = [p for p in (self.noisy_bias, self.pairwise, self.hidden_bias, self.hidden_pairwise) if p is not None]
        return one_optimizer(self, [{"params": list(self.backbone.parameters())},
                                    {"params": crf, "weight_decay": 0.0}])
