"""What a ``lightning-noisy search`` leaves behind: the table of trials, the selection criteria compared, Optuna's
plots and the winner as a ready config, ``best.yaml``."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lightning_noisy.search.space import SearchSpace, Selection
from lightning_noisy.search.trial import final_config

CRITERIA = ("noisy_val", "majority_filter")


@dataclass(frozen=True)
class TrialRow:
    """One finished trial: its combination and hyperparameters, its scores, and its clean test accuracy."""

    number: int
    combination: str
    params: dict[str, Any]
    noisy_val: float
    majority_filter: float
    test_last: float
    test_best: float
    seconds: float


def majority_filter_scores(predictions: np.ndarray, noisy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [T], clean [M])``: each trial's accuracy on the validation samples a majority vote calls clean.

    ``predictions [T, M]`` are the finished trials' predicted classes on the noisy validation split,
    ``noisy [M]`` its labels. A sample is called clean when the most frequent prediction over the trials
    (ties: the smallest class) equals its label: the majority filter of Brodley & Friedl ("Identifying
    Mislabeled Training Data", JAIR 1999) with the trials as its ensemble. No clean label is used.
    """
    if predictions.ndim != 2 or predictions.shape[1] != noisy.shape[0]:
        raise ValueError(f"predictions must be [T, {noisy.shape[0]}], got {predictions.shape}")
    num_classes = int(max(predictions.max(initial=0), noisy.max(initial=0))) + 1
    votes = np.stack([(predictions == c).sum(0) for c in range(num_classes)])  # [C, M]
    clean = votes.argmax(0) == noisy
    if not clean.any():
        return np.full(predictions.shape[0], math.nan), clean
    return (predictions[:, clean] == noisy[clean]).mean(1), clean


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (nan with fewer than 3 pairs or no spread)."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"spearman needs equally long sequences, got {len(a)} and {len(b)}")
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def finished_rows(study: Any, noisy_val_labels: Sequence[int]) -> list[TrialRow]:
    """The study's complete trials as rows, with the majority-filter criterion computed over all of them."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    with_predictions = [t for t in complete if len(t.user_attrs.get("val_predictions", [])) == len(noisy_val_labels)]
    filtered: dict[int, float] = {}
    if with_predictions and len(noisy_val_labels):
        predictions = np.array([t.user_attrs["val_predictions"] for t in with_predictions])
        scores, _ = majority_filter_scores(predictions, np.asarray(noisy_val_labels))
        filtered = {t.number: float(s) for t, s in zip(with_predictions, scores)}
    return [
        TrialRow(
            number=t.number,
            combination=t.user_attrs.get("combination", "?"),
            params={k: v for k, v in t.params.items() if "." in k},
            noisy_val=float(t.value),
            majority_filter=filtered.get(t.number, math.nan),
            test_last=float(t.user_attrs.get("test_acc_last", math.nan)),
            test_best=float(t.user_attrs.get("test_acc_best", math.nan)),
            seconds=(t.datetime_complete - t.datetime_start).total_seconds(),
        )
        for t in complete
    ]


def best_row(rows: Sequence[TrialRow], criterion: str) -> TrialRow:
    """The row with the highest ``criterion`` (``noisy_val`` or ``majority_filter``); ties: the earlier trial."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    ranked = [r for r in rows if math.isfinite(getattr(r, criterion))]
    if not ranked:
        raise ValueError(f"no finished trial has a finite {criterion} score")
    return max(ranked, key=lambda r: (getattr(r, criterion), -r.number))


def _format_params(params: Mapping[str, Any]) -> str:
    """``gce.q=0.7, mixup.alpha=0.3``: each hyperparameter by its choice and name (the dimension left out)."""
    names = {k: k.split(".", 1)[-1] for k in params}
    return ", ".join(f"{names[k]}={v:.3g}" if isinstance(v, float) else f"{names[k]}={v}" for k, v in params.items()) or "-"


