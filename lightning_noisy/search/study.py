"""Run the trials of a ``lightning-noisy search`` study: Optuna's TPE and median pruner, one process per job."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_noisy.search.space import SearchSpace
from lightning_noisy.search.trial import TrialSettings, run_trial


@dataclass(frozen=True)
class StudyOptions:
    """How a study runs.

    Attributes:
        name: the study's name in the storage.
        storage: an Optuna storage URL (a SQLite file resumes an interrupted search; a database server
            lets several machines share a study).
        trials: the study stops once it holds this many started trials (any state); each worker runs its share
            of those still to run, so the workers never start more between them.
        jobs: worker processes, one torch thread each.
        timeout: seconds after which no new trial starts and a running one stops at its next epoch, as
            pruned (``None``: no limit).
        seed: the samplers' seed (worker ``j`` uses ``seed + j``).
        prune_after: epochs before the median pruner may stop a trial.
        startup_trials: finished trials before the pruner and TPE use what they learned.
    """

    name: str
    storage: str
    trials: int
    jobs: int = 1
    timeout: float | None = None
    seed: int = 0
    prune_after: int = 30
    startup_trials: int = 5


def check_options(options: StudyOptions) -> None:
    """Raise ``ValueError`` naming the first option out of range and its value."""
    for name in ("trials", "jobs", "startup_trials"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(options.prune_after, bool) or not isinstance(options.prune_after, int) or options.prune_after < 0:
        raise ValueError(f"prune_after must be an int >= 0, got {options.prune_after!r}")
    if options.timeout is not None and not (options.timeout > 0 and math.isfinite(options.timeout)):
        raise ValueError(f"timeout must be a number of seconds > 0, got {options.timeout!r}")


def open_study(options: StudyOptions, space: SearchSpace, settings: TrialSettings, worker: int = 0) -> Any:
    """Create the study, or load it when the storage holds it; a new one first runs the space's enqueued trials."""
    import optuna

    sampler = optuna.samplers.TPESampler(
        seed=options.seed + worker, n_startup_trials=options.startup_trials, constant_liar=True
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials, n_warmup_steps=options.prune_after)
    study = optuna.create_study(
        study_name=options.name, storage=options.storage, direction="maximize", sampler=sampler, pruner=pruner,
        load_if_exists=True,
    )
    if worker == 0 and "val_fraction" not in study.user_attrs:  # a new study
        study.set_user_attr("val_fraction", settings.val_fraction)
        study.set_user_attr("score_epochs", settings.score_epochs)
        for selection in space.enqueue:
            study.enqueue_trial(space.optuna_params(selection), skip_if_exists=True)
    elif study.user_attrs.get("val_fraction") != settings.val_fraction:
        raise ValueError(
            f"study {options.name!r} in {options.storage} was scored with val_fraction "
            f"{study.user_attrs.get('val_fraction')}, not {settings.val_fraction}: its scores would not compare"
        )
    return study


def _progress(start: float) -> Any:
    def report(study: Any, trial: Any) -> None:
        state = trial.state.name.lower()
        value = "" if trial.value is None else f" score {trial.value:.4f}"
        reason = trial.user_attrs.get("fail_reason", "")
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:  # no finished trial yet
            best = "no best yet"
        extra = f" ({reason})" if state == "fail" and reason else ""
        if state == "complete" and "test_acc_last" in trial.user_attrs:
            extra = f", clean test {trial.user_attrs['test_acc_last']:.4f} (not used)"
        print(f"[{time.perf_counter() - start:.0f} s] trial {trial.number} {state}{value}{extra}: "
              f"{trial.user_attrs.get('combination', '?')} | {best}", flush=True)

    return report


def _optimize(options: StudyOptions, space: SearchSpace, settings: TrialSettings, worker: int, deadline: float | None,
              trials: int) -> None:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(options, space, settings, worker)
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    if timeout == 0.0:
        return
    study.optimize(
        lambda trial: run_trial(trial, space, settings),
        n_trials=trials,
        timeout=timeout,
        callbacks=[_progress(time.perf_counter())],
        catch=(Exception,),
        gc_after_trial=True,
    )


def _worker(args: tuple[StudyOptions, SearchSpace, TrialSettings, int, float | None, int]) -> None:
    _optimize(*args)


def run_study(options: StudyOptions, space: SearchSpace, settings: TrialSettings) -> Any:
    """Run the study to ``options.trials`` trials (or its timeout) in ``options.jobs`` processes; return it."""
    check_options(options)
    Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
    import optuna

    study = open_study(options, space, settings)  # creates it (and enqueues) before the workers load it
    started = sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials)  # enqueued ones are still to run
    if started >= options.trials:
        print(f"study {options.name!r} already holds {started} trials: nothing to run", flush=True)
        return study
    deadline = None if options.timeout is None else time.time() + options.timeout
    settings = dataclasses.replace(settings, deadline=deadline)  # a running trial stops there too
    remaining = options.trials - started
    jobs = min(options.jobs, remaining)
    shares = [remaining // jobs + (j < remaining % jobs) for j in range(jobs)]  # no worker starts one too many
    if jobs == 1:
        _optimize(options, space, settings, 0, deadline, shares[0])
    else:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker, args=((options, space, settings, j, deadline, shares[j]),))
                   for j in range(jobs)]
        for process in workers:
            process.start()
        for process in workers:
            process.join()
        failed = [j for j, p in enumerate(workers) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"search workers {failed} exited with status {[workers[j].exitcode for j in failed]}")
    return open_study(options, space, settings)
