"""``make demo``: cross-entropy vs Joint Optimization on MNIST-1D with 40% symmetric label noise.

Runs ``configs/mnist1d_ce.yaml`` and ``configs/mnist1d_joint_optimization.yaml`` side by side (one
process each, one thread each) and prints best and last test accuracy and recovery accuracy: the share
of training labels equal to the clean label after correction, or, for cross-entropy, which corrects no
label, its best share of training predictions equal to the clean label (Tanaka et al. 2018).

    python -m lightning_noisy.demo [--noise-rate 0.4] [--seed 0] [--jobs 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning_noisy.experiment import RunResult, run_many

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
METHODS = {"cross-entropy": "mnist1d_ce.yaml", "Joint Optimization": "mnist1d_joint_optimization.yaml"}


def results_table(results: dict[str, RunResult]) -> str:
    """The demo's markdown table, accuracies in %."""
    lines = [
        "| method | best test acc | last test acc | recovery acc | s / epoch |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        recovery = r.recovery_acc if r.recovery_acc == r.recovery_acc else r.train_pred_acc_best  # nan check
        marker = "" if r.recovery_acc == r.recovery_acc else " (train predictions)"
        lines.append(
            f"| {name} | {100 * r.best_acc:.1f} | {100 * r.last_acc:.1f} | {100 * recovery:.1f}{marker} | {r.epoch_s:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise-rate", type=float, default=0.4, help="symmetric noise rate (default 0.4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run and of the noise (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one per method (default 2)")
    args = parser.parse_args(argv)
    if not 0 <= args.noise_rate <= 1:
        parser.error(f"--noise-rate must be in [0, 1], got {args.noise_rate}")
    overrides = [f"--data.init_args.noise_rate={args.noise_rate}"]
    jobs = [(str(CONFIG_DIR / config), overrides, args.seed) for config in METHODS.values()]
    print(f"MNIST-1D (4,000 train / 1,000 test), {args.noise_rate:.0%} symmetric noise, seed {args.seed}: "
          f"training {len(jobs)} runs of 100 epochs ...", flush=True)
    start = time.perf_counter()
    results = dict(zip(METHODS, run_many(jobs, processes=args.jobs)))
    print()
    print(results_table(results))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; configs in {CONFIG_DIR}")


if __name__ == "__main__":
    main()
