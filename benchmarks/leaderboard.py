"""One table of every training method on MNIST-1D: best and last test accuracy, seconds per epoch against CE.

    .venv/bin/python benchmarks/leaderboard.py                       # sym 50% and asym 40%, seeds 0-2
    .venv/bin/python benchmarks/leaderboard.py --settings sym:0.2 sym:0.5 sym:0.8 sym:0.9 asym:0.4 inst:0.4
    .venv/bin/python benchmarks/leaderboard.py --num-samples 25000   # the 20,000-sample variant
    .venv/bin/python benchmarks/leaderboard.py --methods CE ProMix --seeds 0 \\
        --override=--trainer.max_epochs=3                             # a quick check that it runs

Every method runs its own ``configs/mnist1d_*.yaml`` (100 epochs; SOP+ 200) with only the noise changed (and the
per-setting values of :func:`setting_overrides`). The seed seeds both the run
and the label noise; figures are mean ± std over the seeds, in %. Finished runs are kept under ``--cache`` and
reused by a rerun of the same code, so the grid can be extended a piece at a time.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from common import RunResult, markdown_table, mean_spread
from dividemix import dividemix_overrides, fixmatch_overrides, label, parse_setting, run_accuracy

#: every training method, by the name of its row, and its config
METHODS: dict[str, str] = {
    "CE": "configs/mnist1d_ce.yaml",
    "GCE (q 0.7)": "configs/mnist1d_gce.yaml",
    "SCE (0.1, 1)": "configs/mnist1d_sce.yaml",
    "MAE": "configs/mnist1d_mae.yaml",
    "Bootstrap soft": "configs/mnist1d_bootstrap.yaml",
    "mixup": "configs/mnist1d_mixup.yaml",
    "Forward, estimated T": "configs/mnist1d_forward.yaml",
    "ELR (callback)": "configs/mnist1d_elr.yaml",
    "SOP (callback)": "configs/mnist1d_sop.yaml",
    "Joint Optimization": "configs/mnist1d_joint_optimization.yaml",
    "Co-teaching": "configs/mnist1d_coteaching.yaml",
    "CurriculumNet": "configs/mnist1d_curriculum.yaml",
    "SelfLearning": "configs/mnist1d_self_learning.yaml",
    "FeatureMixup": "configs/mnist1d_feature_mixup.yaml",
    "DivideMix": "configs/mnist1d_dividemix.yaml",
    "DivideMix + FixMatch": "configs/mnist1d_dividemix_fixmatch.yaml",
    "SOP+": "configs/mnist1d_sop_plus.yaml",
    "ELR+": "configs/mnist1d_elr_plus.yaml",
    "ProMix": "configs/mnist1d_promix.yaml",
}
DEFAULT_SETTINGS = ("sym:0.5", "asym:0.4")


def setting_overrides(method: str, kind: str, rate: float) -> list[str]:
    """A method's per-setting values, as its paper sets them: DivideMix's CIFAR-10 table (Table 7; its FixMatch
    stage takes the division's values of it, not ``lambda_u``), and
    ProMix's warm-up confidence penalty for asymmetric noise (the authors' scripts, as DivideMix's)."""
    if method == "DivideMix" and kind != "instance":
        return dividemix_overrides(kind, rate)
    if method == "DivideMix + FixMatch" and kind != "instance":
        return fixmatch_overrides(kind, rate)
    if method == "ProMix" and kind == "asymmetric":
        return ["--model.init_args.penalty_weight=1.0"]
    return []


def leaderboard(results: dict[tuple[str, tuple[str, float]], list[RunResult]], methods: Sequence[str],
                settings: Sequence[tuple[str, float]]) -> str:
    """One row per method: best / last per setting, then the median seconds per epoch and its ratio to CE's."""
    header = ["method", *(f"{label(*s)} best / last" for s in settings), "s / epoch", "vs CE"]
    seconds = {m: statistics.median(r.epoch_s for s in settings for r in results[(m, s)]) for m in methods}
    ce = seconds.get("CE")
    rows = []
    for method in methods:
        cells = [f"{mean_spread(r.best_acc for r in results[(method, s)])} / "
                 f"{mean_spread(r.last_acc for r in results[(method, s)])}" for s in settings]
        ratio = f"{seconds[method] / ce:.2f}" if ce else "—"
        rows.append([method, *cells, f"{seconds[method]:.2f}", ratio])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="sym:RATE, asym:RATE (the MNIST class map) or inst:RATE (instance-dependent)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=None, help="MNIST-1D samples, 80%% for training "
                        "(default: the configs' 5,000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="extra CLI override for every run (repeatable)")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/leaderboard"))
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    results = run_accuracy(args.methods, settings, args.seeds, args.num_samples, args.jobs, args.override, args.cache,
                           configs=METHODS, per_setting=setting_overrides)
    print(leaderboard(results, args.methods, settings))


if __name__ == "__main__":
    main()
