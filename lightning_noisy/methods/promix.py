"""ProMix (Xiao et al., IJCAI 2023): progressive selection of clean samples and a
debiased semi-supervised stage with an auxiliary pseudo head."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy import augment
from lightning_noisy.callbacks.base import find_training_labels, log_epoch, train_eval_loader
from lightning_noisy.losses._targets import check_finite_non_negative, check_finite_positive
from lightning_noisy.losses.regularizers import entropy_loss
from lightning_noisy.methods.classifier import (
    HeldOutAccuracy,
    OptimizerName,
    SchedulerName,
    batch_index,
    check_optimisation_args,
    one_optimizer,
    resize_sample_buffers,
    split_batch,
)
from lightning_noisy.methods.dividemix import eval_mode_losses
from lightning_noisy.methods.semi_supervised import mixmatch_lambda, sharpen
from lightning_noisy.models import build_backbone

__all__ = ["ProMix", "class_wise_small_loss", "debiased_logits", "linear_ramp", "masked_mean"]


def linear_ramp(epoch: int, start: float, end: float, rampup_epochs: int) -> float:
    """The value at ``epoch`` (0-based, counted from the end of the warm-up) of ``start`` rising linearly to
    ``end`` over ``rampup_epochs`` epochs, ``end`` after: ProMix's ``rho`` (progressive selection) and the
    weight of its strong-view and mixup terms (from 0 to 1)."""
    if rampup_epochs == 0:
        return end
    return start + (end - start) * min(epoch / rampup_epochs, 1.0)


def class_wise_small_loss(losses: Tensor, labels: Tensor, ratio: float, num_classes: int) -> Tensor:
    """``[N]`` bool: in each given class ``j``, the ``min(ceil(ratio * N / C), N_j)`` samples of smallest loss.

    Args:
        losses: ``[N]`` per-sample losses against the given labels.
        labels: ``[N]`` int64 given labels.
        ratio: ``rho`` in ``[0, 1]``, the share of ``N / C`` kept per class.
        num_classes: ``C``.
    """
    if losses.shape != labels.shape or losses.ndim != 1:
        raise ValueError(f"losses and labels must both be [N], got {tuple(losses.shape)} and {tuple(labels.shape)}")
    per_class = math.ceil(ratio * losses.numel() / num_classes)
    selected = torch.zeros(losses.numel(), dtype=torch.bool, device=losses.device)
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        keep = min(per_class, members.numel())
        if keep:  # a stable sort: ties go to the earlier sample
            order = torch.sort(losses[members], stable=True).indices[:keep]
            selected[members[order]] = True
    return selected


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(values * weights) / max(sum(weights), 1)``: the mean over a mask ``[B]`` that keeps the graph whole."""
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def debiased_logits(logits: Tensor, prior: Tensor, strength: float) -> Tensor:
    """``logits + strength * log(prior)``: the logit adjustment (Menon et al. 2021) ProMix trains its heads with,
    so that a class the network already over-predicts gets a larger margin to clear. ``[B, C]``."""
    return logits + strength * prior.clamp_min(1e-12).log()


