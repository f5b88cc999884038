"""Benchmark harness: a grid of configs x label-noise settings x seeds, summarised as a markdown table.

Each (config, noise setting) row gives the test accuracy, best and last epoch (mean ± std over the
seeds, in %), the recovery accuracy (``noisy/recovery_acc`` after the last epoch for a method that
corrects labels; for one that does not, the best ``noisy/train_pred_acc`` of the run, marked as such)
and the median seconds per training epoch. The seed seeds both the run and the label noise.
Run from the repository root (the config paths are relative to it):

    .venv/bin/python benchmarks/run.py                                   # the default grid below
    .venv/bin/python benchmarks/run.py --noise symmetric:0.4 asymmetric:0.3 --seeds 0 1 2 --jobs 2 \\
        --json runs.json
    .venv/bin/python benchmarks/run.py --configs configs/mnist1d_ce.yaml --seeds 0 \\
        --override=--trainer.max_epochs=5                                # a quick check

Noise settings are ``TYPE:RATE`` (``symmetric:0.4``, ``asymmetric:0.3``, ``pairflip:0.45``) or ``none``;
asymmetric noise uses the MNIST class map (``--data.init_args.class_map=mnist``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
from common import RunResult, markdown_table, mean_spread, run_many

# The default grid, in one place: a later method adds its config here.
DEFAULT_CONFIGS: tuple[str, ...] = (
    "configs/mnist1d_ce.yaml",
    "configs/mnist1d_joint_optimization.yaml",
    "configs/mnist1d_dividemix.yaml",
    "configs/mnist1d_self_learning.yaml",
    "configs/mnist1d_feature_mixup.yaml",
)
DEFAULT_NOISE: tuple[str, ...] = ("symmetric:0.4",)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)

# asymmetric noise needs a class map; the configs in the default grid are all MNIST-1D


def parse_noise_setting(setting: str) -> list[str]:
    """CLI overrides of a noise setting ``TYPE:RATE`` or ``none``, e.g. ``symmetric:0.4``."""
    noise_type, _, rate = setting.partition(":")
    if noise_type == "none":
        if rate:
            raise ValueError(f"noise setting 'none' takes no rate, got {setting!r}")
        return ["--data.init_args.noise_type=none"]
    if not noise_type or not rate:
        raise ValueError(f"a noise setting is TYPE:RATE (e.g. symmetric:0.4) or none, got {setting!r}")
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"the rate of noise setting {setting!r} must be a number, got {rate!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the rate of noise setting {setting!r} must be in [0, 1], got {value}")
    return common.noise_overrides(noise_type, value)


def recovery_cell(results: Sequence[RunResult]) -> str:
    """Recovery accuracy over seeds, or the best training-prediction accuracy for a method that corrects nothing."""
    recovery = [r.recovery_acc for r in results]
    if not all(math.isnan(v) for v in recovery):
        return mean_spread(recovery)
    train_pred = [r.train_pred_acc_best for r in results]
    if all(math.isnan(v) for v in train_pred):
        return "n/a"
    return f"{mean_spread(train_pred)} (train pred, best)"


def summarise(grid: Sequence[tuple[str, str]], results: Sequence[Sequence[RunResult]]) -> str:
    """The markdown table: one row per ``(config, noise setting)`` with its runs over the seeds."""
    header = ["config", "noise", "seeds", "test acc best (%)", "test acc last (%)", "recovery acc (%)", "s/epoch"]
    rows = []
    for (config, noise), runs in zip(grid, results):
        rows.append(
            [
                Path(config).stem,
                noise,
                len(runs),
                mean_spread(r.best_acc for r in runs),
                mean_spread(r.last_acc for r in runs),
                recovery_cell(runs),
                f"{statistics.median(r.epoch_s for r in runs):.2f}",
            ]
        )
    return markdown_table(header, rows)


def _finite(value: Any) -> Any:
    """``value`` with every NaN float replaced by ``None``, so the JSON file is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config files")
    parser.add_argument("--noise", nargs="+", default=list(DEFAULT_NOISE), help="TYPE:RATE settings, or none")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ARG",
        help="a CLI override for every run, as --override=--trainer.max_epochs=5 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures and history to this file")
    parser.add_argument("--cache", type=Path, help="keep each finished run in this folder; a rerun reuses them")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        noise = {setting: parse_noise_setting(setting) for setting in args.noise}
    except ValueError as err:
        parser.error(str(err))

    grid = [(config, setting) for config in args.configs for setting in args.noise]
    jobs = [(config, [*noise[setting], *args.override], seed) for config, setting in grid for seed in args.seeds]
    print(
        f"{len(grid)} settings x {len(args.seeds)} seeds = {len(jobs)} runs in {args.jobs} worker(s);"
        f" overrides: {' '.join(args.override) or 'none'}",
        flush=True,
    )
    flat = run_many(jobs, processes=args.jobs, cache_dir=args.cache)
    per_setting = [flat[i : i + len(args.seeds)] for i in range(0, len(flat), len(args.seeds))]
    print(summarise(grid, per_setting))

    if args.json is not None:
        records = [
            {"noise": setting, **dataclasses.asdict(result)}
            for (_, setting), runs in zip(grid, per_setting)
            for result in runs
        ]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(records), indent=1))
        print(f"wrote {len(records)} runs to {args.json}")


if __name__ == "__main__":
    main()
