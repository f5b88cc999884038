"""AUMCallback: area under the margin (Pleiss et al., NeurIPS 2020) with threshold samples, on any classifier."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, log_histogram
from lightning_noisy.metrics.selection import selection_scores
from lightning_noisy.seeding import stream_generator
from lightning_noisy.state import SampleBuffer, StepContext
from lightning_noisy.state.exchange import sum_to_owners
from lightning_noisy.state.sharded import gather_scalars
from lightning_noisy.state.storage import StateOptions

#: columns of the ``aum`` package's ``aum_values.csv`` (sorted by ``aum``, largest first)
AUM_CSV_COLUMNS = ("sample_id", "aum")
#: columns of the per-run flag file that :func:`combine_aum_runs` reads
FLAG_CSV_COLUMNS = ("sample_id", "aum", "threshold_sample", "flagged")


def margins(logits: Tensor, assigned: Tensor) -> Tensor:
    """Margin ``z[assigned] - max_{k != assigned} z[k]`` of pre-softmax ``logits [B, K]``: ``[B]`` float32."""
    logits = logits.detach().float()
    column = assigned.view(-1, 1)
    largest_other = logits.scatter(1, column, float("-inf")).amax(dim=1, keepdim=True)  # assigned logit masked
    return (logits.gather(1, column) - largest_other).squeeze(1)


def threshold_sample_mask(
    num_samples: int, num_classes: int, run: int = 0, seed: int = 0, fraction: float | None = None
) -> Tensor:
    """``[N]`` bool: the threshold samples of run ``run``; the runs of one ``seed`` draw disjoint sets.

    A random permutation of the samples (fixed by ``seed``, from a stream of its own so that it is not the
    shuffling sampler's epoch-0 order for the same seed) is cut into consecutive blocks of
    ``floor(fraction * N)`` samples, ``fraction = 1 / (C + 1)`` by default (Pleiss et al. 2020, Sec. 3);
    run ``r`` takes block ``r``. So ``C + 1`` runs at most, and together they cover every sample once
    when ``fraction = 1 / (C + 1)``.
    """
    fraction = 1.0 / (num_classes + 1) if fraction is None else float(fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"threshold_fraction must be in (0, 1), got {fraction}")
    size = int(fraction * num_samples)
    if size < 1:
        raise ValueError(f"threshold_fraction={fraction} of {num_samples} samples leaves no threshold sample")
    if not 0 <= run < num_samples // size:
        raise ValueError(f"threshold_run must be in [0, {num_samples // size}) for this fraction, got {run}")
    order = torch.randperm(num_samples, generator=stream_generator(seed, "aum-threshold"))
    mask = torch.zeros(num_samples, dtype=torch.bool)
    mask[order[run * size : (run + 1) * size]] = True
    return mask


def aum_threshold(threshold_aum: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile (linear interpolation, as ``numpy.percentile``) of the threshold AUMs."""
    if threshold_aum.numel() == 0:
        raise ValueError("no threshold sample has an AUM yet")
    return float(torch.quantile(threshold_aum.double(), percentile / 100.0))


def combine_aum_runs(flagged: Sequence[Tensor], threshold_masks: Sequence[Tensor]) -> Tensor:
    """Samples to remove after several AUM runs: ``[N]`` bool.

    A sample is removed when it was flagged in every run where it was not a threshold sample (and it
    was an ordinary sample in at least one run), the two-run rule of Pleiss et al. 2020, Sec. 3.
    """
    if len(flagged) != len(threshold_masks) or not flagged:
        raise ValueError(f"expected one threshold mask per run, got {len(flagged)} flag sets and {len(threshold_masks)} masks")
    shape = flagged[0].shape
    if any(f.shape != shape or m.shape != shape or f.dtype != torch.bool or m.dtype != torch.bool
           for f, m in zip(flagged, threshold_masks)):
        raise ValueError("every flag set and threshold mask must be a bool tensor of the same shape [N]")
    ordinary = torch.stack([~m for m in threshold_masks])
    flags = torch.stack(list(flagged))
    return ordinary.any(0) & (flags | ~ordinary).all(0)


def read_flag_file(path: str | Path) -> tuple[Tensor, Tensor, Tensor]:
    """``(sample_id [N], threshold_sample [N] bool, flagged [N] bool)`` of a file written by :meth:`AUMCallback.save_flags`."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != FLAG_CSV_COLUMNS:
            raise ValueError(f"{path}: expected the columns {FLAG_CSV_COLUMNS}, got {reader.fieldnames}")
        rows = sorted(reader, key=lambda row: int(row["sample_id"]))
    ids = torch.tensor([int(r["sample_id"]) for r in rows], dtype=torch.long)
    threshold = torch.tensor([r["threshold_sample"] == "1" for r in rows])
    flagged = torch.tensor([r["flagged"] == "1" for r in rows])
    return ids, threshold, flagged


class AUMCallback(SampleStateCallback):
    """Area under the margin of every training sample, and the samples it flags as mislabelled.

    At every training step the margin of each sample is recorded: its assigned logit minus the largest
    other logit, before the softmax. A sample's AUM is the mean of its margins from ``start_epoch`` on.
    A random ``1 / (C + 1)`` share of the samples, the threshold samples, are relabelled to an extra
    class ``C`` (the model needs ``C + 1`` outputs), so their labels are certainly wrong; samples whose AUM
    is below the ``percentile``-th percentile of the threshold samples' AUMs are flagged. A model with ``C``
    outputs, as an unmodified classifier has, gets no threshold samples: a sample is then flagged when its
    AUM is below 0, the assigned logit being on average below the largest other one (the sign of the margin
    that the threshold samples calibrate).

    Each epoch it logs ``aum/threshold`` and ``aum/flagged_fraction``, with the clean labels the
    precision, recall, F1 and AUROC of the detection (``noisy/aum_*``), and a histogram of the AUMs.
    Each rank adds its margins into dense ``[N]`` sums and counts; once per epoch these are summed over
    the ranks in rank order, each rank receiving only the rows it owns when the state is sharded (one
    all-to-all each), so the values equal a single process's and a sharded run's equal a replicated
    run's bit for bit. The results: :attr:`aum`, :attr:`flagged` (gathered on demand when sharded),
    :meth:`save_csv` (the ``aum`` package's ``aum_values.csv`` columns) and :meth:`save_flags`; with
    ``output_dir`` both are written when training ends.

    Two runs with ``threshold_run=0`` and ``1`` (same ``threshold_seed``) use disjoint threshold sets;
    :func:`combine_aum_runs` (or ``python -m lightning_noisy.aum_combine``) applies the two-run rule.

    Args:
        start_epoch: first epoch whose margins enter the AUM.
        percentile: percentile of the threshold samples' AUMs below which a sample is flagged, in (0, 100).
        threshold_samples: relabel threshold samples to class ``C`` (the model needs ``C + 1`` outputs); without
            them the threshold is 0. ``"auto"``: with them when the module declares ``num_classes`` (as an
            attribute or hyperparameter) equal to ``C + 1``, else without.
        threshold_fraction: share of threshold samples (default ``1 / (C + 1)``).
        threshold_run: which disjoint threshold set to use (0 for the first run, 1 for the second).
        threshold_seed: seed of the threshold sets (the same for the runs to be combined).
        output_dir: write ``aum_values.csv`` and ``aum_flags.csv`` there when training ends (rank 0).
        histogram: write the AUM histogram to TensorBoard.
        shard_state: each DDP rank keeps only its block of about ``N / W`` margin sums and counts (``None``:
            whenever the world size is above 1). The sums stay float64: ``storage_dtype`` and
            ``storage_topk`` do not apply to them.
        key: distinguishes two instances in one checkpoint.
    """

    def __init__(
        self,
        start_epoch: int = 0,
        percentile: float = 99.0,
        threshold_samples: bool | Literal["auto"] = "auto",
        threshold_fraction: float | None = None,
        threshold_run: int = 0,
        threshold_seed: int = 0,
        output_dir: str | None = None,
        histogram: bool = True,
        shard_state: bool | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(key=key, state_options=StateOptions(shard_state))
        if int(start_epoch) < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if not 0 < float(percentile) < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile}")
        if threshold_fraction is not None and not 0 < float(threshold_fraction) < 1:
            raise ValueError(f"threshold_fraction must be in (0, 1), got {threshold_fraction}")
        if int(threshold_run) < 0:
            raise ValueError(f"threshold_run must be >= 0, got {threshold_run}")
        if threshold_samples not in (True, False, "auto"):
            raise ValueError(f"threshold_samples must be True, False or 'auto', got {threshold_samples!r}")
        self.start_epoch = int(start_epoch)
        self.percentile = float(percentile)
        self.threshold_samples = threshold_samples
        self.use_threshold_samples = threshold_samples is True  # "auto" is resolved when training starts
        self.threshold_fraction = threshold_fraction
        self.threshold_run = int(threshold_run)
        self.threshold_seed = int(threshold_seed)
        self.output_dir = output_dir
        self.histogram = histogram
        self.threshold_mask: Tensor | None = None
        self._assigned: Tensor | None = None  # [N] the given label, or class C for a threshold sample
        self._device_assigned: Tensor | None = None
        # this rank's margin sums and counts of the running epoch, dense [N] on the logits' device
        self._epoch_sum: Tensor | None = None
        self._epoch_count: Tensor | None = None
        self.margin_sum: SampleBuffer | None = None
        self.margin_count: SampleBuffer | None = None
        self._checked_outputs = False
        self._output_check: RemovableHandle | None = None

    @property
    def num_outputs(self) -> int:
        """Outputs the model must have: ``C + 1`` with threshold samples, else ``C``."""
        assert self.training_labels is not None, "known once training starts"
        return self.training_labels.num_classes + int(self.use_threshold_samples)

    @override
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        declared = getattr(pl_module, "num_classes", None)
        if not isinstance(declared, int):
            declared = getattr(getattr(pl_module, "hparams", {}), "get", lambda _: None)("num_classes")
        if self.threshold_samples == "auto":
            self.use_threshold_samples = isinstance(declared, int) and declared == labels.num_classes + 1
            rank_zero_info(
                f"AUMCallback: {'with' if self.use_threshold_samples else 'without'} threshold samples (the module "
                f"declares {declared if isinstance(declared, int) else 'no'} num_classes for C={labels.num_classes}); "
                + ("flagged below their AUM percentile" if self.use_threshold_samples else "flagged below AUM 0")
            )
        if isinstance(declared, int):
            self._check_outputs(declared, labels.num_classes)
        n = labels.num_samples
        if self.use_threshold_samples:
            run, seed, fraction = self.threshold_run, self.threshold_seed, self.threshold_fraction
            self.threshold_mask = threshold_sample_mask(n, labels.num_classes, run, seed, fraction)
        else:
            self.threshold_mask = torch.zeros(n, dtype=torch.bool)
        self._assigned = torch.where(self.threshold_mask, labels.num_classes, labels.noisy)
        self._device_assigned = None
        self._epoch_sum = torch.zeros(n, dtype=torch.float64)
        self._epoch_count = torch.zeros(n, dtype=torch.long)
        layout = self.row_layout(trainer, n)
        self.margin_sum = SampleBuffer(n, (), torch.float64, layout=layout)
        self.margin_count = SampleBuffer(n, (), torch.long, layout=layout)

    def _check_outputs(self, outputs: int, num_classes: int) -> None:
        expected = num_classes + int(self.use_threshold_samples)
        if outputs != expected:
            extra = " (C + 1: the threshold samples are relabelled to an extra class C)" if self.use_threshold_samples else ""
            fix = (f"build it with num_classes={expected} or pass threshold_samples=False" if self.use_threshold_samples
                   else "pass threshold_samples=True to use the extra output for threshold samples"
                   if outputs == num_classes + 1 else f"build it with num_classes={expected}")
            raise ValueError(f"AUMCallback: the model must have {expected} outputs{extra} for C={num_classes} classes, "
                             f"got {outputs}; {fix}")
        self._checked_outputs = True

    def _check_first_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # a forward hook for the first step: the check must come before the module's loss sees class C
        if isinstance(output, Tensor) and output.ndim == 2 and self._output_check is not None:
            self._output_check.remove()
            self._output_check = None
            assert self.training_labels is not None
            self._check_outputs(int(output.shape[1]), self.training_labels.num_classes)

    @override
    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        if not self._checked_outputs and self._output_check is None:
            self._output_check = pl_module.register_forward_hook(self._check_first_output)
        if self.use_threshold_samples:
            assert self.contract is not None
            self.contract.set_targets(self._assigned_of(context.index))

    def _assigned_of(self, index: Tensor) -> Tensor:
        """``[B]`` the given label of each sample, or class ``C`` for a threshold sample, on ``index``'s device."""
        assert self._assigned is not None
        if self._device_assigned is None or self._device_assigned.device != index.device:
            self._device_assigned = self._assigned.to(index.device)
        return self._device_assigned.index_select(0, index)

    @override
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert context.logits is not None and self._epoch_sum is not None and self._epoch_count is not None
        assert self.training_labels is not None
        self._remove_output_check()
        if not self._checked_outputs:
            self._check_outputs(int(context.logits.shape[1]), self.training_labels.num_classes)
        if trainer.current_epoch < self.start_epoch:
            return
        # the given label, or class C for a threshold sample (not the batch's target, which another callback,
        # such as LabelCorrectionCallback, may have replaced by a corrected or soft label)
        assigned = self._assigned_of(context.index).to(context.logits.device)
        device = context.logits.device
        if self._epoch_sum.device != device:  # float64 accumulators, float32 where the device has no float64
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._epoch_sum = self._epoch_sum.to(device, dtype)
            self._epoch_count = self._epoch_count.to(device)
        index = context.index.to(device)
        self._epoch_sum.index_add_(0, index, margins(context.logits, assigned).to(self._epoch_sum.dtype))
        self._epoch_count.index_add_(0, index, torch.ones_like(index))

    @override
    def on_skipped_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        if self._epoch_sum is not None and self._epoch_count is not None:
            self._epoch_sum.zero_()
            self._epoch_count.zero_()

    @override
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.margin_sum is not None and self.margin_count is not None
        assert self._epoch_sum is not None and self._epoch_count is not None
        layout, device = self.margin_sum.layout, trainer.strategy.root_device
        # one sum over the ranks per epoch: this rank's rows (all of them unless sharded)
        total = sum_to_owners(self._epoch_sum, layout, device)
        counts = sum_to_owners(self._epoch_count, layout, device)
        finite = torch.isfinite(total)
        index = torch.nonzero((counts > 0) & finite).flatten()
        seen, dropped = self.sum_over_shards(trainer, layout, torch.tensor([index.numel(), int((~finite).sum())]))
        if int(dropped):  # a NaN or inf margin: the sample keeps its sum and count of the epochs before
            rank_zero_warn(f"AUMCallback: {int(dropped)} sample(s) had non-finite margins in epoch "
                           f"{trainer.current_epoch}; their AUM keeps its previous value")
        if int(seen) == 0:
            self._epoch_sum.zero_()
            self._epoch_count.zero_()
            return
        self.margin_sum.write(index.cpu() + layout.start, total[index].double().cpu(), mode="add")
        self.margin_count.write(index.cpu() + layout.start, counts[index].cpu(), mode="add")
        self._epoch_sum.zero_()
        self._epoch_count.zero_()
        rows, aum, seen = self._local_aum()
        sharded = layout.is_sharded
        metrics: dict[str, Tensor] = {}
        assert self.threshold_mask is not None
        mask = self.threshold_mask[rows]
        threshold = (aum_threshold(gather_scalars(aum[mask & seen], sharded, device), self.percentile)
                     if self.use_threshold_samples else 0.0)
        flagged = (aum < threshold) & ~mask & seen
        counts = self.sum_over_shards(trainer, layout, torch.stack([flagged.sum(), seen.sum()]))
        metrics["aum/threshold"] = torch.tensor(threshold)
        metrics["aum/flagged_fraction"] = counts[0].double() / counts[1].double()
        labels = self.training_labels
        ordinary = seen & ~mask
        if labels is not None and labels.clean is not None:  # AUROC ranks every sample: gathered, for metrics
            is_clean = (labels.noisy == labels.clean)[rows][ordinary]
            scores, kept, clean = (gather_scalars(t, sharded, device) for t in (aum[ordinary], ~flagged[ordinary], is_clean))
            if scores.numel():
                found = selection_scores(scores.float(), kept, clean, positive="noisy")
                metrics.update({f"noisy/aum_{name}": value for name, value in found.items()})
        self.log_epoch_metrics(pl_module, metrics)
        if self.histogram:
            log_histogram(trainer, "aum/values", gather_scalars(aum[seen], sharded, device))

    def _remove_output_check(self) -> None:
        if self._output_check is not None:
            self._output_check.remove()
            self._output_check = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_output_check()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.output_dir is None or self.margin_count is None:
            return
        visited = self.sum_over_shards(trainer, self.margin_count.layout, self.margin_count.visited.sum().view(1))
        if int(visited[0]) == 0:
            return
        table = self._table()  # gathered on every rank (a collective when sharded); rank 0 writes
        if trainer.is_global_zero:
            directory = Path(self.output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self._write_csv(directory / "aum_values.csv", *table)
            if self.use_threshold_samples:
                self._write_flags(directory / "aum_flags.csv", *table)

    # -- results -------------------------------------------------------------------------------
    def _require_values(self) -> tuple[SampleBuffer, SampleBuffer]:
        if self.margin_sum is None or self.margin_count is None:
            raise RuntimeError("AUMCallback has no margins yet: fit a model with it first")
        return self.margin_sum, self.margin_count

    def _local_aum(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(index [R], aum [R] float64, seen [R] bool)`` of the rows this rank holds."""
        total, count = self._require_values()
        return total.index, total.values / count.values.to(torch.float64), count.values > 0

    def local_aum(self) -> tuple[Tensor, Tensor]:
        """``(index [R], aum [R])``: the rows this rank holds (all ``N`` unless the state is sharded)."""
        index, aum, _ = self._local_aum()
        return index, aum

    @property
    def aum(self) -> Tensor:
        """``[N]`` float64 AUM of every sample (NaN for a sample with no recorded margin).

        With sharded state this gathers the ``N`` values onto every rank: a collective, read it on every rank.
        """
        total, _ = self._require_values()
        return gather_scalars(self.local_aum()[1], total.layout.is_sharded, self.collective_device)

    @property
    def threshold(self) -> float:
        """The AUM below which a sample is flagged: a percentile of the threshold samples' AUMs (a collective when
        sharded), or 0 without threshold samples."""
        total, _ = self._require_values()
        assert self.threshold_mask is not None
        if not self.use_threshold_samples:
            return 0.0
        rows, aum, seen = self._local_aum()
        threshold_aum = gather_scalars(aum[self.threshold_mask[rows] & seen], total.layout.is_sharded, self.collective_device)
        return aum_threshold(threshold_aum, self.percentile)

    @property
    def flagged(self) -> Tensor:
        """``[N]`` bool: ordinary samples whose AUM is below :attr:`threshold` (threshold samples never are).

        A collective when sharded, like :attr:`aum`.
        """
        total, _ = self._require_values()
        assert self.threshold_mask is not None
        threshold = self.threshold
        rows, aum, seen = self._local_aum()
        flagged = (aum < threshold) & ~self.threshold_mask[rows] & seen
        return gather_scalars(flagged, total.layout.is_sharded, self.collective_device)

    def _table(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(aum [N], seen [N], flagged [N])`` of every sample, gathered when sharded (a collective)."""
        total, count = self._require_values()
        rows, aum, seen = self._local_aum()
        sharded, device = total.layout.is_sharded, self.collective_device
        assert self.threshold_mask is not None
        flagged = (aum < self.threshold) & ~self.threshold_mask[rows] & seen
        return tuple(gather_scalars(t, sharded, device) for t in (aum, seen, flagged))  # type: ignore[return-value]

    def save_csv(self, path: str | Path) -> None:
        """Write ``sample_id,aum`` for every sample seen, largest AUM first, as the ``aum`` package does.

        Gathers the AUMs when sharded: call it on every rank (each writes ``path``), or let ``output_dir`` do it.
        """
        self._write_csv(path, *self._table())

    def save_flags(self, path: str | Path) -> None:
        """Write ``sample_id,aum,threshold_sample,flagged`` for every sample seen (input of the two-run rule).

        Gathers the AUMs when sharded, like :meth:`save_csv`.
        """
        self._write_flags(path, *self._table())

    @staticmethod
    def _write_csv(path: str | Path, aum: Tensor, seen: Tensor, flagged: Tensor) -> None:
        ids = torch.nonzero(seen).squeeze(1)
        values = aum[ids]
        order = torch.sort(values, descending=True, stable=True).indices
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(AUM_CSV_COLUMNS)
            writer.writerows((int(ids[i]), repr(float(values[i]))) for i in order)

    def _write_flags(self, path: str | Path, aum: Tensor, seen: Tensor, flagged: Tensor) -> None:
        assert self.threshold_mask is not None
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(FLAG_CSV_COLUMNS)
            for i in torch.nonzero(seen).squeeze(1).tolist():
                writer.writerow((i, repr(float(aum[i])), int(self.threshold_mask[i]), int(flagged[i])))

    # -- checkpointing -------------------------------------------------------------------------
    @override
    def sample_buffers(self) -> dict[str, SampleBuffer]:
        if self.margin_sum is None or self.margin_count is None:
            return {}
        return {"margin_sum": self.margin_sum, "margin_count": self.margin_count}

    @override
    def in_flight_state(self) -> dict[str, Tensor]:
        """This rank's margin sums and counts of the epoch in progress ``[N]`` (empty at an epoch boundary)."""
        if self._epoch_count is None or not bool(self._epoch_count.any()):
            return {}
        return {"epoch_sum": self._epoch_sum.cpu().clone(), "epoch_count": self._epoch_count.cpu().clone()}

    @override
    def load_in_flight_state(self, states: list[dict[str, Tensor]]) -> None:
        assert self._epoch_sum is not None and self._epoch_count is not None
        for state in states:  # in rank order; with the world size unchanged, this rank's own sums
            if "epoch_sum" in state:
                self._epoch_sum += state["epoch_sum"].to(self._epoch_sum)
                self._epoch_count += state["epoch_count"].to(self._epoch_count)
