"""``lightning-noisy search``: choose a combination of methods and its hyperparameters from noisy data alone."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_noisy.search.report import CRITERIA, write_report
from lightning_noisy.search.space import SearchSpace, SearchSpaceError
from lightning_noisy.search.study import StudyOptions, check_options, run_study
from lightning_noisy.search.trial import TrialSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-noisy search",
        description="Search combinations of noisy-label methods with Optuna, scored on a held-out split of the "
        "noisy training data (no clean label is used), and write the winner as best.yaml.",
    )
    parser.add_argument("--config", required=True, help="the base config (a lightning-noisy fit YAML)")
    parser.add_argument("--space", required=True, help="the search space YAML (e.g. configs/search/mnist1d_space.yaml)")
    parser.add_argument("--trials", type=int, default=30, help="trials in the study, those already run included")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each")
    parser.add_argument("--study", default="search", help="the study's name in the storage")
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (default: sqlite:///OUT/study.db)")
    parser.add_argument("--out", default="search_out", help="folder for trial configs, report, plots and best.yaml")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the noisy training data held out for scoring (default 0.1)")
    parser.add_argument("--score-epochs", type=int, default=5,
                        help="the score is the mean noisy-validation accuracy of this many last epochs")
    parser.add_argument("--prune-after", type=int, default=30, help="epochs before a trial may be pruned")
    parser.add_argument("--startup-trials", type=int, default=5,
                        help="finished trials before the pruner and TPE act on what they learned")
    parser.add_argument("--select", choices=CRITERIA, default="noisy_val", help="the criterion that picks best.yaml")
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    return parser


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[dict[str, Any], SearchSpace]:
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.score_epochs < 1:
        parser.error(f"--score-epochs must be >= 1, got {args.score_epochs}")
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    config = Path(args.config)
    if not config.is_file():
        parser.error(f"--config: no such file {args.config!r}")
    base = yaml.safe_load(config.read_text())
    if not isinstance(base, dict) or "model" not in base or "data" not in base:
        parser.error(f"--config {args.config!r} must be a fit config with 'model' and 'data' sections")
    try:
        space = SearchSpace.from_file(args.space)
    except SearchSpaceError as err:
        parser.error(f"--space: {err}")
    return base, space


def main(argv: Sequence[str] | None = None) -> None:
    """Run a search and write its report under ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base, space = _check_args(args, parser)
    out = Path(args.out)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    options = StudyOptions(name=args.study, storage=storage, trials=args.trials, jobs=args.jobs, timeout=args.timeout,
                           seed=args.seed, prune_after=args.prune_after, startup_trials=args.startup_trials)
    settings = TrialSettings(base=base, out_dir=str(out.resolve()), val_fraction=args.val_fraction,
                             score_epochs=args.score_epochs)
    try:
        check_options(options)
    except ValueError as err:
        parser.error(f"--{str(err).replace('_', '-')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"search {args.study!r}: {len(space.combinations())} valid combinations, up to {args.trials} trials in "
          f"{args.jobs} job(s); storage {storage}", flush=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    study = run_study(options, space, settings)
    winner = write_report(out, base, space, study, args.select)
    print(f"search done in {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}", flush=True)
    if winner is not None:
        print(f"best ({args.select}): trial {winner.number}, {winner.combination}, score "
              f"{getattr(winner, args.select):.4f}; config: {out / 'best.yaml'}", flush=True)