def markdown(rows: Sequence[TrialRow], study: Any, criterion: str, top: int = 10) -> str:
    """The report: the best trials by ``criterion``, the state counts and the criteria's Spearman correlations."""
    import optuna

    ranked = sorted(rows, key=lambda r: (-getattr(r, criterion) if math.isfinite(getattr(r, criterion)) else math.inf,
                                         r.number))
    lines = [
        f"# Search `{study.study_name}`",
        "",
        f"Trials: {len(study.trials)} ({', '.join(f'{n} {s.name.lower()}' for s, n in _counts(study).items())}). "
        f"Selected by `{criterion}`; the clean test accuracy is shown for measurement only and was not used.",
        "",
        "| trial | combination | hyperparameters | noisy-val score | majority-filter score | clean test last "
        "(not used) | clean test best (not used) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ranked[:top]:
        lines.append(f"| {r.number} | {r.combination} | {_format_params(r.params)} | {r.noisy_val:.4f} | "
                     f"{r.majority_filter:.4f} | {r.test_last:.4f} | {r.test_best:.4f} | {r.seconds:.0f} |")
    lines += ["", "Spearman correlation with the clean test accuracy (last epoch) over the finished trials:", ""]
    for name in CRITERIA:
        pairs = [(getattr(r, name), r.test_last) for r in rows if math.isfinite(getattr(r, name)) and math.isfinite(r.test_last)]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        lines.append(f"- `{name}`: {rho:.3f} over {len(pairs)} trials")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- {t.number} ({t.user_attrs.get('combination', '?')}): {t.user_attrs.get('fail_reason', 'unknown')}"
                  for t in failed]
    return "\n".join(lines) + "\n"


def _counts(study: Any) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for trial in study.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return counts


def write_best(path: Path, base: Mapping[str, Any], space: SearchSpace, study: Any, row: TrialRow, criterion: str) -> None:
    """Write the winner as a config that ``lightning-noisy fit --config best.yaml`` runs on the whole training set."""
    trial = study.trials[row.number]
    selection = Selection(dict(trial.user_attrs["choices"]), {k: v for k, v in trial.params.items() if "." in k})
    header = (f"# The winner of search {study.study_name!r}: trial {row.number}, {row.combination}\n"
              f"# hyperparameters: {_format_params(row.params)}\n"
              f"# selected by {criterion} (noisy-val {row.noisy_val:.4f}, majority filter {row.majority_filter:.4f}); "
              "no clean label was used.\n"
              "#   lightning-noisy fit --config best.yaml\n")
    path.write_text(header + yaml.safe_dump(final_config(base, space, selection), sort_keys=False))


def write_plots(out_dir: Path, study: Any, rows: Sequence[TrialRow]) -> list[str]:
    """Optimisation history, parameter importances and noisy-val against clean test, as PNGs; the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    plots = {"optimization_history.png": optuna_plots.plot_optimization_history,
             "param_importances.png": optuna_plots.plot_param_importances}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # experimental-feature and few-trials-per-regime notes
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two finished trials with parameters
            print(f"{name} not written: {err}", flush=True)
            continue
        axes.figure.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(axes.figure)
        written.append(name)
    measured = [r for r in rows if math.isfinite(r.test_last)]
    if measured:
        figure, axes = plt.subplots(figsize=(5, 4))
        axes.scatter([r.noisy_val for r in measured], [r.test_last for r in measured], s=14)
        axes.set_xlabel("noisy-validation score (the objective)")
        axes.set_ylabel("clean test accuracy, last epoch (not used)")
        rho = spearman([r.noisy_val for r in measured], [r.test_last for r in measured])
        axes.set_title(f"{study.study_name}: Spearman {rho:.2f}")
        figure.savefig(out_dir / "noisy_val_vs_clean_test.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append("noisy_val_vs_clean_test.png")
    return written


def write_report(out_dir: str | Path, base: Mapping[str, Any], space: SearchSpace, study: Any,
                 criterion: str = "noisy_val") -> TrialRow | None:
    """Write ``report.md``, ``trials.json``, the plots and ``best.yaml`` under ``out_dir``; return the winner."""
    out = Path(out_dir)
    rows = finished_rows(study, study.user_attrs.get("noisy_val_labels", []))
    (out / "trials.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    (out / "report.md").write_text(markdown(rows, study, criterion))
    write_plots(out, study, rows)
    if not rows:
        print("no trial finished: no best.yaml", flush=True)
        return None
    winner = best_row(rows, criterion)
    write_best(out / "best.yaml", base, space, study, winner, criterion)
    return winner
