"""DivideMix's co-divide (Li, Socher, Hoi, ICLR 2020): a two-component GMM on the per-sample losses.

Clean samples are learnt first, so early in training their cross-entropy is low. DivideMix fits a
two-component Gaussian mixture to the (min-max normalised) per-sample losses of the whole training set
and takes the posterior of the low-mean component as each sample's probability of being clean; the
samples with probability above ``p_threshold`` form the labelled set, the others the unlabelled set.

:func:`clean_probability` is the pure function; :class:`CoDivideCallback` runs the loss pass over the
training set at each epoch boundary (sharded over the DDP ranks and gathered, so every rank has the
same division) and exposes the division to a module (e.g. DivideMix's, which calls :meth:`divide`
for each of its two networks) or to the user.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_noisy.callbacks.base import (
    SampleStateCallback,
    TrainingLabels,
    log_histogram,
    rank_batches,
    train_eval_loader,
)
from lightning_noisy.losses._targets import check_finite_non_negative
from lightning_noisy.metrics.selection import selection_scores
from lightning_noisy.models import evaluating
from lightning_noisy.callbacks.sharded_division import (
    clean_probability_sharded,
    mixture_params,
    mixture_posterior,
    normalise_losses_sharded,
    warn_degenerate_losses,
)
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder
from lightning_noisy.state.batch import StepContext
from lightning_noisy.state.fetch import RowFetcher, planned_batches
from lightning_noisy.state.gather import is_distributed
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.sharded import gather_scalars
from lightning_noisy.state.storage import StateOptions, StorageDtype

ModelFn = Callable[[pl.LightningModule, Tensor], Tensor]


def _check_losses(losses: Any) -> None:
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"losses must be a 1-D tensor [N], got {got}")


def check_max_fit_samples(value: Any, name: str = "max_fit_samples") -> int | None:
    """``value`` if it is ``None`` or an integer ``>= 2`` (the most losses a mixture is fit to), else ValueError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"{name} must be None or an integer >= 2, got {value!r}")
    return value


