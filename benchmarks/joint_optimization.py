"""Joint Optimization (Tanaka et al., CVPR 2018) reproduced on MNIST-1D: tables and figures for docs/benchmarks.md.

    .venv/bin/python benchmarks/joint_optimization.py                      # canonical 4,000 / 1,000 split
    .venv/bin/python benchmarks/joint_optimization.py --num-samples 25000 --seeds 0 --rates 0.3 0.5 0.7 \
        --skip-asymmetric --skip-figures                                    # the 20,000-sample variant

Table 1 analogue: symmetric noise (a label redrawn from the other classes) at each rate, cross-entropy
(constant lr 0.1, 100 epochs) and Joint Optimization (60 epochs of step 1 at lr 0.1 + 40 epochs of
step 2), best and last test accuracy, mean ± std over seeds, and recovery accuracy: the share of
training labels equal to the clean label after correction, or for cross-entropy its best share of
training predictions equal to the clean label. Table 2 analogue: asymmetric noise with the MNIST class
map (2->7, 3->8, 5<->6, 7->1). Figures (PNG, seed 0): test accuracy per epoch at a high and a low learning
rate (Fig. 2), training loss per epoch of cross-entropy at several noise rates (Fig. 3), recovery
accuracy per epoch of the soft, hard and hard-top-k updates (Fig. 4). Writes tables to
``<out>/joint_optimization.md``, all runs to ``<out>/joint_optimization.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from common import RunResult, markdown_table, mean_spread, noise_overrides, plot_curves, run_many

CE, JO = "configs/mnist1d_ce.yaml", "configs/mnist1d_joint_optimization.yaml"
METHODS = {"CE": CE, "JO": JO}


def recovery(r: RunResult) -> float:
    return r.train_pred_acc_best if math.isnan(r.recovery_acc) else r.recovery_acc


def noise_table(results: dict[tuple[str, float], list[RunResult]], rates: list[float]) -> str:
    rows = []
    for rate in rates:
        ce, jo = results[("CE", rate)], results[("JO", rate)]
        rows.append([
            f"{rate:.0%}",
            mean_spread(r.best_acc for r in ce), mean_spread(r.last_acc for r in ce),
            mean_spread(r.best_acc for r in jo), mean_spread(r.last_acc for r in jo),
            mean_spread(recovery(r) for r in ce), mean_spread(recovery(r) for r in jo),
        ])
    header = ["noise", "CE best", "CE last", "JO best", "JO last", "CE recovery (train pred.)", "JO recovery"]
    return markdown_table(header, rows)


def run_grid(kind: str, rates: list[float], seeds: list[int], num_samples: int, jobs: int,
             extra: list[str]) -> dict[tuple[str, float], list[RunResult]]:
    grid = [(m, rate, seed) for rate in rates for m in METHODS for seed in seeds]
    runs = run_many([(METHODS[m], noise_overrides(kind, rate, num_samples) + extra, seed) for m, rate, seed in grid],
                    processes=jobs)
    results: dict[tuple[str, float], list[RunResult]] = {}
    for (m, rate, _), r in zip(grid, runs):
        results.setdefault((m, rate), []).append(r)
    return results


def series(r: RunResult, key: str) -> list[float]:
    return [row.get(key, math.nan) for row in r.history]


def figures(out: Path, table1: dict[tuple[str, float], list[RunResult]], num_samples: int, jobs: int,
            extra: list[str]) -> list[str]:
    rate = 0.5 if ("CE", 0.5) in table1 else sorted(r for _, r in table1)[len(table1) // 4]
    base = noise_overrides("symmetric", rate, num_samples) + extra
    low_lr, hard, topk = run_many([
        (CE, base + ["--model.init_args.lr=0.01"], 0),
        (JO, base + ["--model.init_args.update=hard"], 0),
        (JO, base + ["--model.init_args.update=hard_topk", "--model.init_args.top_k=50"], 0),
    ], processes=jobs)
    high_lr = table1[("CE", rate)][0]
    files = ["fig2_lr.png", "fig3_loss.png", "fig4_recovery.png"]
    plot_curves(out / files[0], f"Fig. 2: cross-entropy, {rate:.0%} symmetric noise", "test accuracy",
                {"lr 0.1 (high)": series(high_lr, "test/acc"), "lr 0.01 (low)": series(low_lr, "test/acc")})
    plot_curves(out / files[1], "Fig. 3: cross-entropy at lr 0.1", "training loss",
                {f"{r:.0%} noise": series(table1[("CE", r)][0], "train/loss") for _, r in sorted(table1) if _ == "CE"})
    soft = table1[("JO", rate)][0]
    step1 = 60
    plot_curves(out / files[2], f"Fig. 4: label updates, {rate:.0%} symmetric noise (step 1)", "recovery accuracy",
                {name: series(r, "noisy/recovery_acc")[:step1] for name, r in
                 {"soft": soft, "hard": hard, "hard top-50": topk}.items()})
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--asymmetric-rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=5000, help="total samples; 80%% train (default 5000)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="extra CLI override for every run")
    parser.add_argument("--skip-asymmetric", action="store_true")
    parser.add_argument("--skip-figures", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_train = int(args.num_samples * 0.8)
    report = [f"MNIST-1D, {n_train} train / {args.num_samples - n_train} test, seeds {args.seeds}, "
              f"test accuracy and recovery in % (mean ± std over seeds)\n"]
    table1 = run_grid("symmetric", args.rates, args.seeds, args.num_samples, args.jobs, args.override)
    report += ["### Symmetric noise (Table 1 analogue)\n", noise_table(table1, args.rates), ""]
    print("\n".join(report), flush=True)
    everything = {f"symmetric/{m}/{r}": [dataclasses.asdict(x) for x in v] for (m, r), v in table1.items()}
    if not args.skip_asymmetric:
        table2 = run_grid("asymmetric", args.asymmetric_rates, args.seeds, args.num_samples, args.jobs, args.override)
        part = ["### Asymmetric noise, MNIST class map (Table 2 analogue)\n", noise_table(table2, args.asymmetric_rates), ""]
        print("\n".join(part), flush=True)
        report += part
        everything.update({f"asymmetric/{m}/{r}": [dataclasses.asdict(x) for x in v] for (m, r), v in table2.items()})
    if not args.skip_figures:
        files = figures(args.out, table1, args.num_samples, args.jobs, args.override)
        report.append("Figures: " + ", ".join(str(args.out / f) for f in files))
    report.append(f"\nwall time {time.perf_counter() - start:.0f} s")
    print(report[-1])
    (args.out / "joint_optimization.md").write_text("\n".join(report) + "\n")
    (args.out / "joint_optimization.json").write_text(json.dumps(everything))


if __name__ == "__main__":
    main()
