"""Base class of the callbacks that keep per-sample state under the batch contract."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from typing_extensions import override

from lightning_noisy.callbacks.guard import EpochVerdict, PredictionHealth
from lightning_noisy.state import BatchContract, SampleBuffer, SampleHistory, StepContext
from lightning_noisy.state.checkpoint import LocalRecords, LocalRows, read_local_records, read_local_rows
from lightning_noisy.state.gather import is_distributed
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.records import SampleRecorder
from lightning_noisy.state.sharded import state_on_rank_zero
from lightning_noisy.state.storage import StateOptions


@dataclass(frozen=True)
class TrainingLabels:
    """The labels of the training set as the data provides them.

    Attributes:
        noisy: ``[N]`` int64 labels the model is given.
        clean: ``[N]`` int64 true labels, or ``None`` when unknown.
        num_classes: ``C``.
    """

    noisy: Tensor
    clean: Tensor | None
    num_classes: int

    @property
    def num_samples(self) -> int:
        return int(self.noisy.shape[0])


def find_training_labels(trainer: pl.Trainer) -> TrainingLabels:
    """Read ``noisy_labels``, ``clean_labels`` and ``num_classes`` from the DataModule or the training dataset.

    Our DataModules and :class:`~lightning_noisy.data.NoisyLabelDataset` provide them; any object with
    those attributes works.
    """
    loader = trainer.train_dataloader
    sources = [trainer.datamodule, getattr(loader, "dataset", None)]
    for source in sources:
        noisy = getattr(source, "noisy_labels", None)
        if isinstance(noisy, Tensor):
            clean = getattr(source, "clean_labels", None)
            num_classes = getattr(source, "num_classes", None)
            least, most = (int(v) for v in torch.aminmax(noisy)) if noisy.numel() else (0, -1)
            if num_classes is None:
                num_classes = most + 1
            if not (0 <= least and most < int(num_classes)):
                raise ValueError(
                    f"the training labels must be in [0, num_classes={int(num_classes)}), got labels from "
                    f"{least} to {most} on {type(source).__name__}"
                )
            return TrainingLabels(noisy.to(torch.long).cpu(), None if clean is None else clean.to(torch.long).cpu(),
                                  int(num_classes))
    raise ValueError(
        "lightning-noisy needs the training labels: use a DataModule or a training dataset that exposes "
        "`noisy_labels` ([N] tensor), `clean_labels` (or None) and `num_classes`, such as "
        "lightning_noisy.data.NoisyLabelDataset; found neither on the DataModule "
        f"({type(trainer.datamodule).__name__}) nor on the training dataset ({type(sources[1]).__name__})"
    )


def training_dataset(trainer: pl.Trainer, user: str) -> Dataset:
    """The training loader's dataset; ``user`` names the caller in the error when there is none."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if dataset is None:
        raise ValueError(
            f"{user} needs the training dataset: fit with a DataLoader over a map-style dataset of "
            "[input, target, index] samples, or a DataModule with train_eval_dataloader()"
        )
    return dataset


def train_eval_loader(trainer: pl.Trainer, user: str, batch_size: int | None = None) -> DataLoader:
    """The whole training set in order, for an eval-mode pass over it.

    The DataModule's ``train_eval_dataloader()`` when it has one (the training samples without the
    training transform); otherwise an unshuffled loader over the training dataset with ``batch_size``,
    else the training loader's batch size, else 128, and the training loader's ``collate_fn``.
    """
    make = getattr(trainer.datamodule, "train_eval_dataloader", None)
    if callable(make):
        return make()
    loader = trainer.train_dataloader
    size = batch_size or getattr(loader, "batch_size", None) or 128
    return DataLoader(training_dataset(trainer, user), batch_size=size, shuffle=False,
                      collate_fn=getattr(loader, "collate_fn", None))


