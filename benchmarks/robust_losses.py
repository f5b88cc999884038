"""Robust and corrected losses on MNIST-1D: test accuracy under symmetric and asymmetric label noise.

    .venv/bin/python benchmarks/robust_losses.py                       # canonical 4,000 / 1,000 split
    .venv/bin/python benchmarks/robust_losses.py --num-samples 300 --seeds 0 --rates 0.5 \
        --asymmetric-rates --override=--trainer.max_epochs=17           # a quick check that it runs

Every row is one config under configs/ with only the loss (or its correction) changed: cross-entropy,
MAE (Ghosh 2017), GCE q = 0.7 (Zhang & Sabuncu 2018), SCE alpha = 0.1, beta = 1.0 (Wang 2019), forward
correction with the transition matrix estimated at epoch 15 by anchor points and with the true
(realised) matrix as an oracle (Patrini 2017), soft bootstrapping beta = 0.95 (Reed 2015) and mixup
alpha = 1.0 (Zhang 2018); all at SGD lr 0.1 constant for 100 epochs. Noise: symmetric (a label redrawn
from the other classes) at each of ``--rates`` and asymmetric with the MNIST class map (2->7, 3->8,
5<->6, 7->1) at each of ``--asymmetric-rates``. Reported: best and last test accuracy, mean ± std over
seeds, and the mean absolute error of the estimated transition matrix against the realised one. Figure
(PNG, seed 0): test accuracy per epoch of every loss at 50% symmetric noise. Writes the tables to
``<out>/robust_losses.md``, all runs to ``<out>/robust_losses.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from common import RunResult, markdown_table, mean_spread, noise_overrides, plot_curves, run_many

FORWARD = "configs/mnist1d_forward.yaml"
# row name -> (config, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "CE": ("configs/mnist1d_ce.yaml", []),
    "MAE": ("configs/mnist1d_mae.yaml", []),
    "GCE (q=0.7)": ("configs/mnist1d_gce.yaml", []),
    "SCE (0.1, 1.0)": ("configs/mnist1d_sce.yaml", []),
    "Forward, estimated T": (FORWARD, []),
    # the override applies to the last callback of the config's list: the ForwardCorrectionCallback
    "Forward, true T": (FORWARD, ["--trainer.callbacks.transition=true"]),
    "Bootstrap soft (0.95)": ("configs/mnist1d_bootstrap.yaml", []),
    "mixup (alpha=1)": ("configs/mnist1d_mixup.yaml", []),
}
ESTIMATED = "Forward, estimated T"
FIGURE_RATE = 0.5

Setting = tuple[str, float]  # (noise kind, rate)


def setting_name(setting: Setting) -> str:
    kind, rate = setting
    return f"{'sym.' if kind == 'symmetric' else 'asym.'} {rate:.0%}"


def run_grid(settings: list[Setting], methods: list[str], seeds: list[int], num_samples: int, jobs: int,
             extra: list[str]) -> dict[tuple[Setting, str], list[RunResult]]:
    grid = [(s, m, seed) for s in settings for m in methods for seed in seeds]
    runs = run_many([(METHODS[m][0], noise_overrides(*s, num_samples) + METHODS[m][1] + extra, seed)
                     for s, m, seed in grid], processes=jobs)
    results: dict[tuple[Setting, str], list[RunResult]] = {}
    for (s, m, _), r in zip(grid, runs):
        results.setdefault((s, m), []).append(r)
    return results


def accuracy_table(results: dict[tuple[Setting, str], list[RunResult]], settings: list[Setting], field: str) -> str:
    rows = [[m] + [mean_spread(getattr(r, field) for r in results[(s, m)]) for s in settings] for m in METHODS]
    return markdown_table(["loss"] + [setting_name(s) for s in settings], rows)


def transition_mae(r: RunResult) -> float:
    """The logged error of the estimated matrix (logged once, in the estimate epoch); nan if never estimated."""
    values = [row["noisy/transition_mae"] for row in r.history if "noisy/transition_mae" in row]
    return values[0] if values else math.nan


def mae_table(results: dict[tuple[Setting, str], list[RunResult]], settings: list[Setting]) -> str:
    cells = []
    for s in settings:
        values = [v for v in (transition_mae(r) for r in results[(s, ESTIMATED)]) if not math.isnan(v)]
        if not values:
            cells.append("n/a (not estimated)")
        elif len(values) == 1:
            cells.append(f"{values[0]:.4f}")
        else:
            cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
    return markdown_table(["", *[setting_name(s) for s in settings]], [["mean abs. error of T", *cells]])


def figure(out: Path, results: dict[tuple[Setting, str], list[RunResult]], seeds: list[int], num_samples: int,
           jobs: int, extra: list[str]) -> str:
    """Test accuracy per epoch at 50% symmetric noise, seed 0 (the grid's runs when it has them)."""
    setting = ("symmetric", FIGURE_RATE)
    if (setting, "CE") in results and 0 in seeds:
        runs = {m: results[(setting, m)][seeds.index(0)] for m in METHODS}
    else:
        again = run_grid([setting], list(METHODS), [0], num_samples, jobs, extra)
        runs = {m: again[(setting, m)][0] for m in METHODS}
    name = "robust_losses_sym50.png"
    plot_curves(out / name, f"MNIST-1D, {FIGURE_RATE:.0%} symmetric noise, seed 0", "test accuracy (%)",
                {m: [row.get("test/acc", math.nan) for row in r.history] for m, r in runs.items()}, scale=100)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.2, 0.5, 0.8], help="symmetric noise rates")
    parser.add_argument("--asymmetric-rates", type=float, nargs="*", default=[0.4],
                        help="asymmetric noise rates (MNIST class map); none to skip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=5000, help="total samples; 80%% train (default 5000)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--override", action="append", default=[],
                        help="extra CLI override for every run, e.g. --override=--trainer.max_epochs=20")
    parser.add_argument("--skip-figure", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    settings: list[Setting] = [("symmetric", r) for r in args.rates] + [("asymmetric", r) for r in args.asymmetric_rates]
    if not settings:
        parser.error("no noise setting: give --rates and/or --asymmetric-rates")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_train = int(args.num_samples * 0.8)
    results = run_grid(settings, list(METHODS), args.seeds, args.num_samples, args.jobs, args.override)
    report = [
        f"MNIST-1D, {n_train} train / {args.num_samples - n_train} test, seeds {args.seeds}, test accuracy in % "
        f"(mean ± std over seeds); only the loss differs (SGD lr 0.1 constant)"
        + (f"; overrides {args.override}" if args.override else "") + "\n",
        "### Best test accuracy\n", accuracy_table(results, settings, "best_acc"), "",
        "### Last test accuracy\n", accuracy_table(results, settings, "last_acc"), "",
        f"### {ESTIMATED}: error of the anchor-point estimate against the realised transition matrix\n",
        mae_table(results, settings), "",
    ]
    print("\n".join(report), flush=True)
    if not args.skip_figure:
        name = figure(args.out, results, args.seeds, args.num_samples, args.jobs, args.override)
        report.append(f"Figure: {args.out / name}")
        print(report[-1])
    report.append(f"\nwall time {time.perf_counter() - start:.0f} s")
    print(report[-1])
    (args.out / "robust_losses.md").write_text("\n".join(report) + "\n")
    everything = {f"{kind}/{m}/{rate}": [dataclasses.asdict(x) for x in v] for ((kind, rate), m), v in results.items()}
    (args.out / "robust_losses.json").write_text(json.dumps(everything))


if __name__ == "__main__":
    main()