def normalise_losses(losses: Tensor) -> Tensor:
    """Min-max normalise ``losses [N]`` to ``[0, 1]`` (float32).

    The minimum and maximum are taken over the finite values; non-finite values stay non-finite. When
    all finite values are equal they map to 0.
    """
    _check_losses(losses)
    x = losses.detach().to(device="cpu", dtype=torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        return x.clone()
    low, high = x[finite].min(), x[finite].max()
    span = high - low
    if float(span) <= 0:
        return torch.where(finite, torch.zeros_like(x), x)
    return (x - low) / span


def low_component_posterior(gmm: Any, x: np.ndarray) -> np.ndarray:
    """Posterior of the lower-mean component of a fitted 1-D, 2-component ``GaussianMixture`` at ``x [N]``.

    The same value as ``gmm.predict_proba(x[:, None])[:, low]``, computed in closed form from the fitted
    weights, means and precisions: ``sigmoid(log w_low N(x | low) - log w_high N(x | high))``, without
    scikit-learn's general E-step (a quarter of the division's time on 1e6 losses).
    """
    return mixture_posterior(mixture_params(gmm), x)


DEFAULT_MAX_FIT_SAMPLES = 100_000


def clean_probability(
    losses: Tensor,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    seed: int = 0,
    max_fit_samples: int | None = DEFAULT_MAX_FIT_SAMPLES,
) -> Tensor:
    """Probability that each sample is clean: a 2-component GMM on the normalised losses (DivideMix).

    scikit-learn's ``GaussianMixture(n_components=2, max_iter, tol, reg_covar, random_state=seed)`` is fit
    to :func:`normalise_losses` of ``losses`` reshaped ``[N, 1]`` (DivideMix's settings are the defaults),
    and the posterior of the component with the smaller mean is returned. Deterministic given ``seed``.

    With more than ``max_fit_samples`` finite losses, the mixture is fit to ``max_fit_samples`` of them,
    drawn uniformly without replacement (``numpy.random.default_rng(seed).choice``), and the posterior
    is computed for every sample. The mixture has five parameters, and 1e5 losses estimate them closely.
    A fit to all of 1e6 losses takes 0.8-2.2 s here, depending on how many EM steps it needs. DivideMix's
    own Clothing1M code fits its mixture to a 32,000-image subset. ``None`` fits to all the losses.

    Degenerate input is answered with a :class:`UserWarning` and a fallback: non-finite losses get
    probability 0; if the remaining finite losses are fewer than 2 or all equal, they all get 1.0
    (nothing to split); otherwise the GMM is fit to the finite losses alone.

    Args:
        losses: ``[N]`` per-sample losses (lower = more likely clean).
        max_iter, tol, reg_covar: the mixture's EM settings.
        seed: ``random_state`` of the mixture and seed of the fitting subset.
        max_fit_samples: the most losses the mixture is fit to (``>= 2``), or ``None`` for all.

    Returns:
        ``[N]`` float32 probabilities on the CPU.
    """
    from sklearn.mixture import GaussianMixture

    _check_losses(losses)
    check_max_fit_samples(max_fit_samples)
    x = losses.detach().to(device="cpu", dtype=torch.float64)
    n = x.shape[0]
    finite = torch.isfinite(x)
    probability = torch.zeros(n, dtype=torch.float32)
    values = x[finite]
    # min < max is the same test as "two distinct values", without unique's sort (0.08 s per 1e6)
    distinct = 0 if values.numel() == 0 else 1 if bool(values.min() == values.max()) else 2
    warn_degenerate_losses(n, n - values.numel(), values.numel(), distinct)
    if distinct < 2:
        probability[finite] = 1.0
        return probability
    data = normalise_losses(values).to(torch.float64).numpy().reshape(-1, 1)
    fit_data = data
    if max_fit_samples is not None and data.shape[0] > max_fit_samples:
        chosen = np.random.default_rng(seed).choice(data.shape[0], size=max_fit_samples, replace=False)
        fit_data = data[chosen]
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge.*")  # DivideMix caps EM at 10 iterations
        gmm.fit(fit_data)
    probability[finite] = torch.from_numpy(low_component_posterior(gmm, data[:, 0]).astype(np.float32))
    return probability


def per_class_clean_probability(
    losses: Tensor,
    labels: Tensor,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    seed: int = 0,
    max_fit_samples: int | None = DEFAULT_MAX_FIT_SAMPLES,
) -> Tensor:
    """:func:`clean_probability` fit separately to the losses of each (noisy) class.

    A global mixture can label a class's samples all noisy: once a network predicts one class almost
    everywhere, the samples labelled with that class have the lowest losses and the mixture's clean
    component holds only them. One mixture per class keeps the lower-loss part of every class labelled
    (class-balanced selection, as in later methods such as UNICON; not part of DivideMix itself).

    Args:
        losses: ``[N]`` per-sample losses.
        labels: ``[N]`` integer (noisy) labels; each distinct value is one group.
        max_iter, tol, reg_covar, seed, max_fit_samples: as :func:`clean_probability`, for every class's
            mixture.

    Returns:
        ``[N]`` float32 probabilities on the CPU.
    """
    _check_losses(losses)
    check_max_fit_samples(max_fit_samples)
    if (not isinstance(labels, Tensor) or labels.shape != losses.shape or labels.is_floating_point()
            or labels.dtype == torch.bool):
        got = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, Tensor) else repr(labels)
        raise ValueError(f"labels must be an integer tensor of the losses' shape {tuple(losses.shape)}, got {got}")
    labels, losses = labels.detach().cpu(), losses.detach().cpu()
    probability = torch.zeros(losses.shape[0], dtype=torch.float32)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        probability[members] = clean_probability(
            losses[members], max_iter=max_iter, tol=tol, reg_covar=reg_covar, seed=seed,
            max_fit_samples=max_fit_samples,
        )
    return probability


_SCORED_ROWS = 8192  # logits rows scored by one cross-entropy call: one call per batch costs 4% of a forward pass


