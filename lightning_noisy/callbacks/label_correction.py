"""LabelCorrectionCallback: Joint Optimization's alternating label updates for any Lightning classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, log_histogram
from lightning_noisy.data.noise import save_corrected_labels
from lightning_noisy.losses.regularizers import entropy_loss, prior_loss
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, StepContext
from lightning_noisy.state.label_rules import UPDATE_RULES, UpdateRule, label_entropy, update_labels

HistoryDtype = Literal["float32", "float16", "bfloat16"]


class LabelCorrectionCallback(SampleStateCallback):
    """Corrects the training labels from the network's own predictions (Tanaka et al., CVPR 2018).

    Each training step, the softmax of the step's logits is recorded per sample. At the end of every
    epoch from ``start_epoch`` on (and before ``stop_epoch``), the labels are replaced by the mean
    prediction of each sample's last ``num_average_epochs`` epochs (``"soft"``, Eq. 9), by its arg max
    (``"hard"``, Eq. 8), or only the ``top_k`` most disagreeing hard labels change (``"hard_topk"``).
    The module's ``training_step`` then receives the corrected labels as its targets: soft labels
    ``[B, C]`` float or hard labels ``[B]``, both of which ``F.cross_entropy`` accepts; with soft
    labels, cross-entropy has the gradient of the paper's KL term ``L_c``.

    With ``prior_weight`` (alpha) and ``entropy_weight`` (beta) the paper's ``alpha * L_p + beta * L_e``
    is added to the module's loss before ``stop_epoch``, for an unmodified module.

    Args:
        update: label-update rule: ``"soft"``, ``"hard"`` or ``"hard_topk"``.
        num_average_epochs: ``K``, epochs of predictions averaged per sample (paper: 10).
        start_epoch: first epoch (0-based) at whose end the labels are updated (paper, CIFAR-10: 70).
        stop_epoch: epoch from which labels stay as they are and the added loss terms stop (the start of
            step 2); ``None`` never stops.
        top_k: labels changed per update by ``"hard_topk"``.
        frozen: start with the labels frozen (served but never updated); see :meth:`freeze`.
        prior_weight: alpha of the prior term ``L_p`` (paper: 1.2 for CIFAR-10); 0 disables it.
        entropy_weight: beta of the entropy term ``L_e`` (paper: 0.8 for CIFAR-10); 0 disables it.
        prior: the class prior ``p`` of ``L_p`` (``C`` values summing to 1); uniform when ``None``.
        history_dtype: storage dtype of the ``K x N x C`` prediction history (``float16`` halves it).
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        update: UpdateRule = "soft",
        num_average_epochs: int = 10,
        start_epoch: int = 0,
        stop_epoch: int | None = None,
        top_k: int = 50,
        frozen: bool = False,
        prior_weight: float = 0.0,
        entropy_weight: float = 0.0,
        prior: list[float] | None = None,
        history_dtype: HistoryDtype = "float32",
        key: str | None = None,
    ) -> None:
        super().__init__(key=key)
        if update not in UPDATE_RULES:
            raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
        if int(num_average_epochs) < 1:
            raise ValueError(f"num_average_epochs must be >= 1, got {num_average_epochs}")
        if int(start_epoch) < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if stop_epoch is not None and int(stop_epoch) <= int(start_epoch):
            raise ValueError(f"stop_epoch must be after start_epoch={start_epoch}, got stop_epoch={stop_epoch}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        for name, weight in (("prior_weight", prior_weight), ("entropy_weight", entropy_weight)):
            if not float(weight) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        if history_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"history_dtype must be 'float32', 'float16' or 'bfloat16', got {history_dtype!r}")
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        if self.prior is not None and (
            self.prior.ndim != 1 or bool((self.prior < 0).any()) or abs(float(self.prior.sum()) - 1.0) > 1e-4
        ):
            raise ValueError(f"prior must be a list of non-negative class probabilities summing to 1, got {prior}")
        self.update = update
        self.num_average_epochs = int(num_average_epochs)
        self.start_epoch = int(start_epoch)
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)
        self.top_k = int(top_k)
        self.frozen = bool(frozen)
        self.prior_weight = float(prior_weight)
        self.entropy_weight = float(entropy_weight)
        self.history_dtype: torch.dtype = getattr(torch, history_dtype)
        self._labels: SampleBuffer | None = None
        self._history: SampleHistory | None = None
        self._recorder: SampleRecorder | None = None
        self._num_updates = 0
        self._current_epoch = 0

    # -- public API ------------------------------------------------------------------------------
    @property
    def labels(self) -> Tensor:
        """``[N, C]`` float32 current label distributions (one-hot rows for hard rules)."""
        if self._labels is None:
            raise RuntimeError("the labels exist once training has started (on_train_start)")
        return self._labels.values

    @property
    def hard_labels(self) -> Tensor:
        """``[N]`` int64 arg max of :attr:`labels`."""
        return self.labels.argmax(1)

    @property
    def num_updates(self) -> int:
        """How many label updates have been applied."""
        return self._num_updates

    def freeze(self) -> None:
        """Stop updating the labels; they keep being served to the module."""
        self.frozen = True

    def save_labels(self, path: str | Path) -> Path:
        """Save the corrected labels for step 2 (load with ``noise_type="file"``; soft labels under ``soft_labels``)."""
        labels = self.training_labels
        assert labels is not None
        return save_corrected_labels(path, self.labels, clean_labels=labels.clean, source=type(self).__name__)

    # -- state -----------------------------------------------------------------------------------
    def _recording(self, epoch: int) -> bool:
        return not self.frozen and (self.stop_epoch is None or epoch < self.stop_epoch)

    def _updating(self, epoch: int) -> bool:
        return self._recording(epoch) and epoch >= self.start_epoch

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        n, c = labels.num_samples, labels.num_classes
        if self.prior is not None and self.prior.shape[0] != c:
            raise ValueError(f"prior must have num_classes={c} entries, got {self.prior.shape[0]}")
        self._labels = SampleBuffer(n, (c,), torch.float32, fill=F.one_hot(labels.noisy, c).float())
        self._history = SampleHistory(n, self.num_average_epochs, (c,), self.history_dtype)
        self._recorder = SampleRecorder((c,), torch.float32)
        if self.prior_weight > 0 or self.entropy_weight > 0:
            assert self.contract is not None
            self.contract.add_loss_term(self, "joint_optimization", self._loss_terms)

    @override
    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        if self._labels is None or self._history is None:
            return {}
        return {"labels": self._labels, "history": self._history}

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"num_updates": self._num_updates, "frozen": self.frozen}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self._num_updates = int(state["num_updates"])
        self.frozen = bool(state["frozen"])

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

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if self._num_updates == 0:
            return  # the labels are still the given ones
        assert self._labels is not None
        rows = self._labels.values[context.index.cpu()]
        self.contract.set_targets(rows if self.update == "soft" else rows.argmax(1))  # type: ignore[union-attr]

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if context.logits is None:
            raise RuntimeError("LabelCorrectionCallback found no logits for this step")
        for name, value in context.loss_terms.items():
            pl_module.log(f"noisy/{name}_loss", value, on_step=False, on_epoch=True, batch_size=context.batch_size)
        if self._recording(trainer.current_epoch):
            assert self._recorder is not None
            self._recorder.add(context.index, torch.softmax(context.logits.detach().float(), dim=1))

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        assert self._labels is not None and self._history is not None and self._recorder is not None
        if self._recording(epoch):
            index, probs, _ = self._recorder.gather(trainer.strategy.root_device, reduction="mean")
            self._history.append(index, probs)
            if self._updating(epoch):
                seen = self._history.visits > 0
                new = update_labels(self._labels.values[seen], self._history.mean()[seen], self.update, self.top_k)
                self._labels.write(seen.nonzero().squeeze(1), new)
                self._num_updates += 1
        self._log_epoch(trainer, pl_module)

    def _log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._labels is not None and self.training_labels is not None
        hard = self.hard_labels
        metrics = {
            "noisy/changed_frac": (hard != self.training_labels.noisy).float().mean(),
            "noisy/label_entropy": label_entropy(self._labels.values),
        }
        if self.training_labels.clean is not None:
            metrics["noisy/recovery_acc"] = (hard == self.training_labels.clean).float().mean()
        self.log_epoch_metrics(pl_module, metrics)
        log_histogram(trainer, "noisy/label_confidence", self._labels.values.max(1).values)
