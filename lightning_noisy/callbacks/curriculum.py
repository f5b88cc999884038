"""CurriculumNet (Guo et al., ECCV 2018): density-based subsets trained in stages, as a callback.

Per class, the samples' features are ranked by local density in feature space (the density-peak
clustering of Rodriguez & Laio 2014 that the paper uses): a dense region holds samples whose labels
agree with their appearance (easy, mostly clean), sparse ones hold the semi-hard and the hard
(mostly mislabelled) samples. Training then adds the subsets in stages with sample weights
``1.0 / 0.5 / 0.5``.

:func:`density_curriculum` is the pure function; :class:`CurriculumCallback` computes the features
from the model being trained at a chosen epoch boundary (or takes precomputed subsets) and applies
the weights to an unmodified module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, rank_batches, train_eval_loader
from lightning_noisy.models import evaluating
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, StepContext

FeatureFn = Callable[[pl.LightningModule, Tensor], Tensor]


def _check_cutoff(cutoff_percentile: float) -> float:
    if not isinstance(cutoff_percentile, (int, float)) or not 0.0 < float(cutoff_percentile) < 100.0:
        raise ValueError(f"cutoff_percentile must be a number in (0, 100), got {cutoff_percentile!r}")
    return float(cutoff_percentile)


def local_density(features: Tensor, cutoff_percentile: float = 60.0) -> tuple[Tensor, Tensor]:
    """Density-peak statistics of one class: local density ``rho`` and distance to denser points ``delta``.

    ``D`` is the Euclidean distance matrix of the ``n`` samples; the cut-off distance ``d_c`` is the
    ``cutoff_percentile``-th percentile of the ``n (n - 1) / 2`` pairwise distances; ``rho_i`` counts the
    other samples closer than ``d_c``; ``delta_i`` is the distance to the nearest sample of higher density
    (the largest distance for a sample of the highest density). Computed in float64 on the CPU with
    ``O(n^2)`` memory (``8 n^2`` bytes for ``D``: 200 MB for a class of 5000 samples).

    Args:
        features: ``[n, D]`` features of the samples of one class.
        cutoff_percentile: percentile of the pairwise distances used as ``d_c``, in ``(0, 100)``.

    Returns:
        ``(rho [n] int64, delta [n] float64)``.
    """
    cutoff_percentile = _check_cutoff(cutoff_percentile)
    if features.ndim != 2:
        raise ValueError(f"features must be [n, D], got shape {tuple(features.shape)}")
    x = features.detach().to(device="cpu", dtype=torch.float64)
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64)
    distances = torch.cdist(x, x)
    upper = torch.triu_indices(n, n, offset=1)
    d_c = float(np.percentile(distances[upper[0], upper[1]].numpy(), cutoff_percentile))
    eye = torch.eye(n, dtype=torch.bool)
    rho = ((distances < d_c) & ~eye).sum(1)
    denser = rho[None, :] > rho[:, None]
    nearest_denser = distances.masked_fill(~denser, float("inf")).min(1).values
    delta = torch.where(denser.any(1), nearest_denser, distances.max(1).values)
    return rho, delta


def _split_by_density(rho: Tensor, num_subsets: int) -> Tensor:
    """K-means on the density values; clusters numbered by decreasing centre (0 = densest)."""
    from sklearn.cluster import KMeans

    values = rho.to(torch.float64).numpy().reshape(-1, 1)
    k = min(num_subsets, int(np.unique(values).shape[0]))
    if k <= 1:
        return torch.zeros(rho.shape[0], dtype=torch.long)
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=0).fit(values)
    rank = np.argsort(-kmeans.cluster_centers_[:, 0], kind="stable")  # rank[s] = cluster of subset s
    subset_of_cluster = np.empty(k, dtype=np.int64)
    subset_of_cluster[rank] = np.arange(k)
    return torch.from_numpy(subset_of_cluster[kmeans.labels_])


def density_curriculum(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    num_subsets: int = 3,
    cutoff_percentile: float = 60.0,
) -> Tensor:
    """Split every class into ``num_subsets`` subsets of decreasing feature-space density (CurriculumNet).

    For each class, :func:`local_density` gives the local density ``rho`` of its samples, and k-means
    (scikit-learn, ``n_init=10``, ``random_state=0``) on the density values splits them into
    ``num_subsets`` clusters, numbered by decreasing density: subset 0 is the easy (densest, mostly
    clean) subset, 1 the semi-hard, 2 the hard one. A class with fewer samples than ``num_subsets``, or
    whose samples all have the same density, is put entirely into subset 0; a class without samples is
    skipped. Memory is ``O(n_c^2)`` per class (the distance matrix of the largest class).

    Args:
        features: ``[N, D]`` features of the samples (e.g. the penultimate layer of a trained network).
        labels: ``[N]`` int64 (noisy) labels in ``[0, num_classes)``.
        num_classes: ``C``.
        num_subsets: number of subsets per class, ``>= 1``.
        cutoff_percentile: percentile of a class's pairwise distances used as the cut-off distance.

    Returns:
        ``[N]`` int64 subset ids in ``[0, num_subsets)``.
    """
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"num_subsets must be an integer >= 1, got {num_subsets!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    cutoff_percentile = _check_cutoff(cutoff_percentile)
    if not isinstance(features, Tensor) or features.ndim != 2:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2-D tensor [N, D], got {got}")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        got = f"dtype {labels.dtype} and shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer tensor [N], got {got}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"features and labels must have the same number of rows N, got {features.shape[0]} and {labels.shape[0]}"
        )
    labels = labels.detach().to(device="cpu", dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got min {int(labels.min())} and max {int(labels.max())}"
        )
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features must be finite, got NaN or infinite values")
    features = features.detach().to(device="cpu", dtype=torch.float64)
    subsets = torch.zeros(labels.shape[0], dtype=torch.long)
    for c in range(num_classes):  # a loop over classes, not samples
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < max(num_subsets, 2):
            continue
        rho, _ = local_density(features[members], cutoff_percentile)
        subsets[members] = _split_by_density(rho, num_subsets)
    return subsets


def default_features(pl_module: pl.LightningModule, x: Tensor) -> Tensor:
    """``pl_module.backbone.features(x)`` when the module has such a backbone (the package's models), else ``pl_module(x)``."""
    backbone = getattr(pl_module, "backbone", None)
    features = getattr(backbone, "features", None)
    if callable(features):
        return features(x)
    return pl_module(x)


class CurriculumCallback(SampleStateCallback):
    """CurriculumNet's staged training for an unmodified module.

    Until the end of epoch ``curriculum_epoch`` the model trains on all data (the paper's initial model
    "trained on the whole data"). At that epoch boundary the callback extracts features of the whole
    training set in order (eval mode, no gradient; ``trainer.datamodule.train_eval_dataloader()`` when the
    DataModule has it, else the training dataset in order), splits it with :func:`density_curriculum`
    on the given (noisy) labels, and from the next epoch on trains with the curriculum: subset 0 (easy)
    is active at once, subset ``s >= 1`` joins at epoch ``stage_epochs[s - 1]``; an active sample of
    subset ``s`` has weight ``subset_weights[s]``, an inactive one weight 0. With ``subsets`` given, the
    feature pass is skipped and the curriculum applies from the first epoch.

    Weighting mechanism: the gradient that flows back into the module's ``[B, C]`` forward output is
    scaled per row by ``w_i`` (a tensor hook registered on that output during the training step). The
    module's own loss is left untouched, so for any loss that is a batch mean of per-sample terms
    (cross-entropy, label smoothing, GCE, SCE, forward-corrected CE, ...) the parameter gradient is
    exactly that of ``(1/B) sum_i w_i l_i``, and a weight-0 sample contributes nothing through its
    logits. The logged training loss stays the unweighted one. Layers that mix samples of a batch
    before the logits (BatchNorm statistics) still see the inactive samples, and losses that mix
    samples (mixup) are not weighted exactly. The module must produce its logits by calling itself
    (``self(x)``), the default way the batch contract captures them.

    Logged each epoch: ``curriculum/active_fraction`` (share of samples with non-zero weight) and, when
    the clean labels are known, ``curriculum/clean_precision_easy`` (share of subset-0 samples whose
    given label is clean) and ``curriculum/subset_{s}_fraction``.

    Args:
        curriculum_epoch: the epoch at whose end the features are taken from the model (ignored when
            ``subsets`` is given).
        stage_epochs: epochs at which subsets ``1, 2, ...`` join, increasing, all after
            ``curriculum_epoch``; ``len(subset_weights) - 1`` entries.
        subset_weights: weight of each subset's samples once active; its length is the number of
            subsets (the paper: ``1.0, 0.5, 0.5``).
        cutoff_percentile: percentile of the pairwise distances used as the cut-off distance ``d_c``.
        subsets: ``[N]`` precomputed subset ids (e.g. from another backbone); skips the feature pass.
        feature_fn: ``feature_fn(pl_module, x) -> [B, D]``; by default :func:`default_features`.
        feature_batch_size: batch size of the fallback feature loader when the DataModule has no
            ``train_eval_dataloader``.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        curriculum_epoch: int = 4,
        stage_epochs: Sequence[int] = (10, 20),
        subset_weights: Sequence[float] = (1.0, 0.5, 0.5),
        cutoff_percentile: float = 60.0,
        subsets: Tensor | None = None,
        feature_fn: FeatureFn | None = None,
        feature_batch_size: int = 256,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key)
        if isinstance(curriculum_epoch, bool) or not isinstance(curriculum_epoch, int) or curriculum_epoch < 0:
            raise ValueError(f"curriculum_epoch must be an integer >= 0, got {curriculum_epoch!r}")
        weights = [float(w) for w in subset_weights]
        if not weights or any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"subset_weights must be a non-empty list of finite weights >= 0, got {list(subset_weights)}")
        stages = list(stage_epochs)
        if len(stages) != len(weights) - 1 or any(isinstance(e, bool) or not isinstance(e, int) for e in stages):
            raise ValueError(
                f"stage_epochs must hold len(subset_weights) - 1 = {len(weights) - 1} integer epochs, got {stages}"
            )
        first = 0 if subsets is not None else curriculum_epoch + 1
        if any(b <= a for a, b in zip([first - 1, *stages], stages)):
            raise ValueError(
                f"stage_epochs must be increasing and after the curriculum starts (epoch {first}), got {stages}"
            )
        if subsets is not None:
            if not isinstance(subsets, Tensor) or subsets.ndim != 1 or subsets.is_floating_point():
                raise ValueError(f"subsets must be a 1-D integer tensor [N], got {subsets!r}")
            if subsets.numel() and (int(subsets.min()) < 0 or int(subsets.max()) >= len(weights)):
                raise ValueError(
                    f"subsets must be in [0, {len(weights)}), got min {int(subsets.min())} and max {int(subsets.max())}"
                )
        if isinstance(feature_batch_size, bool) or not isinstance(feature_batch_size, int) or feature_batch_size < 1:
            raise ValueError(f"feature_batch_size must be an integer >= 1, got {feature_batch_size!r}")
        self.curriculum_epoch = curriculum_epoch
        self.stage_epochs = stages
        self.subset_weights = weights
        self.num_subsets = len(weights)
        self.cutoff_percentile = _check_cutoff(cutoff_percentile)
        self.given_subsets = None if subsets is None else subsets.detach().to("cpu", torch.long).clone()
        self.feature_fn: FeatureFn = feature_fn if feature_fn is not None else default_features
        self.feature_batch_size = feature_batch_size
        self.subsets: SampleBuffer | None = None
        self._weights: Tensor | None = None  # [B] weights of the running step
        self._weighted = False
        self._hook: RemovableHandle | None = None

    # -- schedule --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the subsets are known (computed, given, or restored from a checkpoint)."""
        return self.subsets is not None and bool(self.subsets.visited.all())

    def subset_weight_table(self, epoch: int) -> Tensor:
        """``[num_subsets]`` float32 weights at ``epoch`` (0 for subsets not yet active)."""
        joins = torch.tensor([0, *self.stage_epochs])
        active = joins <= epoch
        return torch.tensor(self.subset_weights, dtype=torch.float32) * active

    def sample_weights(self, epoch: int) -> Tensor | None:
        """``[N]`` float32 weights of the training samples at ``epoch``; ``None`` before the curriculum applies."""
        if not self.ready or (self.given_subsets is None and epoch <= self.curriculum_epoch):
            return None
        assert self.subsets is not None
        return self.subset_weight_table(epoch)[self.subsets.values]

    # -- hooks ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self._hook is None:
            self._hook = pl_module.register_forward_hook(self._scale_gradient)

    @override
    def _release(self) -> None:
        super()._release()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._weights = None

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        self.subsets = SampleBuffer(labels.num_samples, (), torch.long, fill=0)
        if self.given_subsets is not None:
            if self.given_subsets.shape[0] != labels.num_samples:
                raise ValueError(
                    f"subsets has {self.given_subsets.shape[0]} entries but the training set has {labels.num_samples} samples"
                )
            self.subsets.write(torch.arange(labels.num_samples), self.given_subsets)

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        weights = self.sample_weights(trainer.current_epoch)
        self._weighted = weights is not None
        self._weights = None if weights is None else weights[context.index.cpu()].to(pl_module.device)

    def _scale_gradient(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        weights = self._weights
        if weights is None or not isinstance(output, Tensor) or not module.training:
            return
        if output.ndim != 2 or output.shape[0] != weights.shape[0] or not output.requires_grad:
            return
        self._weights = None  # only the first [B, C] output of the step: the logits
        output.register_hook(lambda grad: grad * weights.to(grad.dtype)[:, None])

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if self._weighted and self._weights is not None:
            self._weights = None
            raise RuntimeError(
                "CurriculumCallback weights the gradient of the module's forward output, but this training step "
                "produced no [B, C] output by calling the LightningModule: compute the logits with `self(x)`"
            )
        self._weights = None

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.subsets is not None and self.training_labels is not None
        epoch = trainer.current_epoch
        if self.given_subsets is None and epoch == self.curriculum_epoch:
            self._compute_subsets(trainer, pl_module)
        metrics: dict[str, Tensor] = {}
        weights = self.sample_weights(epoch)
        if weights is not None:
            metrics["curriculum/active_fraction"] = (weights > 0).float().mean()
        if self.ready:
            labels = self.training_labels
            for s in range(self.num_subsets):
                metrics[f"curriculum/subset_{s}_fraction"] = (self.subsets.values == s).float().mean()
            easy = self.subsets.values == 0
            if labels.clean is not None and bool(easy.any()):
                metrics["curriculum/clean_precision_easy"] = (labels.noisy[easy] == labels.clean[easy]).float().mean()
        if metrics:
            self.log_epoch_metrics(pl_module, metrics)

    def _compute_subsets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Features of the whole training set from the current model, then the density subsets.

        Rank ``r`` of ``W`` loads and runs only the batches ``batch_idx % W == r`` (:func:`rank_batches`)
        and the features are gathered, so every rank computes the same subsets.
        """
        assert self.subsets is not None and self.training_labels is not None
        recorder: SampleRecorder | None = None
        with evaluating(pl_module), torch.no_grad():
            loader = train_eval_loader(trainer, "CurriculumCallback", self.feature_batch_size)
            for _, batch in rank_batches(loader, trainer.global_rank, trainer.world_size):
                index, features = self._batch_features(pl_module, batch)
                if recorder is None:
                    recorder = SampleRecorder((int(features.shape[1]),), torch.float32)
                recorder.add(index, features)
            first = next(iter(loader), None) if recorder is None else None
            if first is not None:  # a rank without batches (more ranks than batches) still needs D to gather
                recorder = SampleRecorder((int(self._batch_features(pl_module, first)[1].shape[1]),), torch.float32)
        if recorder is None:
            raise ValueError("CurriculumCallback's feature pass found no training samples")
        index, features, _ = recorder.gather(trainer.strategy.root_device, reduction="first")
        labels = self.training_labels
        if index.shape[0] != labels.num_samples:
            raise RuntimeError(
                f"CurriculumCallback's feature pass covered {index.shape[0]} of {labels.num_samples} training samples"
            )
        subsets = density_curriculum(
            features, labels.noisy[index], labels.num_classes, self.num_subsets, self.cutoff_percentile
        )
        self.subsets.write(index, subsets)

    def _batch_features(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        """``(index [B], features [B, D])`` of one ``[input, target, index]`` batch."""
        if not isinstance(batch, (list, tuple)) or len(batch) != 3:
            raise ValueError("CurriculumCallback's feature pass needs batches [input, target, index]")
        x = move_data_to_device(batch[0], pl_module.device)
        return batch[2].to(torch.long), self.feature_fn(pl_module, x).detach().float().flatten(1)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        return {} if self.subsets is None else {"subsets": self.subsets}
