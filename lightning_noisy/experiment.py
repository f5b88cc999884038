"""Run a config through the ``lightning-noisy`` CLI and collect its figures (used by the demo and benchmarks).

Each run can happen in a worker process with one torch thread, so two jobs use both cores of a 2-core
machine without oversubscribing them.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

TRACKED = (
    "test/acc", "train/loss", "noisy/recovery_acc", "noisy/train_pred_acc", "noisy/changed_frac", "noisy/transition_mae",
    "noisy/codivide_auroc",
)


class EpochHistory(Callback):
    """Keeps the tracked metrics of every epoch and the wall time of each training epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k in TRACKED}
        row["epoch_s"] = time.perf_counter() - self._start
        self.rows.append(row)


@dataclass
class RunResult:
    """Figures of one run: best and last test accuracy, recovery, time per epoch, per-epoch history."""

    config: str
    overrides: tuple[str, ...]
    seed: int
    best_acc: float
    last_acc: float
    recovery_acc: float
    train_pred_acc_best: float
    epoch_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def run_config(config: str, overrides: Sequence[str] = (), seed: int = 0, threads: int = 1) -> RunResult:
    """Fit ``config`` with CLI ``overrides``; ``seed`` seeds both the run and the label noise.

    No checkpoints, logs or progress bars are written; the figures come back in the result.
    """
    import torch

    from lightning_noisy.cli import build_cli

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners in tables
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")  # the caller's own argv
    history = EpochHistory()
    args = [
        "--config", config, *overrides,
        f"--seed_everything={seed}", f"--data.init_args.noise_seed={seed}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    cli = build_cli(args=args, run=False, save_config_callback=None)  # nothing written to the working dir
    cli.trainer.callbacks.append(history)
    cli.trainer.fit(cli.model, cli.datamodule)
    rows = history.rows
    train_pred = [r["noisy/train_pred_acc"] for r in rows if "noisy/train_pred_acc" in r]
    return RunResult(
        config=config,
        overrides=tuple(overrides),
        seed=seed,
        best_acc=float(cli.model.best_acc),
        last_acc=rows[-1]["test/acc"],
        recovery_acc=rows[-1].get("noisy/recovery_acc", math.nan),
        train_pred_acc_best=max(train_pred, default=math.nan),
        epoch_s=statistics.median(r["epoch_s"] for r in rows),
        history=rows,
    )


def _run_job(job: tuple[str, tuple[str, ...], int]) -> RunResult:
    return run_config(*job)


def run_many(jobs: Iterable[tuple[str, Sequence[str], int]], processes: int = 2) -> list[RunResult]:
    """Run ``(config, overrides, seed)`` jobs in ``processes`` workers (one thread each), in order."""
    jobs = [(c, tuple(o), s) for c, o, s in jobs]
    if processes <= 1:
        return [_run_job(job) for job in jobs]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_run_job, jobs))