def per_sample_cross_entropy(
    logits_fn: Callable[[Tensor], Tensor],
    loader: DataLoader,
    num_samples: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    collective_device: torch.device | str | None = None,
    layout: RowLayout | None = None,
) -> Tensor:
    """``[N]`` float32 cross-entropy of ``logits_fn(x)`` against the labels of every sample of ``loader``.

    One pass under :func:`torch.inference_mode` over ``loader``'s ``[input, label, index]`` batches; the
    caller sets the network's eval mode. The logits of consecutive batches are scored together, up to
    8192 rows at a time. Rank ``r`` of ``world_size`` loads and runs only the batches
    ``batch_idx % world_size == r`` (:func:`~lightning_noisy.callbacks.base.rank_batches`), and the losses
    are gathered (a collective on ``collective_device``: call it on every rank), so every rank returns
    the same ``[N]`` losses, equal to a one-process pass over the same loader. With a sharded ``layout``
    the losses go to the ranks that own their rows instead, and each rank returns its block ``[R]``.

    Raises:
        ValueError: a batch is not ``[input, label, index]``.
        RuntimeError: the pass did not cover the ``num_samples`` samples exactly once.
    """
    device = torch.device(device)
    recorder = SampleRecorder((), torch.float32, drop_non_finite=False)  # every sample once, NaN included
    pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (logits, labels, index) of batches not yet scored
    pending_rows = 0

    def score_pending() -> None:
        logits, labels, index = (torch.cat(parts) for parts in zip(*pending))
        recorder.add(index, F.cross_entropy(logits.float(), labels, reduction="none"))
        pending.clear()

    with torch.inference_mode():
        for _, batch in rank_batches(loader, rank, world_size):
            if not isinstance(batch, (list, tuple)) or len(batch) != 3:
                raise ValueError("the per-sample loss pass needs batches [input, label, index] of the training set")
            x = batch[0]
            x = x.to(device) if isinstance(x, Tensor) else move_data_to_device(x, device)
            logits = logits_fn(x)
            pending.append((logits, batch[1].to(device, torch.long), batch[2].to(torch.long)))
            pending_rows += logits.shape[0]
            if pending_rows >= _SCORED_ROWS:
                score_pending()
                pending_rows = 0
        if pending:
            score_pending()
    collective_device = torch.device(collective_device or device)
    index, values, counts = recorder.gather(collective_device, reduction="first", layout=layout)
    start, stop = (layout.start, layout.stop) if layout is not None else (0, num_samples)
    covered = index.shape[0] == stop - start and not bool((counts != 1).any()) and (
        start == stop or (int(index[0]), int(index[-1])) == (start, stop - 1))
    if layout is not None and layout.is_sharded and is_distributed():  # every rank raises, none waits
        flags = torch.tensor([int(not covered), index.shape[0], int(counts.sum())], device=collective_device)
        dist.all_reduce(flags)
        failed, distinct, records = (int(v) for v in flags.cpu())
    else:
        failed, distinct, records = int(not covered), index.shape[0], int(counts.sum())
    if failed:
        raise RuntimeError(
            f"the per-sample loss pass covered {distinct} distinct indices in {records} records, "
            f"expected each of the {num_samples} training samples once"
        )
    return values.clone()


