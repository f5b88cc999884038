"""DivideMix (Li, Socher, Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised Learning", ICLR 2020).

Two networks are warmed up with cross-entropy; from then on, at the start of every epoch, each network's
per-sample losses on the training set are fitted with a two-component GMM (co-divide), giving every sample a
clean probability. Each network is then trained on the division made by its peer: samples whose clean
probability exceeds ``p_threshold`` are labelled (targets: co-refined labels), the rest are unlabelled
(targets: co-guessed from both networks), and the two sets are trained by a semi-supervised stage: MixMatch
as in the paper, or FixMatch (:mod:`lightning_noisy.methods.semi_supervised`). This file holds the division and
the schedule; the stages live there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from typing_extensions import override

from lightning_noisy.augment import BatchAugment, check_augment, default_augment, step_generator, strong_augment
from lightning_noisy.callbacks.base import find_training_labels, log_epoch, train_eval_loader, training_dataset
from lightning_noisy.callbacks.co_divide import (
    DEFAULT_MAX_FIT_SAMPLES,
    check_max_fit_samples,
    clean_probability,
    normalise_losses,
    per_class_clean_probability,
    per_sample_cross_entropy,
)
from lightning_noisy.losses._targets import check_finite_non_negative, check_finite_positive
from lightning_noisy.losses.regularizers import entropy_loss, prior_loss
from lightning_noisy.methods.classifier import (
    HeldOutAccuracy,
    OptimizerName,
    SchedulerName,
    check_optimisation_args,
    resize_sample_buffers,
    split_batch,
    step_schedules,
    two_network_optimizers,
)
from lightning_noisy.methods.semi_supervised import (
    DividedBatch,
    FixMatchStage,
    MixMatchStage,
    SemiSupervisedStage,
    StageResult,
)
from lightning_noisy.models import build_backbone, evaluating
from lightning_noisy.seeding import stream_generator
from lightning_noisy.state import BatchContract

__all__ = ["DivideMix", "default_augment", "labelled_slice", "linear_rampup", "uniform_prior_penalty"]

SemiSupervised = Literal["mixmatch", "fixmatch"]


# ---------------------------------------------------------------------------------------------- pure functions
def linear_rampup(epoch_progress: float, warmup: float, lambda_u: float, rampup_length: float = 16) -> float:
    """Weight of the unlabelled loss, as in the reference code: ``lambda_u * clip((t - warmup) / L, 0, 1)``.

    Args:
        epoch_progress: ``t = epoch + batch_idx / num_batches`` (epochs counted from 0).
        warmup: number of warm-up epochs (the ramp starts when MixMatch training starts).
        lambda_u: final weight ``lambda_u >= 0``.
        rampup_length: ``L > 0`` epochs (reference code: 16).
    """
    if isinstance(lambda_u, bool) or not isinstance(lambda_u, (int, float)) or not lambda_u >= 0:
        raise ValueError(f"lambda_u must be a number >= 0, got {lambda_u!r}")
    rampup_length = check_finite_positive("rampup_length", rampup_length)
    current = min(max((float(epoch_progress) - float(warmup)) / rampup_length, 0.0), 1.0)
    return float(lambda_u) * current


def labelled_slice(order: Tensor, step: int, batch_size: int, world_size: int = 1, rank: int = 0) -> Tensor:
    """The labelled batch of ``rank`` at ``step``: ``order[(step * world_size + rank) * batch_size:][:batch_size]``.

    Over the steps and ranks this goes once through ``order [L]`` (dataset indices of the labelled set) in
    batches of ``batch_size``; the last one may be shorter, and later ones are empty.
    """
    for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    start = (step * world_size + rank) * batch_size
    return order[start: start + batch_size]


def uniform_prior_penalty(logits: Tensor) -> Tensor:
    """DivideMix's regularisation ``sum_c pi_c log(pi_c / mean_i p_ic)`` with the uniform prior ``pi_c = 1/C``.

    ``p = softmax(logits)`` and the mean is over the batch (the KL divergence from the uniform prior to the
    mean prediction). Same as :func:`~lightning_noisy.losses.regularizers.prior_loss` with a uniform prior.
    """
    return prior_loss(logits)


def eval_mode_losses(module: pl.LightningModule, net: nn.Module, loader: DataLoader, num_samples: int) -> Tensor:
    """``[N]`` float32 cross-entropy of ``module``'s network ``net`` (eval mode) against the noisy labels.

    During a fit the pass is split between the DDP ranks and gathered (a collective: every rank calls
    it), see :func:`~lightning_noisy.callbacks.co_divide.per_sample_cross_entropy`.
    """
    trainer = module._trainer
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    collective = trainer.strategy.root_device if trainer is not None else module.device
    with evaluating(net):
        return per_sample_cross_entropy(net, loader, num_samples, module.device, rank, world, collective)


# ---------------------------------------------------------------------------------------------- module
class DivideMix(HeldOutAccuracy):
    """DivideMix (Li, Socher, Hoi, ICLR 2020) with two networks and manual optimisation.

    *Warm-up* (epochs ``< warmup_epochs``): both networks are trained with cross-entropy on the noisy labels,
    plus ``penalty_weight`` times the negative entropy of the predictions (the paper's confidence penalty for
    asymmetric noise; 0 by default). The batches come as the training loader gives them (with the dataset's
    training transform, as the reference code's warm-up loader); with ``warmup_augment`` each network
    sees its own random augmentation of the batch instead, for data without a training transform.

    *Co-divide* (start of every later epoch): for each network an evaluation pass over the whole training set
    (``trainer.datamodule.train_eval_dataloader()``, or the training dataset in order when the DataModule has
    none) gives per-sample cross-entropies against the noisy labels; :func:`clean_probability` (a 2-component
    GMM) turns them into clean probabilities ``prob_a`` / ``prob_b``. Under DDP each rank runs the pass on
    its share of the batches and the losses are gathered, so the divisions are identical on all ranks and
    equal to a one-process run's. The divisions are registered buffers ``[N]``, so checkpoints hold them.

    *Semi-supervised training* (after warm-up): as the reference code's labelled loader, each network makes
    one pass per epoch over the samples its peer's division labels (``prob_peer > p_threshold``), in an order
    drawn per epoch (the same on every rank), in labelled batches of ``B`` samples (``labelled_batch_size``,
    by default half the training loader's batch size, see there): the step ``batch_idx`` of rank ``r``
    takes positions ``(batch_idx * world + r) * B`` onwards (:func:`labelled_slice`). Each labelled
    batch comes with as many samples drawn with replacement from the peer's unlabelled set; both are read
    from the training dataset (its transform applied). Once a network's labelled pass is over, the
    remaining steps of the epoch leave it alone (its optimiser does not step, so neither momentum nor
    weight decay moves it), so a small labelled set means few steps, not small batches. The training
    loader's own batches only clock these steps. The two sets train the network through the stage ``ssl``
    names, with ``w = prob_peer`` and the unlabelled weight ``linear_rampup(...)``:

    - ``"mixmatch"`` (the paper): :class:`~lightning_noisy.methods.semi_supervised.MixMatchStage`, two
      augmentations per sample, co-refined and co-guessed targets, everything mixed.
    - ``"fixmatch"``: :class:`~lightning_noisy.methods.semi_supervised.FixMatchStage`, labelled samples on
      a weak view with co-refined targets, unlabelled ones on a strong view towards the pseudo label that
      both networks co-guess on a weak view, kept where its confidence reaches ``fixmatch_threshold``.
      Logged: ``noisy/fixmatch_mask_rate`` (kept share of the unlabelled draws) and, with clean labels,
      ``noisy/pseudo_label_acc`` (share of the kept pseudo labels that are the true label).

    Network a is trained with network b's division and b as co-guessing
    peer, and vice versa: both losses are computed from the networks as they are at the start of the
    step and backpropagated together (disjoint graphs); a network without a labelled batch on this rank
    gets a zero loss that keeps its graph, since DDP expects a backward pass after every forward. When a
    callback uses the batch contract, the step returns network a's logits on the training batch (one
    extra no-gradient forward pass).

    The augmentations, unlabelled draws and mixup draw from a generator seeded by ``(seed, epoch, batch_idx,
    rank)`` when the default augmentation is used, so a run resumed from an epoch-boundary checkpoint repeats
    the uninterrupted one; with a user ``augment`` callable they draw from torch's global RNG.

    Evaluation predicts with the average softmax of both networks. Logged: ``train/loss_a``, ``train/loss_b``,
    ``train/lambda_u``; ``test/acc``, ``test/acc_best``; at each co-divide ``codivide/labelled_fraction``
    (mean over both divisions) and, when the data exposes clean labels, ``noisy/codivide_auroc`` (network a's
    division, i.e. the one network b is trained with) and ``noisy/codivide_auroc_b``.

    Args:
        backbone: backbone name for both networks (see :func:`~lightning_noisy.models.build_backbone`).
        num_classes: number of classes ``C``.
        backbone_kwargs: extra arguments of the backbone.
        warmup_epochs: epochs of cross-entropy warm-up (paper: 10 on CIFAR-10, 30 on CIFAR-100).
        warmup_augment: also apply the module's augmentation to the warm-up batches (one draw per network);
            ``False`` warms up on the training loader's batches as they come.
        labelled_batch_size: labelled samples per MixMatch step and rank; ``None``: half the training
            loader's batch size (reference code: 64 against warm-up batches of 128). Raised where a pass over
            the labelled set would not fit into the epoch's steps.
        p_threshold: clean-probability threshold of the division (paper: 0.5; 0.6 at 90% symmetric noise).
        lambda_u: final weight of the unlabelled loss (paper: 0 to 150 depending on the noise, see the configs).
        rampup_length: epochs of the linear ramp of ``lambda_u`` after warm-up (reference code: 16).
        temperature: sharpening temperature ``T`` (paper: 0.5).
        alpha: Beta parameter of MixMatch (paper: 4).
        ssl: the semi-supervised stage, ``"mixmatch"`` (the paper) or ``"fixmatch"`` (see above).
        fixmatch_threshold: ``tau``, the confidence a FixMatch pseudo label needs (FixMatch: 0.95).
        penalty_weight: weight of the warm-up confidence penalty (negative entropy); paper: 1 for asymmetric
            noise, none otherwise.
        augment: ``Callable[[Tensor], Tensor]`` applied to a training batch to get one random (weak)
            augmentation; ``None`` uses :func:`default_augment` (noise and a small shift, a generic default).
        strong_augment: the strong view of FixMatch, ``Callable[[Tensor], Tensor]`` on a training batch; a
            config names a :class:`~lightning_noisy.augment.BatchAugment` by ``class_path`` (for images
            :class:`~lightning_noisy.augment.RandAugmentCutout`, FixMatch's); ``None`` uses
            :func:`~lightning_noisy.augment.strong_augment`.
        augment_noise_std: noise of :func:`default_augment`, in multiples of each sample's std (>= 0).
        augment_max_shift: largest circular shift of :func:`default_augment`, in positions (int >= 0).
        augment_max_scale: largest relative change of amplitude of :func:`default_augment` (in [0, 1)).
        augment_max_trend: largest linear trend of :func:`default_augment`, in multiples of each sample's
            std (>= 0).
        loss_average_epochs: the GMM is fit to each sample's min-max-normalised loss averaged over the last
            this many co-divides (reference code: 5 at 90% noise, else 1); the history is checkpointed.
        gmm_max_iter: iterations of the GMM fit (reference: 10).
        gmm_reg_covar: covariance regularisation of the GMM (reference: 5e-4).
        gmm_max_fit_samples: the GMM is fit to at most this many losses (a seeded uniform subset) and gives
            every sample's posterior; ``None`` fits to all (:func:`clean_probability`).
        divide_per_class: fit one GMM per noisy class (:func:`per_class_clean_probability`) instead of one
            for the whole set, so every class keeps labelled samples; not in the paper, off by default.
        seed: network a is initialised from ``seed``, network b from ``seed + 1`` (global RNG untouched); also
            seeds the augmentation / mixup generator and the GMM.
        optimizer: ``"sgd"`` or ``"adamw"`` (paper: SGD).
        lr: learning rate (paper: 0.02).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: weight decay (paper: 5e-4).
        nesterov: Nesterov momentum.
        scheduler: ``"constant"``, ``"multistep"`` or ``"cosine"`` (paper: lr / 10 after 150 of 300 epochs).
        milestones: epochs of ``"multistep"``.
        gamma: decay factor of ``"multistep"``.
    """

    def __init__(
        self,
        backbone: str = "cnn1d",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        warmup_epochs: int = 10,
        warmup_augment: bool = False,
        labelled_batch_size: int | None = None,
        p_threshold: float = 0.5,
        lambda_u: float = 25.0,
        rampup_length: int = 16,
        temperature: float = 0.5,
        alpha: float = 4.0,
        ssl: SemiSupervised = "mixmatch",
        fixmatch_threshold: float = 0.95,
        penalty_weight: float = 0.0,
        augment: Callable[[Tensor], Tensor] | None = None,
        strong_augment: BatchAugment | Callable[[Tensor], Tensor] | None = None,
        augment_noise_std: float = 0.05,
        augment_max_shift: int = 2,
        augment_max_scale: float = 0.0,
        augment_max_trend: float = 0.0,
        loss_average_epochs: int = 1,
        gmm_max_iter: int = 10,
        gmm_reg_covar: float = 5e-4,
        gmm_max_fit_samples: int | None = DEFAULT_MAX_FIT_SAMPLES,
        divide_per_class: bool = False,
        seed: int = 0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: SchedulerName = "constant",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["augment", "strong_augment"])
        self.automatic_optimization = False
        milestones = list(milestones or [])
        check_optimisation_args(optimizer, lr, momentum, weight_decay, scheduler, milestones, gamma)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if labelled_batch_size is not None and (isinstance(labelled_batch_size, bool)
                                                or not isinstance(labelled_batch_size, int) or labelled_batch_size < 1):
            raise ValueError(f"labelled_batch_size must be an int >= 1 or None, got {labelled_batch_size!r}")
        if not isinstance(warmup_augment, bool):
            raise ValueError(f"warmup_augment must be a bool, got {warmup_augment!r}")
        if isinstance(p_threshold, bool) or not isinstance(p_threshold, (int, float)) or not 0 < p_threshold < 1:
            raise ValueError(f"p_threshold must be a number in (0, 1), got {p_threshold!r}")
        linear_rampup(0.0, 0, lambda_u, rampup_length)  # validates lambda_u and rampup_length
        check_finite_positive("temperature", temperature)
        check_finite_positive("alpha", alpha)
        if isinstance(penalty_weight, bool) or not isinstance(penalty_weight, (int, float)) or not penalty_weight >= 0:
            raise ValueError(f"penalty_weight must be a number >= 0, got {penalty_weight!r}")
        check_augment("augment", augment)
        check_augment("strong_augment", strong_augment)
        if ssl not in ("mixmatch", "fixmatch"):
            raise ValueError(f"ssl must be 'mixmatch' or 'fixmatch', got {ssl!r}")
        check_finite_non_negative("augment_noise_std", augment_noise_std)
        if (isinstance(augment_max_scale, bool) or not isinstance(augment_max_scale, (int, float))
                or not 0 <= augment_max_scale < 1):
            raise ValueError(f"augment_max_scale must be a number in [0, 1), got {augment_max_scale!r}")
        check_finite_non_negative("augment_max_trend", augment_max_trend)
        if isinstance(augment_max_shift, bool) or not isinstance(augment_max_shift, int) or augment_max_shift < 0:
            raise ValueError(f"augment_max_shift must be an int >= 0, got {augment_max_shift!r}")
        if isinstance(loss_average_epochs, bool) or not isinstance(loss_average_epochs, int) or loss_average_epochs < 1:
            raise ValueError(f"loss_average_epochs must be an int >= 1, got {loss_average_epochs!r}")
        if isinstance(gmm_max_iter, bool) or not isinstance(gmm_max_iter, int) or gmm_max_iter < 1:
            raise ValueError(f"gmm_max_iter must be an int >= 1, got {gmm_max_iter!r}")
        check_finite_positive("gmm_reg_covar", gmm_reg_covar)
        check_max_fit_samples(gmm_max_fit_samples, "gmm_max_fit_samples")
        if not isinstance(divide_per_class, bool):
            raise ValueError(f"divide_per_class must be a bool, got {divide_per_class!r}")
        self.num_classes = int(num_classes)
        self.augment, self.strong_augment = augment, strong_augment
        self.stage: SemiSupervisedStage = (
            MixMatchStage(self._augment, self.num_classes, temperature, alpha) if ssl == "mixmatch"
            else FixMatchStage(self._augment, self._strong_augment, self.num_classes, temperature, fixmatch_threshold)
        )
        kwargs = backbone_kwargs or {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net_a: nn.Module = build_backbone(backbone, self.num_classes, **kwargs)
            torch.manual_seed(seed + 1)
            self.net_b: nn.Module = build_backbone(backbone, self.num_classes, **kwargs)
        self.init_accuracy(self.num_classes)
        # clean probabilities [N] of the last co-divide (all ones before the first one)
        self.register_buffer("prob_a", torch.zeros(0))
        self.register_buffer("prob_b", torch.zeros(0))
        # normalised losses [2, K, N] of the last K co-divides (networks a, b; only with K > 1) and their count
        self.register_buffer("loss_history", torch.zeros(0))
        self.register_buffer("divide_count", torch.zeros((), dtype=torch.long))
        self._is_clean: Tensor | None = None
        self._clean_labels: Tensor | None = None  # [N] on the CPU, only to measure pseudo labels
        self._stage_counts: dict[str, Tensor] = {}  # this epoch's sums of the stage's counts
        # per network (a, b), as CPU dataset indices: the labelled set in this epoch's order, the unlabelled set
        self._labelled_orders: tuple[Tensor, Tensor] = (torch.zeros(0, dtype=torch.long),) * 2
        self._unlabelled_pools: tuple[Tensor, Tensor] = (torch.zeros(0, dtype=torch.long),) * 2
        self._noisy_labels: Tensor = torch.zeros(0, dtype=torch.long)
        self._empty_input: Tensor = torch.zeros(0)

    # ------------------------------------------------------------------ prediction
    @override
    def forward(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, C]`` log of the two networks' mean softmax (usable as logits)."""
        probs = (torch.softmax(self.net_a(x).float(), 1) + torch.softmax(self.net_b(x).float(), 1)) / 2
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    # ------------------------------------------------------------------ state
    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_sample_buffers(self, state_dict, prefix, ("prob_a", "prob_b", "loss_history"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @override
    def on_train_start(self) -> None:
        labels = find_training_labels(self.trainer)
        n = labels.num_samples
        if self.prob_a.shape != (n,) or self.prob_b.shape != (n,):
            self.prob_a = torch.ones(n, device=self.device)
            self.prob_b = torch.ones(n, device=self.device)
        window = int(self.hparams.loss_average_epochs)
        history_shape = (2, window, n) if window > 1 else (0,)
        if self.loss_history.shape != history_shape:
            self.loss_history = torch.zeros(history_shape, device="cpu")
            self.divide_count.zero_()
        self._is_clean = None if labels.clean is None else (labels.clean == labels.noisy).to(self.device)
        self._clean_labels = None if labels.clean is None else labels.clean.cpu()
        self._noisy_labels = labels.noisy.cpu()

    @property
    def in_warmup(self) -> bool:
        return self.current_epoch < self.hparams.warmup_epochs

    # ------------------------------------------------------------------ co-divide
    def per_sample_losses(self, net: nn.Module, loader: DataLoader, num_samples: int) -> Tensor:
        """``[N]`` float32 cross-entropy of ``net`` (eval mode) against the noisy labels: :func:`eval_mode_losses`."""
        return eval_mode_losses(self, net, loader, num_samples)

    def co_divide(self) -> None:
        """Fit the division of each network on its per-sample losses; fills ``prob_a`` and ``prob_b``."""
        loader = train_eval_loader(self.trainer, "DivideMix")
        n = int(self.prob_a.shape[0])
        hp = self.hparams
        window, count = int(hp.loss_average_epochs), int(self.divide_count)
        for row, (name, net) in enumerate((("prob_a", self.net_a), ("prob_b", self.net_b))):
            losses = self.per_sample_losses(net, loader, n).cpu()
            if window > 1:  # the ring's slots fill in order, so the first min(count + 1, K) hold the last ones
                self.loss_history[row, count % window] = normalise_losses(losses).to(self.loss_history)
                losses = self.loss_history[row, : min(count + 1, window)].mean(0)
            gmm = {"max_iter": hp.gmm_max_iter, "reg_covar": hp.gmm_reg_covar, "seed": hp.seed,
                   "max_fit_samples": hp.gmm_max_fit_samples}
            if hp.divide_per_class:
                prob = per_class_clean_probability(losses, self._noisy_labels, **gmm)
            else:
                prob = clean_probability(losses, **gmm)
            getattr(self, name).copy_(prob.to(self.prob_a))
        self.divide_count += 1
        threshold = hp.p_threshold
        # network a is trained with b's division and b with a's: their labelled sets in a random order, the same
        # on every rank (one pass per epoch, as the reference's labelled loader), and their unlabelled sets
        order = stream_generator(int(hp.seed), f"dividemix-labelled-order-{int(self.current_epoch)}")
        orders, pools = [], []
        for peer_prob in (self.prob_b, self.prob_a):
            labelled = torch.nonzero(peer_prob > threshold).flatten().cpu()
            orders.append(labelled[torch.randperm(labelled.numel(), generator=order)])
            pools.append(torch.nonzero(peer_prob <= threshold).flatten().cpu())
        self._labelled_orders, self._unlabelled_pools = (orders[0], orders[1]), (pools[0], pools[1])
        fraction = ((self.prob_a > threshold).float().mean() + (self.prob_b > threshold).float().mean()) / 2
        log_epoch(self, "codivide/labelled_fraction", fraction)
        if self._is_clean is not None and self._is_clean.any() and not self._is_clean.all():
            from lightning_noisy.metrics.selection import selection_scores

            clean = self._is_clean.cpu()
            for key, prob in (("noisy/codivide_auroc", self.prob_a), ("noisy/codivide_auroc_b", self.prob_b)):
                scores = selection_scores(prob.cpu().float(), prob.cpu() > threshold, clean, positive="clean")
                log_epoch(self, key, scores["auroc"])

    @override
    def on_train_epoch_start(self) -> None:
        if not self.in_warmup:
            self.co_divide()

    # ------------------------------------------------------------------ training
    def _generator(self, device: torch.device, batch_idx: int) -> torch.Generator | None:
        if self.augment is not None:
            return None
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return step_generator(self.hparams.seed, self.current_epoch, batch_idx, rank, device)

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.augment is not None:
            return self.augment(x)
        hp = self.hparams
        return default_augment(x, generator, noise_std=float(hp.augment_noise_std), max_shift=int(hp.augment_max_shift),
                               max_scale=float(hp.augment_max_scale), max_trend=float(hp.augment_max_trend))

    def _strong_augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.strong_augment(x) if self.strong_augment is not None else strong_augment(x, generator)

    def semi_supervised_loss(
        self, net: nn.Module, peer: nn.Module, batch: DividedBatch, lambda_u: float, generator: torch.Generator | None,
    ) -> StageResult:
        """The stage's loss of ``net`` on its labelled and unlabelled samples, ``peer`` guessing with it."""
        return self.stage.loss(net, peer, batch, lambda_u, generator)

    def fetch_inputs(self, indices: Tensor) -> Tensor:
        """``[len(indices), ...]`` training inputs of the dataset indices ``indices``, on the module's device.

        The inputs come from the training dataset itself (its own transform applied), as the reference
        code's labelled and unlabelled loaders do.
        """
        dataset = training_dataset(self.trainer, "DivideMix")
        items = [dataset[int(i)] for i in indices]
        if not items:
            return self._empty_input
        return default_collate([item[0] for item in items]).to(self.device)

    def draw_unlabelled(self, pool: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        """``[count]`` dataset indices drawn with replacement from ``pool [U]``; none when the pool is empty."""
        if pool.numel() == 0 or count == 0:
            count = 0
        device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.randint(max(pool.numel(), 1), (count,), generator=generator, device=device).cpu()
        return pool[draw]

    def labelled_batch_size(self, x: Tensor, labelled: int) -> int:
        """The per-rank labelled batch size for ``labelled`` samples; the same on every rank.

        ``labelled_batch_size`` when set, else half the training loader's batch size (else of this batch's
        size), as the reference code's MixMatch batches are half its warm-up batches; raised where needed
        so that the pass over the labelled set ends within the epoch's training steps.
        """
        size = self.hparams.labelled_batch_size
        if size is None:
            loader_size = getattr(self.trainer.train_dataloader, "batch_size", None)
            size = max(1, (loader_size if isinstance(loader_size, int) and loader_size > 0 else int(x.shape[0])) // 2)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):  # an iterable dataset of unknown length: the pass may not end
            return int(size)
        return max(int(size), math.ceil(labelled / (max(1, int(batches)) * self.trainer.world_size)))

    def warmup_loss(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy plus ``penalty_weight`` times the negative entropy; ``(loss, logits)``."""
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        if self.hparams.penalty_weight > 0:
            loss = loss - self.hparams.penalty_weight * entropy_loss(logits)
        return loss, logits.detach()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        optimizer_a, optimizer_b = self.optimizers()  # type: ignore[misc]
        trains = [True, True]
        if self.in_warmup:
            x_a = x_b = x
            if self.hparams.warmup_augment:  # one augmentation per network
                generator = self._generator(x.device, batch_idx)
                x_a, x_b = self._augment(x, generator), self._augment(x, generator)
            loss_a, logits_a = self.warmup_loss(self.net_a, x_a, y)
            loss_b, _ = self.warmup_loss(self.net_b, x_b, y)
            lambda_u = 0.0
        else:
            hp = self.hparams
            progress = self.current_epoch + batch_idx / max(1, int(self.trainer.num_training_batches))
            lambda_u = linear_rampup(progress, hp.warmup_epochs, hp.lambda_u, hp.rampup_length)
            generator = self._generator(x.device, batch_idx)
            self._empty_input = x[:0]
            world, rank = self.trainer.world_size, self.trainer.global_rank
            losses, trains = [], []
            # network a learns from b's division and guesses with b; b symmetrically
            for net, peer, prob, order, pool in (
                (self.net_a, self.net_b, self.prob_b, self._labelled_orders[0], self._unlabelled_pools[0]),
                (self.net_b, self.net_a, self.prob_a, self._labelled_orders[1], self._unlabelled_pools[1]),
            ):
                size = self.labelled_batch_size(x, order.numel())
                trains.append(batch_idx * world * size < order.numel())  # the same on every rank
                chosen = labelled_slice(order, batch_idx, size, world, rank)
                if chosen.numel() == 0:  # the pass is over, or this rank's share is: a zero loss whose backward
                    losses.append(0.0 * net(x[:1]).sum())  # still runs, as DDP expects after every forward
                    continue
                drawn = self.draw_unlabelled(pool, chosen.numel(), generator)
                clean = None if self._clean_labels is None else self._clean_labels[drawn].to(self.device)
                x_u = self.fetch_inputs(drawn)  # (before the labelled inputs: a transform's draws come in that order)
                divided = DividedBatch(self.fetch_inputs(chosen), self._noisy_labels[chosen].to(self.device),
                                       prob[chosen.to(prob.device)], x_u, clean)
                result = self.semi_supervised_loss(net, peer, divided, lambda_u, generator)
                losses.append(result.loss)
                self._add_stage_counts(result)
            loss_a, loss_b = losses
            logits_a = None
            if BatchContract.current_index(self) is not None:  # a callback on the batch contract reads logits
                with torch.no_grad():
                    logits_a = self.net_a(x)
        optimizer_a.zero_grad()
        optimizer_b.zero_grad()
        self.manual_backward(loss_a + loss_b)  # disjoint graphs: each network gets only its own gradient
        for optimizer, step in zip((optimizer_a, optimizer_b), trains):
            if step:  # no step once the network's labelled pass is over (no momentum or decay either)
                optimizer.step()
        batch_size = int(x.shape[0])
        for key, loss, step in (("train/loss_a", loss_a, trains[0]), ("train/loss_b", loss_b, trains[1])):
            if step:  # the mean over the steps that trained the network
                log_epoch(self, key, loss.detach(), batch_size=batch_size, prog_bar=key == "train/loss_a")
        log_epoch(self, "train/lambda_u", lambda_u, batch_size=batch_size)
        out = {"loss": (loss_a + loss_b).detach()}
        return out if logits_a is None else {**out, "logits": logits_a}

    def _add_stage_counts(self, result: StageResult) -> None:
        for key in self.stage.count_keys:
            value = result.counts[key].detach()
            self._stage_counts[key] = value if key not in self._stage_counts else self._stage_counts[key] + value

    def _log_stage_counts(self) -> dict[str, float]:
        """Log the stage's epoch metrics (FixMatch: mask rate, pseudo-label accuracy) from its counts summed over
        the ranks (a collective under DDP); returns what was logged."""
        if not self.stage.count_keys:
            return {}
        sums = torch.stack([self._stage_counts.get(k, torch.zeros((), device=self.device)).to(self.device).float()
                            for k in self.stage.count_keys])
        self._stage_counts = {}
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        totals = dict(zip(self.stage.count_keys, sums.cpu().tolist()))
        logged = self.stage.epoch_metrics(totals, clean_known=self._clean_labels is not None)
        for key, value in logged.items():
            log_epoch(self, key, value)
        return logged

    @override
    def on_train_epoch_end(self) -> None:
        if not self.in_warmup:
            self._log_stage_counts()
        step_schedules(self)

    # ------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return two_network_optimizers(self, (self.net_a, self.net_b))

