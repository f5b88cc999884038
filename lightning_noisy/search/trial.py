"""One trial of ``lightning-noisy search``: fit the sampled combination and score it on noisy validation labels."""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_noisy.callbacks.noisy_validation import NoisyValidationScore
from lightning_noisy.experiment import EpochHistory, quiet_cli
from lightning_noisy.search.space import SearchSpace, Selection, merge_config


class TrialDiverged(RuntimeError):
    """The trial's training or score became non-finite."""


class PruneOnScore(Callback):
    """Reports the noisy-validation score of each epoch to an Optuna trial and stops it when the pruner says so.

    Runs after :class:`NoisyValidationScore` (add it later to the trainer's callbacks).
    """

    def __init__(self, trial: Any, score: NoisyValidationScore, deadline: float | None = None) -> None:
        self.trial, self.score, self.deadline = trial, score, deadline

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import optuna

        if trainer.sanity_checking or not self.score.history:
            return
        value = self.score.history[-1]
        if not math.isfinite(value):
            raise TrialDiverged(f"the noisy-validation score is {value} at epoch {trainer.current_epoch}")
        self.trial.report(value, step=trainer.current_epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {trainer.current_epoch} with score {value:.4f}")
        if self.deadline is not None and time.time() > self.deadline and trainer.current_epoch + 1 < trainer.max_epochs:
            raise optuna.TrialPruned(f"stopped at epoch {trainer.current_epoch}: the search's time budget is spent")


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares.

    Attributes:
        base: the base config (parsed YAML).
        out_dir: the study's output folder (trial configs go to ``trials/``).
        val_fraction: the share of the noisy training data held out for scoring.
        score_epochs: the score is the mean noisy-validation accuracy of this many last epochs.
        deadline: a ``time.time()`` after which running trials stop at their next epoch, as pruned
            (``None``: they run to the end).
    """

    base: Mapping[str, Any]
    out_dir: str
    val_fraction: float
    score_epochs: int
    deadline: float | None = None


def trial_config(settings: TrialSettings, space: SearchSpace, selection: Selection) -> dict[str, Any]:
    """The config a trial fits: the base with the selection's patches and the noisy validation split."""
    config = space.apply(settings.base, selection)
    return merge_config(config, {"data": {"init_args": {"noisy_val_fraction": settings.val_fraction}}})


def final_config(base: Mapping[str, Any], space: SearchSpace, selection: Selection) -> dict[str, Any]:
    """The config of a combination trained on the whole noisy training set (``best.yaml``): no split held out."""
    config = space.apply(base, selection)
    init_args = config.get("data", {}).get("init_args", {})
    init_args.pop("noisy_val_fraction", None)
    return config


def run_trial(trial: Any, space: SearchSpace, settings: TrialSettings) -> float:
    """Fit the combination ``trial`` samples; return its score (mean noisy-validation accuracy of the last epochs).

    The trial's user attributes record the combination, the clean test accuracy (best and last, for
    measurement: never the objective) and the last epoch's predictions on the noisy validation split. A
    trial that fails records ``fail_reason`` and raises; a pruned one raises ``optuna.TrialPruned``.
    """
    selection = space.sample(trial)
    trial.set_user_attr("combination", selection.label)
    trial.set_user_attr("choices", selection.choices)
    path = Path(settings.out_dir) / "trials" / f"trial_{trial.number:04d}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(trial_config(settings, space, selection), sort_keys=False))
    try:
        return _fit(trial, str(path), settings)
    except Exception as err:  # noqa: BLE001 - recorded with the trial, then Optuna marks it failed
        import optuna

        if not isinstance(err, optuna.TrialPruned):
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:500])
        raise


def _fit(trial: Any, config: str, settings: TrialSettings) -> float:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    try:
        cli = quiet_cli(config, seed=None)
    except SystemExit as err:  # the CLI's answer to a config it cannot build
        raise RuntimeError(f"the CLI rejected the trial's config {config} (exit status {err.code})") from None
    score, history = NoisyValidationScore(), EpochHistory()
    cli.trainer.callbacks.extend([score, PruneOnScore(trial, score, settings.deadline), history])
    cli.trainer.fit(cli.model, cli.datamodule)
    rows = history.rows
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    if losses and not math.isfinite(losses[-1]):
        raise TrialDiverged(f"the training loss is {losses[-1]} at the last epoch")
    value = statistics.fmean(score.history[-settings.score_epochs:])
    if not math.isfinite(value):
        raise TrialDiverged(f"the noisy-validation score is {value}")
    trial.set_user_attr("test_acc_last", rows[-1].get("test/acc", math.nan))
    trial.set_user_attr("test_acc_best", float(cli.model.best_acc) if hasattr(cli.model, "best_acc") else math.nan)
    trial.set_user_attr("noisy_val_acc_last", score.history[-1])
    trial.set_user_attr("val_predictions", score.predictions.tolist() if score.predictions is not None else [])
    trial.set_user_attr("epoch_s", statistics.median(r["epoch_s"] for r in rows))
    if "noisy_val_labels" not in trial.study.user_attrs:  # the same split in every trial: for the majority filter
        trial.study.set_user_attr("noisy_val_labels", cli.datamodule.noisy_val_labels[0].tolist())
    return value