def log_epoch(pl_module: pl.LightningModule, name: str, value: Tensor | float, batch_size: int = 1,
              **kwargs: Any) -> None:
    """Log a tensor or number for the epoch as Lightning documents it under DDP: ``sync_dist=True``.

    The epoch value is the ``batch_size``-weighted mean over every rank's calls: for a per-step value (a
    training loss) the mean over all ranks' samples, for a value every rank holds alike (logged once per epoch,
    ``batch_size=1``) that value unchanged, at the cost of a few scalar collectives per name at the epoch's
    end, and no warning. ``batch_size`` is explicit, so Lightning never infers it from the batch; under DDP a
    tensor moves to the module's device, where the strategy's all-reduce runs (NCCL reduces CUDA tensors only).
    Every rank must log the same names in the same order in an epoch. ``kwargs`` go to ``LightningModule.log``.
    """
    if isinstance(value, Tensor) and is_distributed():
        value = value.to(pl_module.device)
    pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True, **kwargs)


class _RankBatches(Sampler[list[int]]):
    """The batches ``i`` of ``batches`` with ``i % world_size == rank``, drawn in order."""

    def __init__(self, batches: Sampler[list[int]] | Iterable[list[int]], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.rank, None, self.world_size)

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.batches) - self.rank) / self.world_size))  # type: ignore[arg-type]


def rank_batches(loader: DataLoader, rank: int, world_size: int) -> Iterator[tuple[int, Any]]:
    """``(batch_idx, batch)`` for the batches of ``loader`` with ``batch_idx % world_size == rank``.

    For a map-style dataset only those batches are loaded: a loader with the same dataset, collate
    function and workers draws this rank's index lists from ``loader``'s batch sampler, so each rank
    reads ``1 / world_size`` of the data. Otherwise (an iterable dataset) every batch is loaded and
    the others are skipped. The batches are those of ``loader``, whatever ``world_size`` is.
    """
    if world_size == 1:
        yield from enumerate(loader)
        return
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        for batch_idx, batch in enumerate(loader):
            if batch_idx % world_size == rank:
                yield batch_idx, batch
        return
    share = DataLoader(
        loader.dataset,
        batch_sampler=_RankBatches(loader.batch_sampler, rank, world_size),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if loader.num_workers > 0 else None,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
    )
    for position, batch in enumerate(share):
        yield rank + position * world_size, batch


