"""SOPCallback: sparse over-parameterisation of the label noise (Liu et al., ICML 2022) for an unmodified classifier."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels
from lightning_noisy.losses._targets import one_hot_rows
from lightning_noisy.state import SampleBuffer, SampleRecorder, StepContext
from lightning_noisy.state.fetch import RowFetcher, planned_batches
from lightning_noisy.state.storage import StateOptions, StorageDtype

#: the floor (and 1 - ceiling) of the probabilities and noise terms, as in the authors' code
EPS = 1e-4
_INIT_ROWS = 1 << 16  # rows drawn from one generator seed: a row's start value depends on its index only


def noise_terms(u: Tensor, v: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, V)``: ``U = u_i^2 y_i`` and ``V = v_i^2 (1 - y_i)``, each clamped to ``[0, 1 - 1e-4]``. ``[B, C]``.

    Args:
        u: ``[B]`` one parameter per sample (the given label's share).
        v: ``[B, C]`` one parameter per sample and class (the other classes' share).
        labels: ``[B, C]`` one-hot given labels ``y``.
    """
    # squares are >= 0, so only the ceiling is applied
    return (u.square()[:, None] * labels).clamp_max(1.0 - EPS), (v.square() * (1.0 - labels)).clamp_max(1.0 - EPS)


def corrected_probabilities(logits: Tensor, u_term: Tensor, v_term: Tensor) -> Tensor:
    """``softmax(z) + U - sg(V)``, floored at 1e-4, made a distribution and clamped to ``[1e-4, 1]``. ``[B, C]``.

    What the network's prediction of the *given* label becomes once the modelled noise ``s = U - V`` is
    added; its cross-entropy against the given labels trains the network and ``u`` (``V`` without gradient).
    """
    shifted = (torch.softmax(logits.float(), dim=1) + u_term - v_term.detach()).clamp_min(EPS)
    # the sum is >= C * 1e-4 (no 0 to guard) and no entry exceeds it, so the authors' ceiling of 1 never acts:
    # only the floor is applied (the same values and gradients, with a cheaper backward)
    return (shifted / shifted.sum(dim=1, keepdim=True)).clamp_min(EPS)


def v_term_loss(logits: Tensor, u_term: Tensor, v_term: Tensor, labels: Tensor) -> Tensor:
    """``sum_i || onehot(argmax z_i) + sg(U_i) - V_i - y_i ||^2 / B``: the squared error that trains ``v``."""
    predicted = one_hot_rows(logits.detach().argmax(dim=1), labels.shape[1], u_term.dtype)
    return F.mse_loss(v_term, predicted + u_term.detach() - labels, reduction="sum") / labels.shape[0]


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


