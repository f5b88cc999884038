"""Co-teaching on MNIST-1D: what each network scores, what their mean scores, and what the schedule does.

    .venv/bin/python benchmarks/coteaching.py                          # sym 50% and asym 40%, seeds 0 and 1
    .venv/bin/python benchmarks/coteaching.py --seeds 0 --variants paper \\
        --override=--trainer.max_epochs=5 --override=--model.init_args.milestones=[2]   # a quick check

Each variant is ``configs/mnist1d_coteaching.yaml`` with a few arguments changed (``VARIANTS`` below).
Every run scores network a, network b and the mean of their logits on the test split after each epoch
(``test/acc_a``, ``test/acc_b``, ``test/acc_mean``); the table gives the best and the last epoch of each,
mean ± std over the seeds in %, and the median seconds per epoch. The seed seeds the run and the noise.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from common import RunResult, markdown_table, mean_spread, noise_overrides, run_many

CONFIG = "configs/mnist1d_coteaching.yaml"
_MODEL = "--model.init_args."
#: variant -> overrides of the config
VARIANTS: dict[str, list[str]] = {
    # the config: Adam at a constant lr, tau = 0.4
    "config": [],
    # Han et al. 2018: Adam, lr decayed linearly to zero from 40% of the run (their epoch 80 of 200)
    "linear decay": [f"{_MODEL}scheduler=linear", f"{_MODEL}milestones=[40]"],
    # the forget rate set to the noise rate of the setting, as the paper does, with its decay
    "linear decay, tau = noise rate": [f"{_MODEL}scheduler=linear", f"{_MODEL}milestones=[40]", "TAU"],
    # the Lightning reproduction of the CIFAR-N study: tau 0.2 whatever the noise, decay from 40% of the run
    "linear decay, tau 0.2": [f"{_MODEL}scheduler=linear", f"{_MODEL}milestones=[40]", f"{_MODEL}forget_rate=0.2"],
}
SETTINGS = {"sym 50%": ("symmetric", 0.5), "asym 40%": ("asymmetric", 0.4)}
NETWORKS = ("a", "b", "mean")


def best_last(run: RunResult, network: str) -> tuple[float, float]:
    """Best and last ``test/acc_<network>`` of a run, from its per-epoch history."""
    values = [row[f"test/acc_{network}"] for row in run.history if f"test/acc_{network}" in row]
    return (max(values), values[-1]) if values else (math.nan, math.nan)


def variant_overrides(variant: str, rate: float) -> list[str]:
    return [f"{_MODEL}forget_rate={rate}" if o == "TAU" else o for o in VARIANTS[variant]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--override", action="append", default=[], help="extra CLI override for every run")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/coteaching"),
                        help="keep each finished run here; a rerun reuses them")
    args = parser.parse_args()
    grid = [(v, s, seed) for s in args.settings for v in args.variants for seed in args.seeds]
    jobs = [(CONFIG, noise_overrides(*SETTINGS[s]) + variant_overrides(v, SETTINGS[s][1]) + args.override, seed)
            for v, s, seed in grid]
    runs = run_many(jobs, processes=args.jobs, cache_dir=args.cache)
    header = ["setting", "variant"] + [f"{n} best / last" for n in NETWORKS] + ["per seed (mean, last)", "s/epoch"]
    rows = []
    for setting in args.settings:
        for variant in args.variants:
            mine = [r for (v, s, _), r in zip(grid, runs) if v == variant and s == setting]
            cells = []
            for network in NETWORKS:
                figures = [best_last(r, network) for r in mine]
                cells.append(f"{mean_spread(b for b, _ in figures)} / {mean_spread(l for _, l in figures)}")
            per_seed = ", ".join(f"{100 * best_last(r, 'mean')[1]:.1f}" for r in mine)
            seconds = sorted(r.epoch_s for r in mine)[len(mine) // 2]
            rows.append([setting, variant, *cells, per_seed, f"{seconds:.2f}"])
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
