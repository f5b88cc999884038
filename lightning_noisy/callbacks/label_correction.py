"""LabelCorrectionCallback: Joint Optimization's alternating label updates for any Lightning classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, log_epoch, log_histogram
from lightning_noisy.callbacks.onset import MemorisationOnset, prediction_changes
from lightning_noisy.data.noise import save_corrected_labels
from lightning_noisy.losses.regularizers import entropy_loss, prior_loss
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, SampleRunningMean, StepContext
from lightning_noisy.state.fetch import RowFetcher, planned_batches
from lightning_noisy.state.gather import all_gather_uneven, is_distributed
from lightning_noisy.state.label_rules import UPDATE_RULES, UpdateRule, disagreement, most_disagreeing, update_labels
from lightning_noisy.state.sharded import gather_rows, gather_scalars
from lightning_noisy.state.storage import StateOptions, StorageDtype

HistoryForm = Literal["ring", "running"]
StartEpoch = int | Literal["auto"]


class LabelCorrectionCallback(SampleStateCallback):
    """Corrects the training labels from the network's own predictions (Tanaka et al., CVPR 2018).

    Each training step, the softmax of the step's logits is recorded per sample. At the end of every
    epoch from the start epoch on (and before ``stop_epoch``), the labels are replaced by the mean
    prediction of each sample's last ``num_average_epochs`` epochs (``"soft"``, Eq. 9), by its arg max
    (``"hard"``, Eq. 8), or only the ``top_k`` most disagreeing hard labels change (``"hard_topk"``).
    The module's ``training_step`` then receives the corrected labels as its targets: soft labels
    ``[B, C]`` float or hard labels ``[B]``, both of which ``F.cross_entropy`` accepts; with soft
    labels, cross-entropy has the gradient of the paper's KL term ``L_c``.

    With ``prior_weight`` (alpha) and ``entropy_weight`` (beta) the paper's ``alpha * L_p + beta * L_e``
    is added to the module's loss before ``stop_epoch``, for an unmodified module.

    With ``start_epoch="auto"`` (the default) the callback starts on its own, once the network has fitted
    the patterns most samples share and before it memorises the mislabelled ones: at the first minimum of
    the share of training samples whose predicted class changes from one epoch to the next (Yuan et al.,
    ICLR 2024, "Label Wave"; see :class:`~lightning_noisy.callbacks.onset.MemorisationOnset`). That share
    is logged as ``noisy/prediction_changes``, ``noisy/label_updates_started`` turns from 0 to 1 at the
    start, and the log says why it started then. Epochs whose predictions are all non-finite, or near
    uniform after a collapse, update nothing (see :class:`SampleStateCallback`).

    Args:
        update: label-update rule: ``"soft"``, ``"hard"`` or ``"hard_topk"``.
        num_average_epochs: ``K``, epochs of predictions averaged per sample (paper: 10).
        start_epoch: first epoch (0-based) at whose end the labels are updated (paper, CIFAR-10: 70), or
            ``"auto"``: the epoch at which the memorisation of noisy labels sets in, found as above.
        stop_epoch: epoch from which labels stay as they are and the added loss terms stop (the start of
            step 2); ``None`` never stops.
        top_k: labels changed per update by ``"hard_topk"``.
        frozen: start with the labels frozen (served but never updated); see :meth:`freeze`.
        prior_weight: alpha of the prior term ``L_p`` (paper: 1.2 for CIFAR-10, the default); 0 disables it.
        entropy_weight: beta of the entropy term ``L_e`` (paper: 0.8 for CIFAR-10, the default); 0 disables it.
        prior: the class prior ``p`` of ``L_p`` (``C`` values summing to 1); uniform when ``None``.
        shard_state: each DDP rank keeps only its block of about ``N / W`` label and history rows and
            fetches the rows its batches need from their owners; ``None`` shards whenever the world size is
            above 1. Sharded and replicated runs give bit-identical labels.
        storage_dtype: dtype of the stored labels and ``K x N x C`` history: ``"float32"``, ``"bfloat16"``
            or ``"float16"`` (half the memory; labels and averages then carry that dtype's rounding).
        storage_topk: keep only the ``k`` largest entries of each label and history row, renormalised
            (``None``: dense rows); must be below ``C``. Hard labels are stored exactly with any ``k``.
        history: how the last ``K`` predictions are kept: ``"ring"``, all ``K`` of them (the paper's exact
            ``K``-epoch average, ``K x N x C`` values), or ``"running"``, one running mean (``N x C``): the
            predictions are recorded from epoch ``start_epoch - K + 1``, so the first update averages
            exactly the paper's ``K`` epochs; each later epoch moves the mean by ``1 / K`` of its
            difference (an exponential moving average) instead of dropping the oldest epoch.
        fetch_window: batches whose label rows a sharded state fetches in one collective.
        onset_window: with ``"auto"``, epochs over which the prediction changes are averaged.
        onset_patience: with ``"auto"``, epochs without a new minimum of the average before the start (6: on
            MNIST-1D a later start kept more labels right at 0% and 40% noise than 3 did; see docs/benchmarks.md).
        collapse_entropy: skip the label update of an epoch whose mean prediction entropy is at least this
            share of ``ln C`` after the network had learned (a collapse); ``None`` disables the check.
        max_skipped_epochs: skipped epochs in a row after which the fit stops with an error.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        update: UpdateRule = "soft",
        num_average_epochs: int = 10,
        start_epoch: StartEpoch = "auto",
        stop_epoch: int | None = None,
        top_k: int = 50,
        frozen: bool = False,
        prior_weight: float = 1.2,
        entropy_weight: float = 0.8,
        prior: list[float] | None = None,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        history: HistoryForm = "ring",
        fetch_window: int = 16,
        onset_window: int = 3,
        onset_patience: int = 6,
        collapse_entropy: float | None = 0.99,
        max_skipped_epochs: int = 5,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state, storage_dtype, storage_topk))
        if update not in UPDATE_RULES:
            raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
        if int(num_average_epochs) < 1:
            raise ValueError(f"num_average_epochs must be >= 1, got {num_average_epochs}")
        auto = start_epoch == "auto"
        if not auto and (isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0):
            raise ValueError(f"start_epoch must be an integer >= 0 or 'auto', got {start_epoch!r}")
        if stop_epoch is not None and (isinstance(stop_epoch, bool) or not isinstance(stop_epoch, int)
                                       or stop_epoch <= (0 if auto else start_epoch)):
            raise ValueError(f"stop_epoch must be an integer after start_epoch={start_epoch!r}, got {stop_epoch!r}")
        if collapse_entropy is not None and not 0.0 < float(collapse_entropy) <= 1.0:
            raise ValueError(f"collapse_entropy must be in (0, 1] (a share of ln C) or None, got {collapse_entropy!r}")
        if isinstance(max_skipped_epochs, bool) or not isinstance(max_skipped_epochs, int) or max_skipped_epochs < 1:
            raise ValueError(f"max_skipped_epochs must be an integer >= 1, got {max_skipped_epochs!r}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        for name, weight in (("prior_weight", prior_weight), ("entropy_weight", entropy_weight)):
            if not float(weight) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        if history not in ("ring", "running"):
            raise ValueError(f"history must be 'ring' or 'running', got {history!r}")
        if isinstance(fetch_window, bool) or not isinstance(fetch_window, int) or fetch_window < 1:
            raise ValueError(f"fetch_window must be an integer >= 1, got {fetch_window!r}")
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        if self.prior is not None and (
            self.prior.ndim != 1 or bool((self.prior < 0).any()) or abs(float(self.prior.sum()) - 1.0) > 1e-4
        ):
            raise ValueError(f"prior must be a list of non-negative class probabilities summing to 1, got {prior}")
        self.onset = MemorisationOnset(onset_window, onset_patience) if auto else None
        self.collapse_entropy = None if collapse_entropy is None else float(collapse_entropy)
        self.max_skipped_epochs = max_skipped_epochs
        self.update = update
        self.num_average_epochs = int(num_average_epochs)
        self.start_epoch: StartEpoch = "auto" if auto else int(start_epoch)
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)
        self.top_k = int(top_k)
        self.frozen = bool(frozen)
        self.prior_weight = float(prior_weight)
        self.entropy_weight = float(entropy_weight)
        self.fetch_window = fetch_window
        self.history = history
        self._labels: SampleBuffer | None = None
        self._predicted: SampleBuffer | None = None  # last epoch's predicted class per sample ("auto" only)
        self._history: SampleHistory | SampleRunningMean | None = None
        self._recorder: SampleRecorder | None = None
        self._fetcher: RowFetcher | None = None
        self._num_updates = 0
        self._current_epoch = 0

    # -- public API ------------------------------------------------------------------------------
    def _require_labels(self) -> SampleBuffer:
        if self._labels is None:
            raise RuntimeError("the labels exist once training has started (on_train_start)")
        return self._labels

    @property
    def labels(self) -> Tensor:
        """``[N, C]`` float32 current label distributions (one-hot rows for hard rules), renormalised when stored compactly.

        With sharded state this gathers the whole table onto every rank: a collective, read it on every
        rank during the fit. :meth:`local_labels` gives this rank's block without communication.
        """
        return self._distributions(gather_rows(self._require_labels(), self.collective_device))

    def local_labels(self) -> tuple[Tensor, Tensor]:
        """``(index [R], labels [R, C])``: the rows this rank holds (all ``N`` unless the state is sharded)."""
        labels = self._require_labels()
        return labels.index, self._distributions(labels.values)

    @property
    def hard_labels(self) -> Tensor:
        """``[N]`` int64 arg max of :attr:`labels` (gathered on demand when sharded, like :attr:`labels`)."""
        return self.labels.argmax(1)

    @property
    def num_updates(self) -> int:
        """How many label updates have been applied."""
        return self._num_updates

    @property
    def resolved_start_epoch(self) -> int | None:
        """The first epoch of label updates: ``start_epoch``, or the epoch ``"auto"`` found (``None`` until then)."""
        if self.onset is None:
            assert isinstance(self.start_epoch, int)
            return self.start_epoch
        return self.onset.onset_epoch

    def freeze(self) -> None:
        """Stop updating the labels; they keep being served to the module."""
        self.frozen = True

    def save_labels(self, path: str | Path) -> Path:
        """Save the corrected labels for step 2 (load with ``noise_type="file"``; soft labels under ``soft_labels``).

        Gathers :attr:`labels` (a collective when sharded: call it on every rank).
        """
        labels = self.training_labels
        assert labels is not None
        return save_corrected_labels(path, self.labels, clean_labels=labels.clean, source=type(self).__name__)

    @property
    def state_bytes(self) -> int:
        """Bytes of the per-sample state this rank holds (labels and history)."""
        return sum(buffer.nbytes for buffer in self.sample_buffers().values())

    # -- state -----------------------------------------------------------------------------------
    def _recording(self, epoch: int) -> bool:
        start = self.resolved_start_epoch
        if self.history == "running" and self.onset is None and epoch < start - self.num_average_epochs + 1:
            return False  # the running mean starts K epochs before the first update (with "auto": from the start)
        return not self.frozen and (self.stop_epoch is None or epoch < self.stop_epoch)

    def _updating(self, epoch: int) -> bool:
        start = self.resolved_start_epoch
        return self._recording(epoch) and start is not None and epoch >= start

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        n, c = labels.num_samples, labels.num_classes
        if self.prior is not None and self.prior.shape[0] != c:
            raise ValueError(f"prior must have num_classes={c} entries, got {self.prior.shape[0]}")
        options, layout = self.state_options, self.row_layout(trainer, n)
        topk, noisy = options.topk_for(c), labels.noisy
        self._labels = SampleBuffer(n, (c,), options.dtype, fill=lambda index: F.one_hot(noisy[index], c),
                                    layout=layout, topk=topk)
        history = SampleHistory if self.history == "ring" else SampleRunningMean
        self._history = history(n, self.num_average_epochs, (c,), options.dtype, layout=layout, topk=topk)
        self._recorder = SampleRecorder((c,), options.dtype, topk)  # records in the stored form
        self._fetcher = RowFetcher(self._labels, self.fetch_window, trainer.strategy.root_device)
        if self.onset is not None:
            self._predicted = SampleBuffer(n, (), torch.int64, fill=-1, layout=layout)
        if self.prior_weight > 0 or self.entropy_weight > 0:
            assert self.contract is not None
            self.contract.add_loss_term(self, "joint_optimization", self._loss_terms)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory | SampleRunningMean]:
        if self._labels is None or self._history is None:
            return {}
        buffers = {"labels": self._labels, "history": self._history}
        if self._predicted is not None:
            buffers["predicted_class"] = self._predicted
        return buffers

    @override
    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        return {"predictions": self._recorder}

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"num_updates": self._num_updates, "frozen": self.frozen}
        if self.onset is not None:
            extra["onset"] = self.onset.state_dict()
        return extra

    @override
    def load_sample_state_dict(self, state: dict[str, Any], checkpoint_path: str | None = None) -> None:
        if state and (self.onset is None) != ("onset" not in state["extra"]):
            saved = "'auto'" if "onset" in state["extra"] else "an integer"
            raise ValueError(f"LabelCorrectionCallback: the checkpoint was written with start_epoch={saved}, this "
                             f"callback has start_epoch={self.start_epoch!r}")
        super().load_sample_state_dict(state, checkpoint_path)

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self._num_updates = int(state["num_updates"])
        self.frozen = bool(state["frozen"])
        if self.onset is not None:
            self.onset.load_state_dict(state["onset"])

    # -- per step --------------------------------------------------------------------------------
    def _loss_terms(self, context: StepContext) -> Tensor | None:
        if self.stop_epoch is not None and self._current_epoch >= self.stop_epoch:
            return None
        assert context.logits is not None
        total = context.logits.new_zeros((), dtype=torch.float32)
        if self.prior_weight > 0:
            prior = None if self.prior is None else self.prior.to(context.logits.device)
            total = total + self.prior_weight * prior_loss(context.logits, prior)
        if self.entropy_weight > 0:
            total = total + self.entropy_weight * entropy_loss(context.logits)
        return total

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current_epoch = trainer.current_epoch
        if self._fetcher is not None:
            self._fetcher.start_epoch(planned_batches(trainer.train_dataloader))

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self._current_epoch = trainer.current_epoch  # also after a resume mid-epoch, which skips on_train_epoch_start
        if self._num_updates == 0:
            return  # the labels are still the given ones (the same on every rank, so no rank fetches)
        assert self._fetcher is not None
        rows = self._fetcher.rows(context.index)
        self.contract.set_targets(self._distributions(rows) if self.update == "soft" else rows.argmax(1))  # type: ignore[union-attr]

    def _distributions(self, rows: Tensor) -> Tensor:
        """Stored label rows as distributions: compact storage (bfloat16, float16, top-k) rounds their sums,
        so they are renormalised in float32; float32 dense rows are served as stored."""
        options = self.state_options
        if options.storage_dtype == "float32" and options.storage_topk is None:
            return rows
        return rows / rows.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if context.logits is None:
            raise RuntimeError("LabelCorrectionCallback found no logits for this step")
        for name, value in context.loss_terms.items():
            log_epoch(pl_module, f"noisy/{name}_loss", value, batch_size=context.batch_size)
        if self._recording(trainer.current_epoch):
            assert self._recorder is not None
            self._recorder.add(context.index, torch.softmax(context.logits.detach().float(), dim=1))

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        assert self._labels is not None and self._history is not None and self._recorder is not None
        if self._recording(epoch):
            device = trainer.strategy.root_device
            index, probs, _ = self._recorder.gather_parts(device, reduction="mean", layout=self._labels.layout)
            self._history.append_parts(index, probs)
            if self.onset is not None:
                self._find_onset(trainer, pl_module, index, self._recorder.codec.decode(probs).argmax(1))
            del index, probs
            if self._updating(epoch):
                self._update_labels(device)
                self._num_updates += 1
        self._log_epoch(trainer, pl_module)

    def _find_onset(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: Tensor, predicted: Tensor) -> None:
        """Compare this epoch's predicted classes with the last epoch's and feed the share changed to the onset."""
        assert self.onset is not None and self._predicted is not None and self._labels is not None
        changed, compared = prediction_changes(self._predicted.read(index), predicted)
        self._predicted.write(index, predicted)
        changed, compared = (int(v) for v in self.sum_over_shards(
            trainer, self._labels.layout, torch.tensor([changed, compared], dtype=torch.float64)))
        if compared == 0:
            return
        share = changed / compared
        self.log_epoch_metrics(pl_module, {"noisy/prediction_changes": torch.tensor(share)})
        if self.onset.observe(trainer.current_epoch, share):
            rank_zero_info(f"LabelCorrectionCallback: label updates start at epoch {self.onset.onset_epoch}: "
                           f"{self.onset.reason()} (the onset of memorisation, Yuan et al. ICLR 2024)")

    def _update_labels(self, device: torch.device) -> None:
        """New labels of the rows held from their K-epoch mean predictions, a block of rows at a time."""
        assert self._labels is not None and self._history is not None
        if self.update == "hard_topk":
            self._update_top_k(device)
            return
        for index in self._history.chunks():
            index = index[self._history.visits[index - self._history.start] > 0]
            mean = self._history.mean(index)
            self._labels.write(index, update_labels(self._labels.read(index), mean, self.update, self.top_k))

    def _update_top_k(self, device: torch.device) -> None:
        """``"hard_topk"``: the ``top_k`` most disagreeing labels of the whole table, chosen across blocks."""
        assert self._labels is not None and self._history is not None
        pieces = []
        for index in self._history.chunks():
            index = index[self._history.visits[index - self._history.start] > 0]
            pieces.append((*disagreement(self._labels.read(index), self._history.mean(index)), index))
        gap, top_class, index = (torch.cat(column) for column in zip(*pieces))
        chosen = most_disagreeing(gap, index, self.top_k)  # this block's candidates, then the union's
        if self._labels.layout.is_sharded and is_distributed():
            candidates = torch.isin(index, chosen)
            all_gaps = torch.cat(all_gather_uneven(gap[candidates].to(device))).cpu()
            all_index = torch.cat(all_gather_uneven(index[candidates].to(device))).cpu()
            chosen = most_disagreeing(all_gaps, all_index, self.top_k)
        mine = torch.isin(index, chosen)
        c = self._labels.value_shape[0]
        self._labels.write(index[mine], F.one_hot(top_class[mine], c).float())

    def _log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._labels is not None and self.training_labels is not None
        labels, given = self.training_labels, self._labels
        sums = torch.zeros(3, dtype=torch.float64)  # changed, recovered, entropy (nats), over the rows held
        confidence = []
        for index in given.chunks():
            rows = given.read(index)
            hard = rows.argmax(1)
            sums[0] += int((hard != labels.noisy[index]).sum())
            if labels.clean is not None:
                sums[1] += int((hard == labels.clean[index]).sum())
            sums[2] += float(-(rows * torch.log(rows.clamp_min(1e-12))).sum(1).double().sum())
            confidence.append(rows.max(1).values)
        sums = self.sum_over_shards(trainer, given.layout, sums)
        n = labels.num_samples
        metrics = {"noisy/changed_frac": (sums[0] / n).float(), "noisy/label_entropy": (sums[2] / n).float(),
                   "noisy/label_updates_started": torch.tensor(float(self._num_updates > 0))}
        if labels.clean is not None:
            metrics["noisy/recovery_acc"] = (sums[1] / n).float()
        self.log_epoch_metrics(pl_module, metrics)
        all_confidence = gather_scalars(torch.cat(confidence), given.layout.is_sharded, trainer.strategy.root_device)
        log_histogram(trainer, "noisy/label_confidence", all_confidence)
