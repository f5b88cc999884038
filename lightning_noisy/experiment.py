"""Run a config through the ``lightning-noisy`` CLI and collect its figures (used by the demo and benchmarks).

Each run can happen in a worker process with one torch thread, so two jobs use both cores of a 2-core
machine without oversubscribing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

TRACKED = (
    "test/acc", "test/acc_a", "test/acc_b", "test/acc_mean", "train/loss", "noisy/recovery_acc", "noisy/train_pred_acc",
    "noisy/changed_frac", "noisy/transition_mae", "noisy/codivide_auroc", "noisy/fixmatch_mask_rate",
    "noisy/pseudo_label_acc",
)


class EpochHistory(Callback):
    """Keeps the tracked metrics of every epoch and the wall time of each training epoch.

    An epoch's row is taken at the next epoch's start (or at the end of training): a module's own
    ``on_train_epoch_end`` runs after the callbacks' and what it logs reaches ``callback_metrics`` only then.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._epoch_s: float | None = None  # the wall time of the epoch whose row is still to take

    def _take_row(self, trainer: pl.Trainer) -> None:
        if self._epoch_s is not None:
            row = {k: float(v) for k, v in trainer.callback_metrics.items() if k in TRACKED}
            self.rows.append({**row, "epoch_s": self._epoch_s})
            self._epoch_s = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_row(trainer)
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_s = time.perf_counter() - self._start

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_row(trainer)


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


def quiet_cli(config: str, overrides: Sequence[str] = (), seed: int | None = 0) -> Any:
    """The ``lightning-noisy`` CLI of ``config`` with ``overrides``, built but not run: ``seed`` seeds the run and
    the label noise (``None``: the config's seeds), and nothing is written (no logger, checkpoints, progress bar,
    model summary or saved config)."""
    from lightning_noisy.cli import build_cli

    seeds = [] if seed is None else [f"--seed_everything={seed}", f"--data.init_args.noise_seed={seed}"]
    args = [
        "--config", config, *overrides, *seeds,
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    return build_cli(args=args, run=False, save_config_callback=None)


def run_config(config: str, overrides: Sequence[str] = (), seed: int = 0, threads: int = 1) -> RunResult:
    """Fit ``config`` with CLI ``overrides``; ``seed`` seeds both the run and the label noise.

    No checkpoints, logs or progress bars are written; the figures come back in the result.
    """
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners in tables
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")  # the caller's own argv
    history = EpochHistory()
    cli = quiet_cli(config, overrides, seed)
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
    try:
        return run_config(*job)
    except SystemExit as err:  # the CLI's answer to bad arguments: a failed run, not the end of the grid
        raise RuntimeError(f"the CLI rejected the arguments (exit status {err.code}; its message is above)") from None


def package_digest() -> str:
    """SHA-256 of the text of every ``lightning_noisy`` source file, as imported (path and content).

    Part of a cached run's key, so that a run made by other code (another commit, an edit) is not reused.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _job_key(job: tuple[str, tuple[str, ...], int], code: str) -> str:
    """A file name for ``(config, overrides, seed)``, the config file's current text and the code digest."""
    config, overrides, seed = job
    text = Path(config).read_bytes() if Path(config).is_file() else b""
    key = json.dumps([config, list(overrides), seed, code]).encode() + b"\0" + text
    return f"{Path(config).stem}-s{seed}-{hashlib.sha256(key).hexdigest()[:16]}.json"


def _load_cached(path: Path) -> RunResult | None:
    try:
        fields = json.loads(path.read_text())
        return RunResult(**{**fields, "overrides": tuple(fields["overrides"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, partly written or from another version: run the job again


def _store(path: Path, result: RunResult) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(dataclasses.asdict(result)))
    temporary.replace(path)  # atomic: an interrupted write never leaves a half file behind


def run_many(
    jobs: Iterable[tuple[str, Sequence[str], int]], processes: int = 2, cache_dir: str | Path | None = None,
    skip_failed: bool = False,
) -> list[RunResult | None]:
    """Run ``(config, overrides, seed)`` jobs in ``processes`` workers (one thread each); results in job order.

    With ``cache_dir``, each finished run is stored there as JSON under a key of its config (path and
    text), overrides, seed and :func:`package_digest`, and a job whose result is already stored is not
    run again, so an interrupted or extended grid only runs what is missing, and a change to the package's
    code starts afresh. Each finished run prints one line. A failed run does not stop
    the others; once they are done, a ``RuntimeError`` names the failed jobs, or with ``skip_failed`` they are
    printed and their results are ``None`` (a run that diverges is then a finding, not the end of a table).
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    jobs = [(c, tuple(o), s) for c, o, s in jobs]
    cache = None if cache_dir is None else Path(cache_dir)
    paths: list[Path | None] = [None] * len(jobs)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        code = package_digest()
        paths = [cache / _job_key(job, code) for job in jobs]
    results: list[RunResult | None] = [None if p is None else _load_cached(p) for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    start = time.perf_counter()
    failures: list[str] = []

    def finish(i: int, result: RunResult, done: int) -> None:
        results[i] = result
        if paths[i] is not None:
            _store(paths[i], result)
        config, overrides, seed = jobs[i]
        print(f"[{done}/{len(todo)} runs, {time.perf_counter() - start:.0f} s] {Path(config).stem} seed {seed} "
              f"{' '.join(overrides)}: best {result.best_acc:.3f}, last {result.last_acc:.3f}", flush=True)

    def attempt(i: int, outcome: Callable[[], RunResult], done: int) -> None:
        try:
            finish(i, outcome(), done)
        except Exception as err:  # noqa: BLE001 - reported with its job once the others are done
            failures.append(f"{jobs[i]}: {type(err).__name__}: {err}")

    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs taken from {cache}", flush=True)
    if processes == 1 or len(todo) <= 1:
        for done, i in enumerate(todo, 1):
            attempt(i, lambda i=i: _run_job(jobs[i]), done)
    else:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, jobs[i]): i for i in todo}
            for done, future in enumerate(as_completed(futures), 1):
                attempt(futures[future], future.result, done)
    if failures:
        message = f"{len(failures)} of {len(todo)} runs failed:\n" + "\n".join(failures)
        if not skip_failed:
            raise RuntimeError(message)
        print(message, flush=True)
    return results
