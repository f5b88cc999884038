"""ForwardCorrectionCallback: forward loss correction (Patrini et al., CVPR 2017) for an unmodified module."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels
from lightning_noisy.losses._targets import check_distributions
from lightning_noisy.losses.correction import (
    anchor_candidates,
    anchor_rank,
    estimate_transition_matrix,
    validate_transition_matrix,
)
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, StepContext
from lightning_noisy.state.exchange import _all_to_all
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.storage import StateOptions, StorageDtype

TransitionSpec = Literal["estimate", "true"]

# Zero entries of T are clamped to this before use, as forward_corrected_loss does (a finite log).
_MIN_ENTRY = 1e-12


def forward_correction_transform(transition: Tensor) -> Callable[[Tensor], Tensor]:
    """``z -> log(softmax(z) @ T)``: logits whose softmax is the model's noisy-label posterior ``p^T T``.

    Computed in float32 (float64 for float64 logits) with autocast off, shifted by the row maximum so
    nothing overflows: ``log(exp(z - m) @ T) - log(sum exp(z - m))``. Zero entries of ``T`` are clamped
    to ``1e-12`` as in :func:`~lightning_noisy.losses.forward_corrected_loss`, so the value is finite and
    equals that function's ``logsumexp_k (log p_k + log T_kj)`` up to rounding, with ``[B, C]`` memory
    instead of ``[B, C, C]``. The result has the dtype of ``z`` (for mixed precision).
    """
    clamped = transition.detach().clamp_min(_MIN_ENTRY)
    cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def transform(z: Tensor) -> Tensor:
        dtype = torch.promote_types(z.dtype, torch.float32)
        key = (z.device, dtype)
        if key not in cache:
            cache[key] = clamped.to(device=z.device, dtype=dtype)
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits = z.to(dtype)
            shifted = logits - logits.amax(dim=1, keepdim=True).detach()
            unnormalised = shifted.exp()
            out = (unnormalised @ cache[key]).log() - unnormalised.sum(dim=1, keepdim=True).log()
        return out.to(z.dtype)

    return transform


def estimate_transition_matrix_sharded(
    index: Tensor,
    probs: Tensor,
    layout: RowLayout,
    *,
    percentile: float = 97.0,
    filter_outlier: bool = True,
    device: torch.device | str = "cpu",
) -> Tensor:
    """:func:`~lightning_noisy.losses.estimate_transition_matrix` of rows sharded over the ranks. A collective.

    Each rank holds the rows of its block that were recorded, ``index [M_r]`` (ascending) and
    ``probs [M_r, C]``. Every rank keeps each column's candidates for the anchor (the ``k`` largest entries,
    :func:`~lightning_noisy.losses.correction.anchor_candidates`) and sends column ``c``'s to rank
    ``c % W``, which picks the anchor among all ranks' candidates; the anchors' rows then come from their
    owners. A rank receives about ``k x C`` candidates, ``k`` being 3% of the samples at the paper's 97th
    percentile, instead of every row. Every rank returns the same ``[C, C]`` float32 estimate, equal bit for
    bit to the estimate of the gathered rows.
    """
    device = torch.device(device)
    values = probs.detach().to(torch.float32)
    problem = None
    if values.shape[0]:
        try:
            check_distributions("probs", values)
        except ValueError as error:
            problem = str(error)
    checks = torch.tensor([int(problem is not None), values.shape[0]], device=device)
    dist.all_reduce(checks)  # a bad block fails on every rank, not only on its own while the others wait
    if int(checks[0]):
        raise ValueError(problem or "another rank's recorded predictions are not distributions")
    total, num_classes, world = int(checks[1]), int(probs.shape[1]), layout.world_size
    if total == 0:
        raise RuntimeError("no rank recorded predictions to estimate the transition matrix from")
    count = anchor_rank(total, percentile, filter_outlier)
    top, top_index = anchor_candidates(values, index.to(torch.long), count)
    pad = count - top.shape[0]  # every rank sends `count` per column; padding ranks last and is never picked
    top = torch.cat([top, top.new_full((pad, num_classes), float("-inf"))])
    top_index = torch.cat([top_index, top_index.new_full((pad, num_classes), -1)])
    owner = torch.arange(num_classes) % world
    order = torch.argsort(owner, stable=True)
    send = torch.bincount(owner, minlength=world).tolist()
    mine = order[sum(send[: layout.rank]) : sum(send[: layout.rank + 1])]  # this rank's columns
    receive = [mine.numel()] * world
    received = [
        _all_to_all(part.T[order].contiguous().to(device), send, receive).cpu().view(world, mine.numel(), count)
        for part in (top, top_index)
    ]
    # per owned column, the candidates of every rank: [W * count, columns]
    merged_values, merged_index = (part.permute(0, 2, 1).reshape(world * count, mine.numel()) for part in received)
    _, picked = anchor_candidates(merged_values, merged_index, count)
    anchors = torch.full((num_classes,), -1, dtype=torch.long)
    anchors[mine] = picked[count - 1]
    anchors = anchors.to(device)
    dist.all_reduce(anchors, op=dist.ReduceOp.MAX)
    anchors = anchors.cpu()
    position = torch.searchsorted(index.to(torch.long), anchors).clamp(max=max(values.shape[0] - 1, 0))
    held = (index[position] == anchors) if values.shape[0] else torch.zeros(num_classes, dtype=torch.bool)
    rows = torch.zeros(num_classes, num_classes)
    rows[held] = values[position[held]]
    rows = rows.to(device)
    dist.all_reduce(rows)  # one owner per anchor row, zeros elsewhere: the sum is the row exactly
    rows = rows.cpu()
    return rows / rows.sum(dim=1, keepdim=True)


def markdown_matrix(matrix: Tensor, digits: int = 3) -> str:
    """A ``[C, C]`` matrix as a markdown table (rows: clean class, columns: noisy class)."""
    size = matrix.shape[0]
    lines = ["| clean \\ noisy | " + " | ".join(str(j) for j in range(size)) + " |", "|---" * (size + 1) + "|"]
    for i, row in enumerate(matrix.tolist()):
        lines.append(f"| **{i}** | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |")
    return "\n".join(lines)


class ForwardCorrectionCallback(SampleStateCallback):
    """Forward loss correction (Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a
    Loss Correction Approach", CVPR 2017) for a module that knows nothing of it.

    With the noise transition matrix ``T[i, j] = P(noisy label = j | clean label = i)``, forward
    correction trains the network's clean posterior ``p = softmax(z)`` through the noise process:
    the loss is ``-log (p^T T)_y`` for the noisy label ``y``. This callback obtains the same loss from
    the module's own, unmodified cross-entropy: during training steps it replaces the module's
    forward output ``z`` by ``z' = log(softmax(z) @ T)``. Because every row of ``T`` sums to one,
    ``sum_j (p^T T)_j = sum_k p_k = 1``, so ``softmax(z') = p^T T`` exactly (``z'`` are already
    normalised log-probabilities) and ``F.cross_entropy(z', y) = -log (p^T T)_y``, the forward-corrected
    loss, gradients included. Validation, testing and prediction see the untouched ``z``, i.e. the
    clean-class prediction; the callback's own records use the raw ``z`` too.

    The matrix is given, read from the data, or estimated:

    - a list of ``C`` rows: used from epoch 0;
    - ``"true"``: the realised transition matrix of the training labels,
      ``trainer.datamodule.noise_info.transition_matrix`` (the package's DataModules provide it when the
      clean labels are known), used from epoch 0 — an oracle, for comparison;
    - ``"estimate"``: during epoch ``estimate_epoch`` the softmax of each sample's training-step logits
      is recorded (the network is then trained on the noisy labels, so these are estimates of
      ``p(noisy | x)``); at that epoch's end ``T`` is estimated from them with the anchor-point
      estimator (:func:`~lightning_noisy.losses.estimate_transition_matrix`, ``percentile`` and
      ``filter_outlier``), and the correction applies from the next epoch on. The paper trains a
      network to estimate ``T`` and a second, corrected one; here both are the same run.

    When the clean labels are known, the mean absolute error of the estimate against the true matrix
    is logged once as ``noisy/transition_mae``, and both matrices are written to TensorBoard as text.
    ``T`` and whether the correction is active are checkpointed, so a resumed run keeps correcting.

    The module must compute its training logits by calling itself (``logits = self(x)``): the
    correction is a forward hook on the LightningModule. A module whose training step produces
    logits some other way gets an error on the first corrected batch rather than a silent
    uncorrected loss.

    Args:
        transition: a ``[C, C]`` row-stochastic matrix (list of rows), ``"estimate"`` or ``"true"``.
        estimate_epoch: 0-based epoch whose training predictions estimate ``T`` (``"estimate"`` only).
        percentile: percentile of the anchor-point estimator, in ``(0, 100]`` (paper: 97).
        filter_outlier: take the ``percentile``-th sample of each class as its anchor instead of the arg max.
        shard_state: the estimation epoch's predictions go to the DDP rank that owns their rows, which keeps
            about ``N / W`` of them; the anchors are found among every rank's candidates
            (:func:`estimate_transition_matrix_sharded`, the same matrix bit for bit). ``None``: whenever the
            world size is > 1; ``False``: every rank gathers all ``N x C`` predictions.
        storage_dtype: dtype of the recorded predictions (``"float32"``, ``"bfloat16"`` or ``"float16"``;
            16-bit rows are renormalised before the estimate).
        storage_topk: must be ``None``: an anchor's whole row is the estimate's row.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        transition: list[list[float]] | TransitionSpec = "estimate",
        estimate_epoch: int = 10,
        percentile: float = 97.0,
        filter_outlier: bool = True,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        if storage_topk is not None:
            raise ValueError(
                f"storage_topk must be None: ForwardCorrectionCallback's estimate reads whole rows, got {storage_topk!r}"
            )
        if isinstance(estimate_epoch, bool) or not isinstance(estimate_epoch, int) or estimate_epoch < 0:
            raise ValueError(f"estimate_epoch must be an int >= 0, got {estimate_epoch!r}")
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 0.0 < float(percentile) <= 100.0  # also rejects nan
        ):
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        if not isinstance(filter_outlier, bool):
            raise ValueError(f"filter_outlier must be a bool, got {filter_outlier!r}")
        self.estimate_epoch = estimate_epoch
        self.percentile = float(percentile)
        self.filter_outlier = filter_outlier
        self.mode: Literal["given", "estimate", "true"]
        self._given: Tensor | None = None
        if isinstance(transition, str):
            if transition not in ("estimate", "true"):
                raise ValueError(
                    f"transition must be a [C, C] matrix (list of rows), 'estimate' or 'true', got {transition!r}"
                )
            self.mode = transition  # type: ignore[assignment]
        else:
            self._given = self._check_given(transition)
            self.mode = "given"
        self._transition: Tensor | None = None
        self._active = False
        self._true: Tensor | None = None
        self._recorder: SampleRecorder | None = None
        self._layout: RowLayout | None = None
        self._transform: Callable[[Tensor], Tensor] | None = None
        self._calls = 0
        self._calls_at_batch_start = 0

    @staticmethod
    def _check_given(transition: Any) -> Tensor:
        shape_error = ValueError(
            f"transition must be a square [C, C] matrix given as a list of C rows of C probabilities, "
            f"'estimate' or 'true', got {transition!r}"
        )
        if isinstance(transition, Tensor):
            matrix = transition.detach().to(torch.float32).cpu()
        elif isinstance(transition, Sequence) and all(isinstance(row, Sequence) for row in transition):
            try:
                matrix = torch.tensor([[float(v) for v in row] for row in transition], dtype=torch.float32)
            except (TypeError, ValueError):
                raise shape_error from None
        else:
            raise shape_error
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise shape_error
        try:
            validate_transition_matrix(matrix, matrix.shape[0])
        except ValueError as error:
            raise ValueError(f"{error}; got transition={matrix.tolist()}") from None
        return matrix

    # -- public API ------------------------------------------------------------------------------
    @property
    def transition(self) -> Tensor | None:
        """``[C, C]`` float32 transition matrix in use (or estimated), ``None`` before it is known."""
        return self._transition

    @property
    def true_transition(self) -> Tensor | None:
        """``[C, C]`` float32 realised transition matrix of the training labels, when the clean labels are known."""
        return self._true

    @property
    def active(self) -> bool:
        """Whether the training steps are forward-corrected now."""
        return self._active

    # -- setup -----------------------------------------------------------------------------------
    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        c = labels.num_classes
        self._true = find_true_transition(trainer, labels)
        if self.mode == "given":
            assert self._given is not None
            if self._given.shape[0] != c:
                raise ValueError(
                    f"transition must be [{c}, {c}] for the {c} classes of the data, got a "
                    f"[{self._given.shape[0]}, {self._given.shape[1]}] matrix: {self._given.tolist()}"
                )
            self._transition, self._active = self._given.clone(), True
        elif self.mode == "true":
            if self._true is None:
                raise ValueError(
                    "ForwardCorrectionCallback(transition='true') needs the realised transition matrix of the "
                    "noise: the DataModule must provide `noise_info.transition_matrix` with the clean labels known "
                    "(the package's DataModules do for synthetic noise), or the training dataset `clean_labels`; "
                    f"found neither on {type(trainer.datamodule).__name__}. Give the matrix or use 'estimate'."
                )
            self._transition, self._active = self._true.clone(), True
        self._recorder = SampleRecorder((c,), self.state_options.dtype)
        self._layout = self.row_layout(trainer, labels.num_samples)
        if self.mode != "estimate" and trainer.current_epoch == 0:
            self._write_matrices(trainer)
        self._apply()

    def _apply(self) -> None:
        """Set (or clear) the logits transform on the batch contract from ``_transition`` / ``_active``."""
        if self.contract is None:
            return
        if self._active and self._transition is not None:
            base = forward_correction_transform(self._transition)

            def transform(z: Tensor) -> Tensor:
                self._calls += 1
                return base(z)

            self._transform = transform
            self.contract.set_logits_transform(self, transform)
        elif self._transform is not None:
            self.contract.set_logits_transform(self, None)
            self._transform = None

    @override
    def _release(self) -> None:
        self._transform = None  # the contract drops this callback's transform when it is released
        super()._release()

    # -- state -----------------------------------------------------------------------------------
    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        return {}

    @override
    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        return {"predictions": self._recorder}

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {
            "transition": None if self._transition is None else self._transition.clone(),
            "active": self._active,
        }

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        transition, active = state.get("transition"), bool(state.get("active", False))
        if transition is not None:
            c = self.training_labels.num_classes if self.training_labels is not None else transition.shape[0]
            try:
                validate_transition_matrix(transition, c)
            except ValueError as error:
                raise ValueError(f"ForwardCorrectionCallback: the checkpoint's transition matrix: {error}") from None
            transition = transition.detach().to(torch.float32).cpu()
        self._transition, self._active = transition, active and transition is not None
        self._apply()

    # -- per step --------------------------------------------------------------------------------
    def _recording(self, epoch: int) -> bool:
        return self.mode == "estimate" and self._transition is None and epoch >= self.estimate_epoch

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self._calls_at_batch_start = self._calls

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if self._active and self._calls == self._calls_at_batch_start:
            raise RuntimeError(
                "ForwardCorrectionCallback could not correct this training step: the correction replaces the "
                "LightningModule's forward output, so training_step must compute its logits by calling the "
                "module itself (`logits = self(x)`), with an output of shape [B, C]"
            )
        if self._recording(trainer.current_epoch):
            assert self._recorder is not None and context.logits is not None
            self._recorder.add(context.index, torch.softmax(context.logits.detach().float(), dim=1))

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._recording(trainer.current_epoch):
            return
        assert self._recorder is not None and self._layout is not None
        device, layout = trainer.strategy.root_device, self._layout
        index, probs, _ = self._recorder.gather(device, reduction="mean", layout=layout)  # every rank (or its rows)
        if self.state_options.dtype != torch.float32:  # 16-bit rows sum to 1 only within their rounding
            probs = probs / probs.sum(dim=1, keepdim=True)
        sharded = layout.is_sharded and trainer.world_size > 1
        recorded = self.sum_over_shards(trainer, layout, torch.tensor(probs.shape[0]))
        if int(recorded) == 0:
            raise RuntimeError(
                f"ForwardCorrectionCallback recorded no training predictions in epoch {trainer.current_epoch} "
                "to estimate the transition matrix from"
            )
        options = {"percentile": self.percentile, "filter_outlier": self.filter_outlier}
        if sharded:
            estimate = estimate_transition_matrix_sharded(index, probs, layout, device=device, **options)
        else:
            estimate = estimate_transition_matrix(probs, **options).to(torch.float32).cpu()
        validate_transition_matrix(estimate, probs.shape[1])
        self._transition, self._active = estimate, True
        self._apply()
        rank_zero_info(
            f"ForwardCorrectionCallback: estimated the transition matrix from {int(recorded)} samples' "
            f"predictions of epoch {trainer.current_epoch}; forward correction from epoch {trainer.current_epoch + 1}"
        )
        if self._true is not None:
            mae = (estimate - self._true).abs().mean()
            self.log_epoch_metrics(pl_module, {"noisy/transition_mae": mae})
        self._write_matrices(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "estimate" and self._transition is None:
            when = (f"before estimate_epoch={self.estimate_epoch}" if trainer.current_epoch <= self.estimate_epoch else
                    f"and every epoch from estimate_epoch={self.estimate_epoch} on was unfit to estimate from (non-finite "
                    "or collapsed predictions)")
            rank_zero_warn(
                f"ForwardCorrectionCallback: training ended after {trainer.current_epoch} epoch(s), {when}, so no "
                "transition matrix was estimated and no step was corrected"
            )

    def _write_matrices(self, trainer: pl.Trainer) -> None:
        """Write the matrix in use (and the true one, when known) to every TensorBoard logger, rank zero only."""
        if not trainer.is_global_zero or self._transition is None:
            return
        names = {"given": "given", "true": "true (realised noise)", "estimate": "estimated"}
        text = f"**{names[self.mode]} transition matrix** T[clean, noisy]\n\n" + markdown_matrix(self._transition)
        if self._true is not None and self.mode != "true":
            mae = float((self._transition - self._true).abs().mean())
            text += "\n\n**true transition matrix** (realised noise)\n\n" + markdown_matrix(self._true)
            text += f"\n\nmean absolute error: {mae:.4f}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("noisy/transition_matrix", text, global_step=trainer.current_epoch)


def find_true_transition(trainer: pl.Trainer, labels: TrainingLabels | None = None) -> Tensor | None:
    """The realised ``[C, C]`` transition matrix of the training labels (float32), or ``None`` when unknown.

    Read from ``trainer.datamodule.noise_info.transition_matrix``; failing that, computed from the
    training labels when their clean labels are known.
    """
    info = getattr(trainer.datamodule, "noise_info", None) if trainer.datamodule is not None else None
    matrix = getattr(info, "transition_matrix", None)
    if isinstance(matrix, Tensor) and bool(torch.isfinite(matrix).all()):
        return matrix.detach().to(torch.float32).cpu()
    if labels is not None and labels.clean is not None:
        from lightning_noisy.data.noise import transition_matrix

        return transition_matrix(labels.clean, labels.noisy, labels.num_classes).to(torch.float32)
    return None


__all__ = ["ForwardCorrectionCallback", "find_true_transition", "forward_correction_transform", "markdown_matrix"]