def default_logits(pl_module: pl.LightningModule, x: Tensor) -> Tensor:
    """``pl_module(x)``: the module's logits."""
    return pl_module(x)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class CoDivideCallback(SampleStateCallback):
    """Divides the training set into a labelled (clean) and an unlabelled set with a loss GMM, each epoch.

    From epoch ``start_epoch`` on, at each epoch boundary (after the last training batch, before
    validation and checkpointing) the callback runs an eval-mode, no-gradient pass over the training set
    (``trainer.datamodule.train_eval_dataloader()`` when the DataModule has it, else the training dataset
    in order), rank ``r`` of ``W`` handling the batches ``batch_idx % W == r``; the per-sample
    cross-entropy against the given (noisy) labels is gathered so every rank holds the same ``[N]``
    losses. They are min-max normalised, averaged over the last ``num_average`` epochs (DivideMix does so
    for CIFAR-100 and asymmetric noise), and :func:`clean_probability` gives :attr:`probability`;
    :attr:`clean_mask` is ``probability > p_threshold``. The module's train/eval mode is restored.

    By default the callback does not change training itself: a module reads :attr:`probability`,
    :meth:`labelled_index` and :meth:`unlabelled_index` (or calls :meth:`divide` itself, e.g. once per
    network with another ``model_fn``). With ``refine_targets`` it trains an unmodified module on the
    division: from the first divided epoch on, sample ``i``'s target becomes
    ``w_i * y_i + (1 - w_i) / C`` (``w_i`` its clean probability, ``y_i`` its label as one-hot or as the
    soft target another callback set), so with cross-entropy its loss is ``w_i`` times its cross-entropy plus
    ``1 - w_i`` times that against the uniform distribution: a sample the mixture calls noisy stops pulling
    towards its label and is pushed to an uncertain prediction instead. Every target stays a distribution, so
    any loss of :mod:`lightning_noisy.losses` takes it.

    Logged each divided epoch: ``codivide/labelled_fraction``, a histogram ``codivide/probability`` and,
    when the clean labels are known, ``noisy/codivide_auroc``, ``noisy/codivide_precision`` and
    ``noisy/codivide_recall`` of the labelled set as a selection of the clean samples.

    Attributes:
        last_pass_seconds: wall time of the last loss pass (gather included).
        last_gmm_seconds: wall time of the last mixture fit.
        last_losses: ``[N]`` raw per-sample losses of the last pass.

    Args:
        start_epoch: first epoch at whose end the division runs, ``>= 0``. The default, 9, ends DivideMix's
            10 warm-up epochs on CIFAR-10 (CIFAR-100: 30), as :class:`WarmupEntropyCallback`'s default does, so
            the first epoch trained on a division is the first after warm-up.
        p_threshold: clean-probability threshold in ``(0, 1)`` (DivideMix: 0.5).
        num_average: number of past epochs whose normalised losses are averaged, ``>= 1``.
        gmm_max_iter, gmm_tol, gmm_reg_covar: the mixture's EM settings (DivideMix: 10, 1e-2, 5e-4).
        gmm_max_fit_samples: the mixture is fit to at most this many losses (a seeded uniform subset) and
            gives every sample's posterior; ``None`` fits to all (see :func:`clean_probability`).
        batch_size: batch size of the fallback loader (default: the training loader's, else 128).
        model_fn: ``model_fn(pl_module, x) -> [B, C]`` logits; by default ``pl_module(x)``.
        per_class: one mixture per noisy class (:func:`per_class_clean_probability`) instead of one for
            the whole set; not in DivideMix, off by default.
        seed: ``random_state`` of the mixture.
        shard_state: each DDP rank keeps only its block of about ``N / W`` probabilities and loss histories;
            the losses go to their owners, the mixture is fit on rank 0 to the same losses and broadcast
            (:func:`~lightning_noisy.callbacks.sharded_division.clean_probability_sharded`: the same
            probabilities bit for bit). ``None``: whenever the world size is > 1; ``False``: every rank
            holds all ``N``.
        storage_dtype: dtype of the probabilities and the loss history (``"float32"``, ``"bfloat16"`` or
            ``"float16"``).
        storage_topk: must be ``None``: the state is one value per sample.
        key: distinguishes two instances in one checkpoint (e.g. one per network).
        refine_targets: train the module on the division as above (off by default: the division is read).
        fetch_window: with ``refine_targets`` and sharded state, batches whose probabilities are fetched in
            one collective.
    """

    require_logits = False

    def __init__(
        self,
        start_epoch: int = 9,
        p_threshold: float = 0.5,
        num_average: int = 1,
        gmm_max_iter: int = 10,
        gmm_tol: float = 1e-2,
        gmm_reg_covar: float = 5e-4,
        gmm_max_fit_samples: int | None = DEFAULT_MAX_FIT_SAMPLES,
        batch_size: int | None = None,
        model_fn: ModelFn | None = None,
        per_class: bool = False,
        seed: int = 0,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        key: str | None = None,
        refine_targets: bool = False,
        fetch_window: int = 16,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        if storage_topk is not None:
            raise ValueError(f"storage_topk must be None: CoDivideCallback keeps one value per sample, got {storage_topk!r}")
        if not isinstance(refine_targets, bool):
            raise ValueError(f"refine_targets must be a bool, got {refine_targets!r}")
        self.refine_targets = refine_targets
        self.fetch_window = _check_int("fetch_window", fetch_window, 1)
        self._fetcher: RowFetcher | None = None
        self.start_epoch = _check_int("start_epoch", start_epoch, 0)
        if (
            isinstance(p_threshold, bool)
            or not isinstance(p_threshold, (int, float))
            or not 0.0 < float(p_threshold) < 1.0
        ):
            raise ValueError(f"p_threshold must be a number in (0, 1), got {p_threshold!r}")
        self.p_threshold = float(p_threshold)
        self.num_average = _check_int("num_average", num_average, 1)
        self.gmm_max_iter = _check_int("gmm_max_iter", gmm_max_iter, 1)
        self.gmm_tol = check_finite_non_negative("gmm_tol", gmm_tol)
        self.gmm_reg_covar = check_finite_non_negative("gmm_reg_covar", gmm_reg_covar)
        self.gmm_max_fit_samples = check_max_fit_samples(gmm_max_fit_samples, "gmm_max_fit_samples")
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        self.batch_size = batch_size
        self.model_fn: ModelFn = model_fn if model_fn is not None else default_logits
        if not isinstance(per_class, bool):
            raise ValueError(f"per_class must be a bool, got {per_class!r}")
        self.per_class = per_class
        self.seed = int(seed)
        self._probability: SampleBuffer | None = None
        self._history: SampleHistory | None = None
        self.last_losses: Tensor | None = None
        self.last_pass_seconds = 0.0
        self.last_gmm_seconds = 0.0
        self._warned_empty: set[str] = set()

    # -- results --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether a division exists (computed or restored from a checkpoint)."""
        return self._probability is not None and bool(self._probability.visited.all())

    def _require(self) -> SampleBuffer:
        if not self.ready:
            raise RuntimeError(
                "CoDivideCallback has no division yet: fit a model with it past start_epoch, or call divide()"
            )
        assert self._probability is not None
        return self._probability

    @property
    def probability(self) -> Tensor:
        """``[N]`` float32 clean probability of every training sample.

        With sharded state the ranks' blocks are gathered: a collective, call it on every rank
        (:meth:`local_probability` reads this rank's block alone).
        """
        buffer = self._require()
        return gather_scalars(buffer.values, self._sharded, self.collective_device)

    def local_probability(self) -> tuple[Tensor, Tensor]:
        """``(index [R], probability [R])``: the dataset indices this rank holds and their clean probabilities."""
        buffer = self._require()
        return buffer.index, buffer.values

    @property
    def clean_mask(self) -> Tensor:
        """``[N]`` bool: ``probability > p_threshold`` (the labelled set); a collective when sharded."""
        return self.probability > self.p_threshold

    def labelled_index(self) -> Tensor:
        """``[L]`` int64 indices of the labelled (probably clean) samples; a collective when sharded."""
        return torch.nonzero(self.clean_mask).flatten()

    def unlabelled_index(self) -> Tensor:
        """``[N - L]`` int64 indices of the unlabelled (probably mislabelled) samples; a collective when sharded."""
        return torch.nonzero(~self.clean_mask).flatten()

    @property
    def _sharded(self) -> bool:
        return self._probability is not None and self._probability.layout.is_sharded

    # -- the division ---------------------------------------------------------------------------
    def compute_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model_fn: ModelFn | None = None) -> Tensor:
        """``[N]`` float32 per-sample cross-entropy of the whole training set, identical on every rank.

        With sharded state, ``[R]``: the losses of the rows this rank holds. A collective under DDP: call
        it on every rank. Sets :attr:`last_pass_seconds`.
        """
        if self.training_labels is None:
            raise RuntimeError("CoDivideCallback: the training labels are unknown before the fit starts")
        model_fn = model_fn if model_fn is not None else self.model_fn
        start = time.perf_counter()
        with evaluating(pl_module):
            losses = per_sample_cross_entropy(
                lambda x: model_fn(pl_module, x),
                train_eval_loader(trainer, "CoDivideCallback", self.batch_size),
                self.training_labels.num_samples,
                device=pl_module.device,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                collective_device=trainer.strategy.root_device,
                layout=None if self._probability is None else self._probability.layout,
            )
        self.last_pass_seconds = time.perf_counter() - start
        return losses

    def divide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model_fn: ModelFn | None = None) -> Tensor:
        """Loss pass, loss averaging and mixture fit; stores and returns ``[N]`` float32 :attr:`probability`.

        With sharded state, returns ``[R]``, this rank's block. A collective under DDP: call it on every
        rank. Each call appends one epoch to the loss history.
        """
        if self._probability is None or self._history is None or self.training_labels is None:
            raise RuntimeError("CoDivideCallback.divide needs the training labels: call it once the fit has started")
        losses = self.compute_losses(trainer, pl_module, model_fn)
        self.last_losses = losses
        rows, device = self._probability.index, trainer.strategy.root_device
        sharded = self._sharded and trainer.world_size > 1
        non_finite = torch.tensor([int((~torch.isfinite(losses)).sum())])
        non_finite = int(self.sum_over_shards(trainer, self._probability.layout, non_finite)[0])  # over the blocks
        if non_finite:  # a mixture fit on them would be meaningless: every row keeps its division
            rank_zero_warn(
                f"CoDivideCallback: {non_finite} sample(s) had a non-finite loss (NaN or inf) in epoch "
                f"{trainer.current_epoch}; the division and loss history keep their previous values"
            )
            return self._probability.values
        normalised = normalise_losses_sharded(losses, device) if sharded else normalise_losses(losses)
        self._history.append(rows, normalised)
        averaged = self._history.mean() if self.num_average > 1 else normalised
        start = time.perf_counter()
        gmm = {"max_iter": self.gmm_max_iter, "tol": self.gmm_tol, "reg_covar": self.gmm_reg_covar, "seed": self.seed,
               "max_fit_samples": self.gmm_max_fit_samples}
        labels = self.training_labels
        if sharded:
            groups = labels.noisy[rows] if self.per_class else None
            probability = clean_probability_sharded(
                averaged, groups, labels.num_classes if self.per_class else 1, device=device, **gmm)
        elif self.per_class:
            probability = per_class_clean_probability(averaged, labels.noisy, **gmm)
        else:
            probability = clean_probability(averaged, **gmm)
        self.last_gmm_seconds = time.perf_counter() - start
        self._probability.write(rows, probability)
        return self._probability.values

    # -- hooks ----------------------------------------------------------------------------------
    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        layout, dtype = self.row_layout(trainer, labels.num_samples), self.state_options.dtype
        self._probability = SampleBuffer(labels.num_samples, (), dtype, fill=1.0, layout=layout)
        self._history = SampleHistory(labels.num_samples, self.num_average, (), dtype, layout=layout)
        if self.refine_targets:
            self._fetcher = RowFetcher(self._probability, self.fetch_window, trainer.strategy.root_device)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fetcher is not None and self.ready:  # (a resumed mid-epoch run fetches batch by batch)
            self._fetcher.start_epoch(planned_batches(trainer.train_dataloader))

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if self._fetcher is None or not self.ready:  # (the same on every rank: no rank fetches alone)
            return
        weight = self._fetcher.rows(context.index).float()  # a collective when sharded: every rank, every batch
        targets = context.batch[1]
        assert self.training_labels is not None and self.contract is not None
        num_classes = self.training_labels.num_classes
        if not targets.is_floating_point():
            targets = F.one_hot(targets.long(), num_classes).float()
        weight = weight.to(targets.device).unsqueeze(1)
        self.contract.set_targets(weight * targets.float() + (1 - weight) / num_classes)

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        self.divide(trainer, pl_module)
        if self.ready:  # (a first division can be skipped for non-finite losses)
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.training_labels is not None
        probability = self.probability  # gathered when sharded: N scalars
        mask = probability > self.p_threshold
        for name, empty in (("labelled", not bool(mask.any())), ("unlabelled", bool(mask.all()))):
            if empty and name not in self._warned_empty:
                self._warned_empty.add(name)
                warnings.warn(
                    f"CoDivideCallback: the {name} set is empty at epoch {trainer.current_epoch} "
                    f"(p_threshold={self.p_threshold}); training goes on",
                    UserWarning,
                    stacklevel=2,
                )
        metrics: dict[str, Tensor] = {"codivide/labelled_fraction": mask.float().mean()}
        labels = self.training_labels
        if labels.clean is not None:
            is_clean = labels.noisy == labels.clean
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # AUROC of a set without noise (or all noise) is NaN
                scores = selection_scores(probability, mask, is_clean, positive="clean")
            for key in ("auroc", "precision", "recall"):
                if bool(torch.isfinite(scores[key])):
                    metrics[f"noisy/codivide_{key}"] = scores[key].float()
        self.log_epoch_metrics(pl_module, metrics)
        log_histogram(trainer, "codivide/probability", probability)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        if self._probability is None or self._history is None:
            return {}
        return {"probability": self._probability, "loss_history": self._history}