class SOPCallback(SampleStateCallback):
    """Sparse over-parameterisation (Liu, Zhu, Qu, You, "Robust Training under Label Noise by
    Over-parameterization", ICML 2022) for a module that knows nothing of it.

    Label noise is sparse: most labels are right. SOP models each sample's noise as
    ``s_i = u_i^2 y_i - v_i ⊙ v_i ⊙ (1 - y_i)`` with its own parameters ``u_i`` (a scalar) and ``v_i``
    (``C`` values), started near zero (``N(0, init_std^2)``), and trains them beside the network, each by
    plain SGD with its own learning rate. Small starts and gradient descent keep ``s`` sparse (implicit
    regularisation), so the noise term absorbs the wrong labels instead of the network memorising them.

    For an unmodified module (``F.cross_entropy(self(x), y)``) the callback replaces the training logits
    ``z`` by ``log p~`` with ``p~`` the :func:`corrected_probabilities` ``softmax(z) + U - sg(V)``, so the
    module's own cross-entropy is SOP's loss of the network and ``u``; ``v`` is trained by the added squared
    error :func:`v_term_loss` (weight ``v_weight``). Validation and prediction see the untouched ``z``.
    After each step's backward pass the batch's ``u_i, v_i`` take their SGD step; the new values are stored
    at the epoch's end (sent to the rows' owners under DDP), which is the same thing for a sample trained on
    once per epoch, as ``DistributedSampler`` arranges (a padded duplicate's two results are averaged).

    The module must compute its training logits by calling itself (``logits = self(x)``) and train on the
    hard given labels. Logged each epoch: ``noisy/sop_u_mean`` (mean ``u_i^2`` of the given labels) and,
    with clean labels, ``noisy/sop_noise_auroc``: how well ``u_i^2`` ranks the mislabelled samples.

    Args:
        lr_u: learning rate of ``u`` (the authors' CIFAR-10 value: 10; CIFAR-100: 1).
        lr_v: learning rate of ``v`` (10 on both in the authors' configs; 100 for asymmetric CIFAR-100).
        init_std: standard deviation of the start values (the authors: 1e-8).
        v_weight: weight of the squared error that trains ``v``.
        seed: seed of the start values (a row's start depends on its index and the seed only).
        shard_state: each DDP rank keeps only its block of about ``N / W`` rows of ``u`` and ``v`` and fetches
            the rows its batches need; ``None`` shards whenever the world size is above 1.
        storage_dtype: must be ``"float32"``: the parameters start at 1e-8 and move by small steps.
        storage_topk: must be ``None``: ``v`` is dense.
        fetch_window: batches whose rows a sharded state fetches in one collective.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        lr_u: float = 10.0,
        lr_v: float = 10.0,
        init_std: float = 1e-8,
        v_weight: float = 1.0,
        seed: int = 0,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        fetch_window: int = 16,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        if storage_dtype != "float32" or storage_topk is not None:
            raise ValueError(
                "SOPCallback keeps its per-sample parameters in float32, dense: storage_dtype must be 'float32' and "
                f"storage_topk None, got {storage_dtype!r} and {storage_topk!r}"
            )
        self.lr_u, self.lr_v = _positive("lr_u", lr_u), _positive("lr_v", lr_v)
        self.init_std = _positive("init_std", init_std)
        self.v_weight = _positive("v_weight", v_weight, allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if isinstance(fetch_window, bool) or not isinstance(fetch_window, int) or fetch_window < 1:
            raise ValueError(f"fetch_window must be an integer >= 1, got {fetch_window!r}")
        self.seed, self.fetch_window = seed, fetch_window
        self._u: SampleBuffer | None = None
        self._v: SampleBuffer | None = None
        self._recorder: SampleRecorder | None = None
        self._fetchers: tuple[RowFetcher, RowFetcher] | None = None
        self._batch: tuple[Tensor, Tensor] | None = None  # this step's leaves u [B], v [B, C]
        self._terms: tuple[Tensor, Tensor, Tensor] | None = None  # U, V, one-hot labels of this step
        self._calls = self._calls_at_batch_start = 0
        self._grad_scale = 1.0  # the mixed-precision loss scale of this step's backward
        self.skipped_steps = 0

    # -- start values ----------------------------------------------------------------------------
    def start_values(self, index: Tensor, num_classes: int) -> Tensor:
        """``[U, 1 + C]`` start values ``(u, v)`` of the samples ``index``: ``N(0, init_std^2)``, a function of
        each index and ``seed`` only (rows are drawn in fixed groups of 65,536), so every layout starts alike."""
        out = torch.empty(index.shape[0], 1 + num_classes)
        groups = index // _INIT_ROWS
        for group in torch.unique(groups).tolist():  # a loop over groups of 65,536 rows, not over samples
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + group)
            values = torch.randn(_INIT_ROWS, 1 + num_classes, generator=generator) * self.init_std
            mine = groups == group
            out[mine] = values[index[mine] - group * _INIT_ROWS]
        return out

    # -- state -----------------------------------------------------------------------------------
    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        n, c = labels.num_samples, labels.num_classes
        layout = self.row_layout(trainer, n)
        self._u = SampleBuffer(n, (), torch.float32, fill=lambda index: self.start_values(index, c)[:, 0], layout=layout)
        self._v = SampleBuffer(n, (c,), torch.float32, fill=lambda index: self.start_values(index, c)[:, 1:], layout=layout)
        self._recorder = SampleRecorder((1 + c,), torch.float32)
        device = trainer.strategy.root_device
        self._fetchers = (RowFetcher(self._u, self.fetch_window, device), RowFetcher(self._v, self.fetch_window, device))
        assert self.contract is not None
        self.contract.set_logits_transform(self, self._transform)
        self.contract.add_loss_term(self, "sop_v", self._v_loss)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer]:
        return {} if self._u is None or self._v is None else {"u": self._u, "v": self._v}

    @override
    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        return {"parameters": self._recorder}

    def local_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(index [R], u [R], v [R, C])``: the stored parameters of the rows this rank holds."""
        if self._u is None or self._v is None:
            raise RuntimeError("the parameters exist once training has started (on_train_start)")
        return self._u.index, self._u.values, self._v.values

    # -- per step --------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fetchers is not None:  # (a run resumed mid-epoch skips this: its first epoch fetches batch by batch)
            for fetcher in self._fetchers:
                fetcher.start_epoch(planned_batches(trainer.train_dataloader))

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert self._fetchers is not None
        u, v = (fetcher.rows(context.index) for fetcher in self._fetchers)  # collectives when sharded
        device = context.targets.device
        self._batch = (u.to(device).requires_grad_(True), v.to(device).requires_grad_(True))
        self._terms = None
        self._calls_at_batch_start = self._calls

    def _transform(self, logits: Tensor) -> Tensor:
        assert self._batch is not None and self.context is not None and self.training_labels is not None
        self._calls += 1
        targets = self.context.targets
        if targets.ndim != 1:
            raise RuntimeError(f"SOPCallback needs the hard given labels [B] as targets, got shape {tuple(targets.shape)}")
        labels = one_hot_rows(targets.to(logits.device), self.training_labels.num_classes)
        u, v = (t.to(logits.device) for t in self._batch)
        u_term, v_term = noise_terms(u, v, labels)
        self._terms = (u_term, v_term, labels)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return corrected_probabilities(logits, u_term, v_term).log().to(logits.dtype)

    def _v_loss(self, context: StepContext) -> Tensor | None:
        if self._terms is None or self.v_weight == 0:
            return None
        assert context.logits is not None
        return self.v_weight * v_term_loss(context.logits, *self._terms)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # float16 mixed precision scales the loss
        self._grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert self._batch is not None and self._recorder is not None
        if self._calls == self._calls_at_batch_start:
            raise RuntimeError(
                "SOPCallback could not add its noise term to this step: training_step must compute its logits by "
                "calling the module itself (`logits = self(x)`), with an output of shape [B, C]"
            )
        u, v = self._batch
        with torch.no_grad():  # one plain SGD step of the batch's own parameters, on the unscaled gradients
            grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (u, v)]
            if self._grad_scale != 1.0:  # only a scaled float16 step can overflow; checking costs a host sync
                grads = [g / self._grad_scale for g in grads]
                if not all(bool(torch.isfinite(g).all()) for g in grads):  # skipped, as the network's step is
                    grads = [torch.zeros_like(g) for g in grads]
                    self.skipped_steps += 1
            new_u, new_v = torch.add(u, grads[0], alpha=-self.lr_u), torch.add(v, grads[1], alpha=-self.lr_v)
        self._recorder.add(context.index, torch.cat([new_u[:, None], new_v], dim=1))
        self._batch = self._terms = None

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._u is not None and self._v is not None and self._recorder is not None
        index, values, _ = self._recorder.gather(trainer.strategy.root_device, reduction="mean", layout=self._u.layout)
        if index.numel():
            self._u.write(index, values[:, 0].contiguous())
            self._v.write(index, values[:, 1:].contiguous())
        self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._u is not None and self.training_labels is not None
        u_squared = self._u.values.double() ** 2
        sums = self.sum_over_shards(trainer, self._u.layout, torch.stack([u_squared.sum(), torch.tensor(float(u_squared.numel()), dtype=torch.float64)]))
        metrics: dict[str, Tensor] = {"noisy/sop_u_mean": (sums[0] / sums[1]).float()}
        labels = self.training_labels
        if labels.clean is not None:
            from lightning_noisy.metrics.selection import selection_scores
            from lightning_noisy.state.sharded import gather_scalars

            scores = gather_scalars(u_squared.float(), self._u.layout.is_sharded, trainer.strategy.root_device)
            is_clean = labels.noisy == labels.clean
            if bool(is_clean.any()) and not bool(is_clean.all()):  # a large u^2 says the given label is wrong
                auroc = selection_scores(-scores, scores <= scores.median(), is_clean, positive="noisy")["auroc"]
                if bool(torch.isfinite(auroc)):
                    metrics["noisy/sop_noise_auroc"] = auroc.float()
        self.log_epoch_metrics(pl_module, metrics)


__all__ = ["SOPCallback", "corrected_probabilities", "noise_terms", "v_term_loss"]