class ProMix(HeldOutAccuracy):
    """ProMix (Xiao et al., "ProMix: Combating Label Noise via Maximizing Clean Sample Utility", IJCAI 2023).

    Two networks, each with its primary classifier and an auxiliary pseudo head on the same features. After
    ``warmup_epochs`` of cross-entropy, at the start of every epoch each network scores the training set
    (eval mode) and keeps, per given class, the ``rho N / C`` samples of smallest loss
    (:func:`class_wise_small_loss`), with ``rho`` rising from ``rho_start`` to ``rho_end``
    (:func:`linear_ramp`). Within each batch a sample is also kept when the network gives its given label
    a probability above ``tau`` (matched high confidence). Per network, on a weak and a strong view:

    - primary head, kept samples only: cross-entropy of the debiased logits (:func:`debiased_logits`, with the
      running mean prediction of the kept samples as prior) on both views, and on a mixup of the kept
      samples (``Beta(alpha, alpha)``, ``lambda >= 0.5``); the strong view and mixup terms are weighted by
      ``min(1, epoch / consistency_rampup_epochs)``;
    - pseudo head: the same terms on the kept samples, plus, on the other samples, cross-entropy against the
      primary head's sharpened, debiased (prior: the running mean prediction of the other samples)
      prediction of the weak view, weighted by ``unlabelled_weight``.

    Evaluation uses the mean of the two primary heads' logits. Simplifications against the authors' code:
    no FMix term, no label guessing by agreement (their last 250 of 600 epochs), the running priors move
    once per epoch (``prior_momentum``) from every rank's sums instead of once per step, the ramps of ``rho``
    and of the consistency weight count from the end of the warm-up (theirs from epoch 0), and the weight of
    the unlabelled term is constant.
    The training batches must carry the sample index (the package's DataModules or
    :class:`~lightning_noisy.data.NoisyLabelDataset`); the backbone must have ``features`` and
    ``feature_dim`` (every backbone of :func:`~lightning_noisy.models.build_backbone` has).

    Logged: ``train/loss``, ``promix/rho``, ``promix/kept_fraction`` (mean over the networks' batches) and,
    with clean labels, ``noisy/promix_selection_precision`` (share of network a's epoch selection whose given
    label is right) and ``noisy/promix_selection_recall``; ``test/acc``, ``test/acc_best``.

    Args:
        backbone: backbone name for both networks.
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        warmup_epochs: epochs of plain cross-entropy first (the authors: 10 on CIFAR-10, 30 on CIFAR-100).
        rho_start: ``rho`` after the warm-up (the authors' default 0.2; their scripts fix it per setting).
        rho_end: final ``rho`` (the authors: 0.5 at 50% symmetric and 40% asymmetric noise, 0.7 at 20%).
        rho_rampup_epochs: epochs over which ``rho`` rises (the authors: 50).
        tau: confidence above which a batch sample with a matching prediction is kept (CIFAR-10: 0.99).
        debias_strength: the weight of ``log(prior)`` in the debiased logits (CIFAR-10: 0.8).
        prior_momentum: per-epoch momentum of the running priors.
        temperature: sharpening of the pseudo labels (0.5).
        unlabelled_weight: weight of the pseudo head's loss on the samples not kept (constant here; the
            authors' code ramps it to 0.1 over its first 100 of 600 epochs and then drops it).
        mixup_alpha: ``alpha`` of mixup (the authors: 4); 0 disables the mixup term.
        consistency_rampup_epochs: epochs over which the strong-view and mixup terms reach full weight (50).
        penalty_weight: weight of the warm-up confidence penalty, the negative entropy of the primary head's
            predictions (the authors add it for asymmetric noise, as DivideMix does; 0 turns it off).
        weak_augment: the weak view; ``None``: :func:`~lightning_noisy.augment.default_augment` for series,
            the input as loaded for images.
        strong_augment: the strong view; ``None``: :func:`~lightning_noisy.augment.strong_augment`.
        seed: network ``a`` from ``seed``, ``b`` from ``seed + 1``; seeds the views and mixups.
        optimizer: ``"sgd"`` or ``"adamw"`` (the authors: SGD, lr 0.05, momentum 0.9, weight decay 5e-4).
        lr: learning rate (one optimiser over both networks).
        momentum: SGD momentum.
        weight_decay: weight decay.
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
        warmup_epochs: int = 10,
        rho_start: float = 0.2,
        rho_end: float = 0.5,
        rho_rampup_epochs: int = 50,
        tau: float = 0.99,
        debias_strength: float = 0.8,
        prior_momentum: float = 0.9,
        temperature: float = 0.5,
        unlabelled_weight: float = 0.1,
        mixup_alpha: float = 4.0,
        consistency_rampup_epochs: int = 50,
        penalty_weight: float = 0.0,
        weak_augment: augment.Augment | None = None,
        strong_augment: augment.Augment | None = None,
        seed: int = 0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
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
        for name, value in (("warmup_epochs", warmup_epochs), ("rho_rampup_epochs", rho_rampup_epochs),
                            ("consistency_rampup_epochs", consistency_rampup_epochs), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, value in (("rho_start", rho_start), ("rho_end", rho_end), ("tau", tau),
                            ("prior_momentum", prior_momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        check_finite_non_negative("debias_strength", debias_strength)
        check_finite_positive("temperature", temperature)
        check_finite_non_negative("unlabelled_weight", unlabelled_weight)
        check_finite_non_negative("penalty_weight", penalty_weight)
        check_finite_non_negative("mixup_alpha", mixup_alpha)
        augment.check_augment("weak_augment", weak_augment)
        augment.check_augment("strong_augment", strong_augment)
        self.num_classes = num_classes
        self.weak_augment, self.strong_augment = weak_augment, strong_augment
        nets, heads = [], []
        with torch.random.fork_rng(devices=[]):
            for offset in (0, 1):
                torch.manual_seed(seed + offset)
                net = build_backbone(backbone, num_classes, **(backbone_kwargs or {}))
                if not hasattr(net, "features") or not isinstance(getattr(net, "feature_dim", None), int):
                    raise ValueError(f"ProMix needs a backbone with features() and feature_dim, got {backbone!r}")
                nets.append(net)
                heads.append(nn.Linear(net.feature_dim, num_classes))
        self.nets, self.pseudo_heads = nn.ModuleList(nets), nn.ModuleList(heads)
        uniform = torch.full((2, 2, num_classes), 1.0 / num_classes)  # [network, kept / other, C]
        self.register_buffer("priors", uniform)
        self.register_buffer("selected", torch.zeros(2, 0, dtype=torch.bool))  # [network, N]
        self._prior_sums = torch.zeros(2, 2, num_classes + 1, dtype=torch.float64)  # the epoch's sums and counts
        self._kept = torch.zeros(2, dtype=torch.float64)  # kept samples and samples seen in the epoch's batches
        self.init_accuracy(num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]``: the mean of the two primary heads' logits."""
        return (self.nets[0](x) + self.nets[1](x)) / 2

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_sample_buffers(self, state_dict, prefix, ("selected",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.hparams.warmup_epochs

    # ------------------------------------------------------------------ selection
    @override
    def on_train_start(self) -> None:
        labels = find_training_labels(self.trainer)
        self._noisy_labels = labels.noisy.cpu()
        self._clean_labels = None if labels.clean is None else labels.clean.cpu()
        if self.selected.shape != (2, labels.num_samples):
            self.selected = torch.zeros(2, labels.num_samples, dtype=torch.bool, device=self.device)

    @override
    def on_train_epoch_start(self) -> None:
        self._prior_sums = torch.zeros(2, 2, self.num_classes + 1, dtype=torch.float64, device=self.device)
        self._kept = torch.zeros(2, dtype=torch.float64, device=self.device)
        if not self.in_warmup:
            self.select_clean_samples()

    def select_clean_samples(self) -> None:
        """Each network's class-wise small-loss selection of this epoch, into ``selected`` (a collective)."""
        hp = self.hparams
        loader = train_eval_loader(self.trainer, "ProMix")
        n = int(self.selected.shape[1])
        rho = linear_ramp(self.current_epoch - hp.warmup_epochs, hp.rho_start, hp.rho_end, hp.rho_rampup_epochs)
        for row, net in enumerate(self.nets):
            losses = eval_mode_losses(self, net, loader, n)
            chosen = class_wise_small_loss(losses.cpu(), self._noisy_labels, rho, self.num_classes)
            self.selected[row] = chosen.to(self.selected.device)
        log_epoch(self, "promix/rho", rho)
        if self._clean_labels is not None:
            right = self._noisy_labels == self._clean_labels
            chosen = self.selected[0].cpu()
            if chosen.any():
                log_epoch(self, "noisy/promix_selection_precision", right[chosen].float().mean())
            if right.any():
                log_epoch(self, "noisy/promix_selection_recall", chosen[right].float().mean())

    # ------------------------------------------------------------------ training
    def _batch_index(self, batch: Any) -> Tensor:
        index = batch_index(self, batch)
        if index is None:
            raise ValueError(
                "ProMix needs the sample index in the training batches ([input, target, index]): use the "
                "package's DataModules or wrap the dataset in lightning_noisy.data.NoisyLabelDataset"
            )
        return index

    def views(self, x: Tensor, batch_idx: int) -> tuple[Tensor, Tensor, torch.Generator]:
        """``(weak, strong, generator)`` for a training batch ``x``; the generator also draws the mixups."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = augment.step_generator(self.hparams.seed, self.current_epoch, batch_idx, rank, x.device)
        weak, strong = augment.draw_views(x, generator, self.weak_augment, self.strong_augment)
        return weak, strong, generator

    def _heads(self, row: int, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.nets[row].features(x)
        return self.nets[row].classifier(features), self.pseudo_heads[row](features)

    def _network_loss(self, row: int, weak: Tensor, strong: Tensor, y: Tensor, selected: Tensor,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Loss of network ``row`` on one batch, and its primary logits of the weak view (for the monitor)."""
        hp = self.hparams
        logits_w, pseudo_w = self._heads(row, weak)
        if self.in_warmup:
            loss = F.cross_entropy(logits_w, y) + F.cross_entropy(pseudo_w, y)
            if hp.penalty_weight > 0:  # minus the entropy: confident predictions cost more
                loss = loss - hp.penalty_weight * entropy_loss(logits_w)
            return loss, logits_w
        logits_s, pseudo_s = self._heads(row, strong)
        probabilities = torch.softmax(logits_w.detach().float(), dim=1)
        confident = probabilities.gather(1, y[:, None]).squeeze(1) > hp.tau
        kept = selected | confident
        self._count_priors(row, probabilities, kept)
        ramp = linear_ramp(self.current_epoch - hp.warmup_epochs, 0.0, 1.0, hp.consistency_rampup_epochs)
        prior_kept, prior_other = self.priors[row, 0], self.priors[row, 1]
        strength = float(hp.debias_strength)
        # masked means rather than indexing: every parameter is in every rank's graph, as DDP needs
        kept_weights, other_weights = kept.to(logits_w.dtype), (~kept).to(logits_w.dtype)
        loss = logits_w.new_zeros(())
        for head_w, head_s in ((logits_w, logits_s), (pseudo_w, pseudo_s)):
            weak_ce = F.cross_entropy(debiased_logits(head_w, prior_kept, strength), y, reduction="none")
            strong_ce = F.cross_entropy(debiased_logits(head_s, prior_kept, strength), y, reduction="none")
            loss = loss + masked_mean(weak_ce, kept_weights) + ramp * masked_mean(strong_ce, kept_weights)
        if hp.mixup_alpha > 0:
            loss = loss + ramp * self._mixup_loss(row, weak, y, kept, prior_kept, generator)
        if hp.unlabelled_weight > 0:
            guess = torch.softmax(debiased_logits(logits_w.detach().float(), prior_other, -strength), dim=1)
            targets = sharpen(guess, float(hp.temperature))
            pseudo = (masked_mean(F.cross_entropy(pseudo_w, targets, reduction="none"), other_weights)
                      + ramp * masked_mean(F.cross_entropy(pseudo_s, targets, reduction="none"), other_weights))
            loss = loss + hp.unlabelled_weight * pseudo
        return loss, logits_w

    def _mixup_loss(self, row: int, x: Tensor, y: Tensor, kept: Tensor, prior: Tensor,
                    generator: torch.Generator) -> Tensor:
        """Cross-entropy of both heads on a mixup of the kept samples among themselves (the rest unmixed, weight 0)."""
        lam = mixmatch_lambda(float(self.hparams.mixup_alpha), generator)
        members = kept.nonzero().flatten()
        shuffled = members[torch.randperm(members.numel(), generator=generator, device=generator.device).to(x.device)]
        order = torch.arange(x.shape[0], device=x.device).index_copy(0, members, shuffled)
        mixed = lam * x + (1.0 - lam) * x[order]
        one_hot = F.one_hot(y, self.num_classes).float()
        targets = lam * one_hot + (1.0 - lam) * one_hot[order]
        logits, pseudo = self._heads(row, mixed)
        strength, weights = float(self.hparams.debias_strength), kept.to(logits.dtype)
        return sum(masked_mean(F.cross_entropy(debiased_logits(out, prior, strength), targets, reduction="none"), weights)
                   for out in (logits, pseudo))

    def _count_priors(self, row: int, probabilities: Tensor, kept: Tensor) -> None:
        for column, mask in enumerate((kept, ~kept)):
            sums = torch.cat([probabilities[mask].sum(0), mask.sum()[None].to(probabilities)])
            self._prior_sums[row, column] += sums.to(self._prior_sums)
        self._kept += torch.stack([kept.sum(), torch.tensor(kept.numel(), device=kept.device)]).to(self._kept)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"ProMix trains on the hard given labels [B], got {y.dtype} {tuple(y.shape)}")
        index = self._batch_index(batch).to(self.selected.device)
        weak, strong, generator = self.views(x, batch_idx)
        loss, logits = None, None
        for row in (0, 1):
            selected = self.selected[row, index].to(y.device)
            network_loss, weak_logits = self._network_loss(row, weak, strong, y, selected, generator)
            loss = network_loss if loss is None else loss + network_loss
            logits = weak_logits if logits is None else logits
        assert loss is not None and logits is not None
        log_epoch(self, "train/loss", loss.detach(), batch_size=int(x.shape[0]), prog_bar=True)
        return {"loss": loss, "logits": logits}

    @override
    def on_train_epoch_end(self) -> None:
        if self.in_warmup:
            return
        sums = self.trainer.strategy.reduce(self._prior_sums, reduce_op="sum")  # every rank's batches
        kept = self.trainer.strategy.reduce(self._kept, reduce_op="sum")
        counts = sums[..., -1:]
        means = (sums[..., :-1] / counts.clamp_min(1)).to(self.priors)
        momentum = float(self.hparams.prior_momentum)
        moved = momentum * self.priors + (1.0 - momentum) * means
        self.priors = torch.where(counts.to(self.priors) > 0, moved, self.priors)  # a prior with no samples stays
        if float(kept[1]) > 0:
            log_epoch(self, "promix/kept_fraction", float(kept[0] / kept[1]))

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return one_optimizer(self, self.parameters())
