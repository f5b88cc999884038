"""Deep Self-Learning (Han, Luo, Wang, "Deep Self-Learning From Noisy Labels", ICCV 2019): class prototypes
chosen from the network's own features by density, and pseudo labels from the similarity to them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import find_training_labels, log_epoch, rank_batches, train_eval_loader
from lightning_noisy.methods.classifier import NoisyClassifier, resize_sample_buffers, split_batch
from lightning_noisy.models import evaluating
from lightning_noisy.state import BatchContract
from lightning_noisy.state.gather import all_gather_uneven, is_distributed

__all__ = ["SelfLearning", "pseudo_labels", "select_prototypes", "similarity_density"]


def _cosine_matrix(features: Tensor) -> Tensor:
    normed = F.normalize(features.float(), dim=1)
    return normed @ normed.T


def similarity_density(features: Tensor, percentile: float = 60.0) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine similarities, densities ``rho`` and ``eta`` of Han et al. (2019), Sec. 3.2.

    ``S_ij = cos(f_i, f_j)``; ``S_c`` is the entry at position ``floor(percentile / 100 * (m^2 - 1))`` of the
    ``m x m`` entries of ``S`` sorted in ascending order. The paper takes the value "ranked top 40%", which
    has 40% of the similarities above it: ``percentile = 60``. The density is
    ``rho_i = sum_j sign(S_ij - S_c)`` (``j`` over all ``m`` samples, ``i`` included, which shifts every
    ``rho`` by the same constant); ``eta_i = max_{j: rho_j > rho_i} S_ij``, and ``eta_i = min_j S_ij`` for the
    samples of the highest density.

    Args:
        features: ``[m, D]`` features of one class's samples (``m >= 1``).
        percentile: position of ``S_c`` among the sorted similarities, in ``[0, 100]``.

    Returns:
        ``(S [m, m], rho [m], eta [m])``, float32.
    """
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [m, D] with m >= 1, got {tuple(features.shape)}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    sim = _cosine_matrix(features)
    flat = sim.flatten().sort().values
    s_c = flat[int(float(percentile) / 100.0 * (flat.numel() - 1))]
    rho = torch.sign(sim - s_c).sum(1)
    denser = rho[None, :] > rho[:, None]  # denser[i, j]: rho_j > rho_i
    masked = sim.masked_fill(~denser, float("-inf"))
    eta = masked.max(1).values
    densest = ~denser.any(1)
    eta = torch.where(densest, sim.min(1).values, eta)
    return sim, rho, eta


def select_prototypes(features: Tensor, num_prototypes: int, percentile: float = 60.0, eta_max: float = 0.95) -> Tensor:
    """Indices of the ``p`` prototypes of one class (Han et al. 2019, Sec. 3.2).

    Prototypes are the samples with the highest density ``rho`` among those with ``eta < eta_max`` (not
    nearly a copy of a denser sample), so they are both typical and spread over the class. Ties in ``rho``
    are broken by position. When fewer than ``p`` samples pass the ``eta`` test, the remaining slots are
    filled with the densest of the others (the paper does not say; this keeps ``p`` prototypes whenever
    ``m >= p``).

    Args:
        features: ``[m, D]`` features of the class's sampled images.
        num_prototypes: ``p`` (paper: 8).
        percentile: position of ``S_c``, see :func:`similarity_density` (paper: 60, "top 40%").
        eta_max: the ``eta`` threshold (paper: 0.95).

    Returns:
        int64 indices ``[min(p, m)]`` into ``features``, densest first.
    """
    if isinstance(num_prototypes, bool) or int(num_prototypes) < 1:
        raise ValueError(f"num_prototypes must be an integer >= 1, got {num_prototypes!r}")
    _, rho, eta = similarity_density(features, percentile)
    order = torch.argsort(-rho, stable=True)
    passing = eta[order] < eta_max
    ranked = torch.cat([order[passing], order[~passing]])
    return ranked[: int(num_prototypes)].to(torch.long)