def is_last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the last training batch of the epoch (``limit_train_batches`` included)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor) -> None:
    """Add a histogram of ``values`` to every TensorBoard logger of the trainer (global rank zero only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values.detach().float().cpu(), global_step=trainer.current_epoch)


class SampleStateCallback(Callback):
    """Takes part in the batch contract and runs its epoch-boundary work exactly once per training epoch.

    Subclasses implement :meth:`allocate`, :meth:`on_batch` and :meth:`on_epoch_boundary`, and return
    their per-sample state from :meth:`sample_state_dict`. The epoch-boundary work runs after the last
    training batch of the epoch, so it is done before validation and before any checkpoint of that epoch
    is written, and resuming from an epoch-boundary checkpoint continues as the uninterrupted run would.

    Nothing non-finite is written: a recorder leaves out the samples whose records are NaN or infinite (they keep
    their previous values, and the callback warns with the count). An epoch whose every training prediction is
    non-finite, or (with :attr:`collapse_entropy`) one whose predictions have become near uniform after the
    network had learned something, is skipped: :meth:`on_skipped_epoch` runs instead of
    :meth:`on_epoch_boundary`, the epoch's records are dropped, and after :attr:`max_skipped_epochs` such epochs
    in a row the fit stops with an error that names the cause. The state kept is the last good one.

    A subclass that shards its state builds its buffers on :meth:`row_layout`: under DDP each rank then
    holds only its block of rows. A checkpoint gathers the blocks on rank 0 (each block sent once), or with
    :class:`~lightning_noisy.strategies.ShardedStateDDPStrategy` each rank writes its own block with
    ``torch.distributed.checkpoint``; any world size restores its own blocks from either.

    Args:
        key: distinguishes two instances of one callback class in a checkpoint.
        state_options: sharding and storage of the per-sample state (see :class:`StateOptions`).
    """

    require_logits: bool = True
    #: skip an epoch whose mean prediction entropy is at least this share of ``ln C`` once the network has had
    #: a less uniform epoch (a collapse, e.g. a diverged learning rate); ``None`` checks non-finite epochs only
    collapse_entropy: float | None = None
    #: skipped epochs in a row after which the fit stops with an error
    max_skipped_epochs: int = 5

    def __init__(self, key: str | None = None, state_options: StateOptions | None = None) -> None:
        self.key = key
        self.state_options = state_options if state_options is not None else StateOptions()
        self.collective_device = torch.device("cpu")
        self._state_key: tuple[str | None, str] | None = None
        self.contract: BatchContract | None = None
        self.context: StepContext | None = None
        self.training_labels: TrainingLabels | None = None
        self._finished_epoch = -1
        self._loaded_state: dict[str, Any] | None = None
        self._said_no_clean = False
        self._rows_to_strategy = False  # whether the strategy writes sharded rows itself (no gather)
        self._health = PredictionHealth()
        self._has_learned = False  # whether an epoch had predictions below collapse_entropy
        self.skipped_epochs = 0  # skipped epochs in a row

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler action names): build the string once per key
        if self._state_key is None or self._state_key[0] != self.key:
            self._state_key = (self.key, self._generate_state_key(key=self.key))
        return self._state_key[1]

    # -- hooks for subclasses ------------------------------------------------------------------
    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: TrainingLabels) -> None:
        """Create the per-sample buffers once the training labels are known."""

    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        """Called after the index was taken out of the batch (substitute targets here)."""

    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        """Called after ``training_step`` with the step's context (record values here)."""

    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called once per epoch on every rank, after the last training batch (gather and update here)."""

    def sample_buffers(self) -> dict[str, SampleBuffer | SampleHistory]:
        """The per-sample buffers to checkpoint, by name (empty before :meth:`allocate`)."""
        return {}

    def extra_state_dict(self) -> dict[str, Any]:
        """Small non-buffer state to checkpoint beside the buffers (counters, switches)."""
        return {}

    def sample_recorders(self) -> dict[str, SampleRecorder | None]:
        """This rank's recorders of the epoch in progress, by name (word characters only)."""
        return {}

    def in_flight_state(self) -> dict[str, Tensor]:
        """This rank's records of the epoch in progress, by name: what a checkpoint taken mid-epoch must keep.

        By default the pending records of :meth:`sample_recorders`; empty at an epoch boundary.
        """
        out: dict[str, Tensor] = {}
        for name, recorder in self.sample_recorders().items():
            if recorder is not None and len(recorder):
                index, parts = recorder.pending()
                out[f"{name}__index"] = index
                out.update({f"{name}__{part}": tensor for part, tensor in parts.items()})
        return out

    def load_in_flight_state(self, states: list[dict[str, Tensor]]) -> None:
        """Restore :meth:`in_flight_state` from the saved ranks this rank takes over, in rank order (with the
        world size unchanged, its own rank's alone). By default the records go back into their recorders."""
        for state in states:
            for name, recorder in self.sample_recorders().items():
                if recorder is not None and f"{name}__index" in state:
                    parts = {part: state[f"{name}__{part}"] for part in recorder.codec.empty(0)}
                    recorder.add_parts(state[f"{name}__index"], parts)

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state_dict`."""

    def on_skipped_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        """Called instead of :meth:`on_epoch_boundary` on an epoch unfit to write state (its records are already
        dropped): reset per-epoch accumulators here. Every rank calls it."""

    # -- shared helpers ----------------------------------------------------------------------
    @staticmethod
    def log_epoch_metrics(pl_module: pl.LightningModule, metrics: dict[str, Tensor]) -> None:
        """Log values that are already identical on every rank once for the epoch (:func:`log_epoch`: the
        all-reduce of ``sync_dist`` leaves them unchanged; every rank logs the same names)."""
        for name, value in metrics.items():
            log_epoch(pl_module, name, value)

    def row_layout(self, trainer: pl.Trainer, num_samples: int) -> RowLayout:
        """This rank's block of the ``num_samples`` rows: a ``1 / W`` block when the state is sharded, else all."""
        if self.state_options.sharded(trainer.world_size):
            return RowLayout(num_samples, trainer.world_size, trainer.global_rank)
        return RowLayout(num_samples)

    def sum_over_shards(self, trainer: pl.Trainer, layout: RowLayout, totals: Tensor) -> Tensor:
        """``totals`` of this rank's rows summed over every rank's rows (an all-reduce when ``layout`` is sharded)."""
        if not (layout.is_sharded and trainer.world_size > 1):
            return totals
        summed = totals.to(trainer.strategy.root_device)
        torch.distributed.all_reduce(summed)
        return summed.cpu()

    def sample_state_dict(self) -> dict[str, Any]:
        """The buffers' states, :meth:`extra_state_dict` and every rank's :meth:`in_flight_state`.

        A sharded buffer's state is the whole table on rank 0 (a collective), or, when the strategy writes
        sharded rows itself, this rank's block as :class:`~lightning_noisy.state.checkpoint.LocalRows`. The
        records of an epoch in progress go to rank 0 likewise (a collective), or stay with their rank as
        :class:`~lightning_noisy.state.checkpoint.LocalRecords`.
        """
        states: dict[str, Any] = {}
        for name, buffer in self.sample_buffers().items():
            if self._rows_to_strategy and buffer.layout.is_sharded:
                states[name] = LocalRows(buffer.state_dict())
            else:
                states[name] = state_on_rank_zero(buffer, self.collective_device)
        return {"buffers": states, "extra": self.extra_state_dict(), "in_flight": self._in_flight_state_dict()}

    def _in_flight_state_dict(self) -> Any:
        records = self.in_flight_state()
        if not is_distributed():
            return {"world_size": 1, "ranks": [records]}
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self._rows_to_strategy:
            return LocalRecords(rank, world, records)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object(records, gathered, dst=0)
        return {"world_size": world, "ranks": gathered if rank == 0 else [records]}

    def load_sample_state_dict(self, state: dict[str, Any], checkpoint_path: str | None = None) -> None:
        """Restore :meth:`sample_state_dict` after :meth:`allocate`: every buffer is checked before any changes.

        Rows that :class:`~lightning_noisy.strategies.ShardedStateDDPStrategy` wrote beside the checkpoint file
        ``checkpoint_path`` are read first: each rank reads the rows it owns (a collective).
        """
        if not state:
            return
        buffers = self.sample_buffers()
        saved = state["buffers"]
        if set(saved) == set(buffers):
            layouts = {name: buffer.layout for name, buffer in buffers.items()}
            saved = read_local_rows(saved, layouts, checkpoint_path)
        if set(saved) != set(buffers):
            raise ValueError(f"{type(self).__name__}: the checkpoint holds buffers {sorted(saved)}, expected {sorted(buffers)}")
        for name, buffer in buffers.items():
            buffer.check_state_dict(saved[name])
        records: list[dict[str, Tensor]] = []
        if "in_flight" in state:  # read before anything changes (a collective with DCP)
            rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
            records = read_local_records(state["in_flight"], rank, world, checkpoint_path)
        for name, buffer in buffers.items():
            buffer.load_state_dict(saved[name])
        self.load_extra_state_dict(state["extra"])
        self.load_in_flight_state(records)

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.contract = BatchContract.attach(pl_module, self, require_logits=self.require_logits)
            self._rows_to_strategy = bool(getattr(trainer.strategy, "writes_local_rows", False))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning skips teardown on an exception; leave the module as it was

    def _release(self) -> None:
        if self.contract is not None:
            self.contract.release(self)
            self.contract = None
            self.context = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training_labels = find_training_labels(trainer)
        self.collective_device = trainer.strategy.root_device
        self.allocate(trainer, pl_module, self.training_labels)
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self.load_sample_state_dict(state, trainer.ckpt_path)
        if self.training_labels.clean is None and not self._said_no_clean:
            self._said_no_clean = True
            rank_zero_info(
                f"{type(self).__name__}: the clean labels are unknown, so the noisy/ recovery metrics are not logged"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.contract is not None, "setup('fit') attaches the batch contract"
        self.context = self.contract.begin_batch(batch, batch_idx)
        self.on_batch_start(trainer, pl_module, self.context)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.context is not None and self.context.batch is batch:
            if self.context.logits is not None:
                self._health.add(self.context.logits, entropy=self.collapse_entropy is not None)
            self.on_batch(trainer, pl_module, self.context)
        if is_last_batch(trainer, batch_idx):
            self._finish_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_epoch(trainer, pl_module)

    def _finish_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._finished_epoch == trainer.current_epoch:
            return
        self._finished_epoch = trainer.current_epoch
        verdict = self._health.conclude(trainer.strategy.root_device, trainer.world_size > 1 and is_distributed())
        reason = self._unfit_reason(verdict)
        recorders = [recorder for recorder in self.sample_recorders().values() if recorder is not None]
        if reason is None:
            self.skipped_epochs = 0
            self.on_epoch_boundary(trainer, pl_module)
            dropped = sum(recorder.non_finite_rows for recorder in recorders)
            for recorder in recorders:
                recorder.non_finite_rows = 0
            if dropped:
                rank_zero_warn(
                    f"{type(self).__name__}: {dropped} sample(s) had non-finite values (NaN or inf) in epoch "
                    f"{trainer.current_epoch}; their rows keep their previous values"
                )
            return
        for recorder in recorders:
            recorder.clear()
        self.skipped_epochs += 1
        self.log_epoch_metrics(pl_module, {"noisy/skipped_epoch": torch.tensor(1.0)})
        rank_zero_warn(
            f"{type(self).__name__}: epoch {trainer.current_epoch} leaves the per-sample state as it was: {reason} "
            f"({self.skipped_epochs} such epoch(s) in a row)"
        )
        self.on_skipped_epoch(trainer, pl_module, reason)
        if self.skipped_epochs >= self.max_skipped_epochs:
            raise RuntimeError(
                f"{type(self).__name__}: stopping the fit after {self.skipped_epochs} epochs in a row in which {reason}. "
                "The per-sample state kept is that of the last good epoch. Lower the learning rate, check the inputs "
                "for NaN or inf, or clip the gradients."
            )

    def _unfit_reason(self, verdict: EpochVerdict) -> str | None:
        """Why an epoch with ``verdict`` must not write per-sample state, or ``None`` when it may."""
        if verdict.all_non_finite:
            return f"every one of the {verdict.rows} training predictions was non-finite (NaN or inf)"
        if self.collapse_entropy is None or verdict.rows == verdict.non_finite_rows:
            return None
        if not verdict.near_uniform(self.collapse_entropy):
            self._has_learned = True
            return None
        if not self._has_learned:
            return None  # a network that has not learned yet (its first epochs), not one that collapsed
        return (
            f"the network has collapsed: its predictions are near uniform (mean entropy {verdict.mean_entropy:.3f} "
            f"of ln C, collapse_entropy={self.collapse_entropy}), as after a diverged learning rate"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"finished_epoch": self._finished_epoch, "skipped_epochs": self.skipped_epochs,
                "has_learned": self._has_learned, **self.sample_state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._finished_epoch = int(state.pop("finished_epoch", -1))
        self.skipped_epochs = int(state.pop("skipped_epochs", 0))
        self._has_learned = bool(state.pop("has_learned", False))
        self._loaded_state = state