def pseudo_labels(features: Tensor, prototypes: Tensor | Sequence[Tensor]) -> Tensor:
    """``argmax_c`` of the mean cosine similarity of each feature to class ``c``'s prototypes.

    Args:
        features: ``[N, D]``.
        prototypes: ``[C, p, D]``, or a sequence of ``C`` tensors ``[p_c, D]`` (a class with ``p_c = 0``
            never wins).

    Returns:
        int64 pseudo labels ``[N]``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got {tuple(features.shape)}")
    if isinstance(prototypes, Tensor):
        if prototypes.ndim != 3 or prototypes.shape[2] != features.shape[1]:
            raise ValueError(f"prototypes must be [C, p, D] with D = {features.shape[1]}, got {tuple(prototypes.shape)}")
        prototypes = list(prototypes)
    if len(prototypes) < 1:
        raise ValueError("prototypes must hold at least one class")
    normed = F.normalize(features.float(), dim=1)
    scores = []
    for proto in prototypes:
        if proto.ndim != 2 or proto.shape[1] != features.shape[1]:
            raise ValueError(f"each class's prototypes must be [p, {features.shape[1]}], got {tuple(proto.shape)}")
        if proto.shape[0] == 0:
            scores.append(torch.full((features.shape[0],), float("-inf"), device=features.device))
        else:
            scores.append((normed @ F.normalize(proto.float().to(features.device), dim=1).T).mean(1))
    return torch.stack(scores, 1).argmax(1)


class SelfLearning(NoisyClassifier):
    """Deep Self-Learning (Han, Luo, Wang, ICCV 2019) for a single network.

    Epochs ``[0, warmup_epochs)`` train on the noisy labels with the configured loss (cross-entropy by
    default). From ``warmup_epochs`` on, every ``correction_interval`` epochs the label-correction phase runs
    at the start of the epoch: one pass over the whole training set in order and in eval mode (the
    DataModule's ``train_eval_dataloader()``, else the training dataset with the training loader's batch
    size) gives the features (:meth:`correction_features`); for each class, ``num_sampled`` samples of that noisy
    label are drawn at random, and :func:`select_prototypes` picks ``num_prototypes`` prototypes among them;
    every training sample gets the pseudo label :func:`pseudo_labels`. Under DDP the pass is split between
    the ranks and only the sampled features travel (:meth:`correct_labels_distributed`), so no rank holds
    the ``[N, D]`` features. Training then minimises ``(1 - alpha) L(logits, noisy y) + alpha L(logits, pseudo y)``.

    The pseudo labels live in the buffer ``pseudo_label`` ``[N]`` (``-1`` before the first correction), so
    they are checkpointed. The batch must carry the dataset index (``[x, y, index]``, or taken out by the
    package's callbacks, see :class:`~lightning_noisy.state.BatchContract`) once pseudo labels exist.

    DDP: the sampling uses a ``torch.Generator`` seeded from ``(seed, epoch)`` and every rank runs the whole
    feature pass itself (no sampler splits it), so all ranks hold identical pseudo labels without any
    communication; the pass costs one evaluation epoch over the training set per rank.

    Logged: ``train/loss``, ``train/loss_noisy``, ``train/loss_pseudo``; at each correction
    ``noisy/pseudo_label_changed`` (share of pseudo labels that differ from the noisy label) and, when the
    clean labels are known, ``noisy/pseudo_label_recovery`` (share equal to the clean label); ``test/acc``
    and ``test/acc_best`` as :class:`NoisyClassifier`.

    Args:
        warmup_epochs: epochs of plain training on the noisy labels before the first correction (>= 0).
        correction_interval: epochs between label-correction phases (>= 1; the paper corrects every epoch).
        alpha: weight of the pseudo-label term, in ``[0, 1]`` (paper: 0.5).
        num_sampled: ``m``, samples per class drawn for the prototypes (paper: 1280).
        num_prototypes: ``p``, prototypes per class (paper: 8).
        percentile: position of ``S_c`` among the sorted similarities, in % from the smallest (paper: 60,
            the value "ranked top 40%").
        feature_pooling: ``"none"`` takes ``backbone.features(x)``; ``"mean"`` averages
            ``backbone.feature_map(x)`` ``[B, channels, ...]`` over its positions, a position-free feature
            like the paper's globally pooled ResNet-50 output, for backbones whose ``features`` are a
            flattened map (``cnn1d``). Used for the label correction only.
        eta_max: prototypes have ``eta < eta_max`` (paper: 0.95).
        seed: seed of the per-epoch sampling generator.
        **kwargs: the :class:`NoisyClassifier` arguments (``mixup_alpha`` must stay 0).
    """

    def __init__(
        self,
        warmup_epochs: int = 10,
        correction_interval: int = 1,
        alpha: float = 0.5,
        num_sampled: int = 1280,
        num_prototypes: int = 8,
        percentile: float = 60.0,
        eta_max: float = 0.95,
        feature_pooling: Literal["none", "mean"] = "none",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        for name, value, low in (("warmup_epochs", warmup_epochs, 0), ("correction_interval", correction_interval, 1),
                                 ("num_sampled", num_sampled, 1), ("num_prototypes", num_prototypes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if not -1.0 < float(eta_max) <= 1.0:
            raise ValueError(f"eta_max must be in (-1, 1], got {eta_max}")
        if feature_pooling not in ("none", "mean"):
            raise ValueError(f"feature_pooling must be 'none' or 'mean', got {feature_pooling!r}")
        if feature_pooling == "mean" and not callable(getattr(self.backbone, "feature_map", None)):
            raise ValueError(
                f"feature_pooling='mean' needs a backbone with `feature_map(x)` [B, channels, ...]; "
                f"{type(self.backbone).__name__} has none (its `features` may already be pooled: use 'none')"
            )
        if num_prototypes > num_sampled:
            raise ValueError(f"num_prototypes ({num_prototypes}) must be <= num_sampled ({num_sampled})")
        if self.hparams.mixup_alpha > 0:
            raise ValueError("SelfLearning does not support mixup_alpha > 0 (pseudo labels are per sample)")
        self.register_buffer("pseudo_label", torch.empty(0, dtype=torch.long))
        self._noisy: Tensor | None = None
        self._clean: Tensor | None = None

    # -- label correction ---------------------------------------------------------------------------

    def is_correction_epoch(self, epoch: int) -> bool:
        """Whether the label-correction phase runs at the start of ``epoch``."""
        hp = self.hparams
        return epoch >= hp.warmup_epochs and (epoch - hp.warmup_epochs) % hp.correction_interval == 0

    def sample_generator(self, epoch: int) -> torch.Generator:
        """The CPU generator of ``epoch``'s sampling, seeded from ``(seed, epoch)``: the same on every rank."""
        return torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + int(epoch))

    def correction_features(self, x: Tensor) -> Tensor:
        """``[B, D]`` features of a batch for the label correction (see ``feature_pooling``)."""
        if self.hparams.feature_pooling == "mean":
            return self.backbone.feature_map(x).flatten(2).mean(2)
        return self.backbone.features(x)

    @torch.no_grad()
    def rank_features(self, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """``(index [M], features [M, D])`` of this rank's share of the training set (eval mode, no grad).

        The batches ``batch_idx % world_size == rank`` of the in-order training loader
        (:func:`~lightning_noisy.callbacks.base.rank_batches`); the features are on this module's device.
        """
        chunks: list[tuple[Tensor, Tensor]] = []
        loader = train_eval_loader(self.trainer, "SelfLearning")
        with evaluating(self):
            for batch_idx, batch in rank_batches(loader, rank, world_size):
                x = batch[0].to(self.device)
                index = batch[2] if isinstance(batch, (list, tuple)) and len(batch) == 3 else None
                if index is None:  # in order: batch b starts at b x batch size
                    start = batch_idx * int(loader.batch_size or x.shape[0])
                    index = torch.arange(start, start + x.shape[0])
                chunks.append((index.long().cpu(), self.correction_features(x).float()))
        if not chunks:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, device=self.device)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def training_features(self) -> Tensor:
        """``[N, D]`` features of the whole training set (eval mode, no grad), on this module's device."""
        index, feats = self.rank_features()
        total = int(self._noisy.shape[0]) if self._noisy is not None else int(index.max()) + 1
        out = feats.new_zeros(total, feats.shape[1])
        out[index.to(feats.device)] = feats
        return out

    def sampled_indices(self, noisy: Tensor, epoch: int) -> list[Tensor]:
        """Per class, the dataset indices of the (at most) ``num_sampled`` samples its prototypes are chosen
        from: a draw seeded by ``(seed, epoch)``, the same on every rank."""
        generator = self.sample_generator(epoch)
        noisy = noisy.cpu()
        sampled = []
        for c in range(self.num_classes):
            members = (noisy == c).nonzero().flatten()
            if members.numel():
                members = members[torch.randperm(members.numel(), generator=generator)[: self.hparams.num_sampled]]
            sampled.append(members)
        return sampled

    def class_prototypes(self, sampled_features: Sequence[Tensor]) -> list[Tensor]:
        """Each class's prototypes ``[p_c, D]`` among its sampled features ``[m_c, D]`` (none for ``m_c = 0``)."""
        hp = self.hparams
        return [features[select_prototypes(features, hp.num_prototypes, hp.percentile, hp.eta_max)]
                if features.shape[0] else features for features in sampled_features]

    def correct_labels(self, features: Tensor, noisy: Tensor, epoch: int) -> Tensor:
        """Prototypes per class from a seeded sample of ``features``, then the pseudo labels ``[N]``.

        Args:
            features: ``[N, D]`` training features.
            noisy: ``[N]`` noisy labels.
            epoch: seeds the sampling (with ``seed``).
        """
        sampled = self.sampled_indices(noisy, epoch)
        prototypes = self.class_prototypes([features[index.to(features.device)] for index in sampled])
        return pseudo_labels(features, prototypes)

    def correct_labels_distributed(self, noisy: Tensor, epoch: int) -> Tensor:
        """:meth:`correct_labels` of the whole training set, the feature pass split between the DDP ranks.

        Each rank computes the features of its share of the batches only; the sampled samples' features
        are gathered (``C x num_sampled`` rows, not ``N``), every rank picks the same prototypes, labels its
        own share, and the ``[N]`` pseudo labels are gathered. A collective: call it on every rank. The
        labels are those of one process running the whole pass, bit for bit.
        """
        assert self._trainer is not None
        trainer, device = self.trainer, self.trainer.strategy.root_device
        index, features = self.rank_features(trainer.global_rank, trainer.world_size)
        sampled = self.sampled_indices(noisy, epoch)
        wanted = torch.cat(sampled)
        order = torch.argsort(index)
        position = torch.searchsorted(index[order], wanted).clamp(max=max(index.numel() - 1, 0))
        held = (index[order][position] == wanted) if index.numel() else torch.zeros_like(wanted, dtype=torch.bool)
        slots = torch.nonzero(held).flatten()
        rows = features[order[position[held]].to(features.device)]
        dim = torch.tensor([features.shape[1] if index.numel() else 0], device=device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)  # a rank without batches still sends
        rows = rows.reshape(-1, int(dim)).to(device)
        pairs = torch.cat([slots.to(device, torch.float64)[:, None], rows.double()], 1)
        gathered = torch.cat(all_gather_uneven(pairs)).cpu()
        sampled_features = torch.empty(wanted.numel(), int(dim))
        sampled_features[gathered[:, 0].long()] = gathered[:, 1:].float()
        sizes = [s.numel() for s in sampled]
        prototypes = self.class_prototypes(list(sampled_features.to(self.device).split(sizes)))  # where one process has them
        mine = pseudo_labels(features.reshape(-1, int(dim)), prototypes).cpu() if index.numel() else index
        labelled = torch.stack([index, mine], 1).to(device)
        everyone = torch.cat(all_gather_uneven(labelled)).cpu()
        labels = torch.full((noisy.shape[0],), -1, dtype=torch.long)
        labels[everyone[:, 0]] = everyone[:, 1]
        if everyone.shape[0] != noisy.shape[0] or bool((labels < 0).any()):
            raise RuntimeError(
                f"SelfLearning's feature pass covered {everyone.shape[0]} samples, expected each of the "
                f"{noisy.shape[0]} training samples once"
            )
        return labels

    @override
    def on_train_start(self) -> None:
        labels = find_training_labels(self.trainer)
        self._noisy, self._clean = labels.noisy, labels.clean
        n = int(labels.noisy.shape[0])
        if self.pseudo_label.shape != (n,):  # a fresh run; a resumed one keeps its checkpointed labels
            self.pseudo_label = torch.full((n,), -1, dtype=torch.long, device=self.device)

    @override
    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if not self.is_correction_epoch(epoch) or self._noisy is None:
            return
        if self._trainer is not None and self.trainer.world_size > 1 and is_distributed():
            labels = self.correct_labels_distributed(self._noisy, epoch)
        else:
            labels = self.correct_labels(self.training_features(), self._noisy, epoch)
        self.pseudo_label = labels.to(self.pseudo_label.device)
        noisy = self._noisy.to(labels.device)
        log_epoch(self, "noisy/pseudo_label_changed", (labels != noisy).float().mean())
        if self._clean is not None:
            recovery = (labels == self._clean.to(labels.device)).float().mean()
            log_epoch(self, "noisy/pseudo_label_recovery", recovery)

    @override
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_sample_buffers(self, state_dict, prefix, ("pseudo_label",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- training ------------------------------------------------------------------------------------

    def _batch_index(self, batch: Any) -> Tensor | None:
        if isinstance(batch, (list, tuple)) and len(batch) == 3:
            return batch[2]
        return BatchContract.current_index(self)

    def self_learning_loss(self, logits: Tensor, noisy: Tensor, pseudo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``((1 - alpha) L(logits, noisy) + alpha L(logits, pseudo), L(logits, noisy), L(logits, pseudo))``."""
        alpha = float(self.hparams.alpha)
        loss_noisy = self.compute_loss(logits, noisy)
        loss_pseudo = self.compute_loss(logits, pseudo)
        return (1.0 - alpha) * loss_noisy + alpha * loss_pseudo, loss_noisy, loss_pseudo

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        logits = self(x)
        batch_size = int(x.shape[0])
        corrected = self.pseudo_label.numel() > 0 and bool((self.pseudo_label >= 0).all())
        if self.current_epoch >= self.hparams.warmup_epochs and corrected:
            index = self._batch_index(batch)
            if index is None:
                raise RuntimeError(
                    "SelfLearning needs each training batch's dataset index after warm-up: return "
                    "(x, y, index) from the training dataset (NoisyLabelDataset(return_index=True)) or use the "
                    "package's DataModules / callbacks"
                )
            pseudo = self.pseudo_label[index.to(self.pseudo_label.device)].to(logits.device)
            loss, loss_noisy, loss_pseudo = self.self_learning_loss(logits, y, pseudo)
            log_epoch(self, "train/loss_noisy", loss_noisy, batch_size=batch_size)
            log_epoch(self, "train/loss_pseudo", loss_pseudo, batch_size=batch_size)
        else:
            loss = self.compute_loss(logits, y)
        log_epoch(self, "train/loss", loss, batch_size=batch_size, prog_bar=True)
        return {"loss": loss, "logits": logits}
