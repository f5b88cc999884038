"""``lightning-noisy search`` against the single methods: does a search on noisy labels alone find what hindsight does?

    .venv/bin/python benchmarks/search.py                          # sym 50%, sym 80%, asym 40%, inst 40%; seeds 0, 1
    .venv/bin/python benchmarks/search.py --settings sym:0.5 --seeds 0 --budget-factor 0.2 \\
        --override=--trainer.max_epochs=5                          # a quick check that it runs

Per setting (MNIST-1D canonical split, ``configs/mnist1d_ce.yaml`` as the base, the seed seeding the run and the
noise):

1. DivideMix (``configs/mnist1d_dividemix.yaml`` with its per-setting values) runs once per seed, the seeds side
   by side as the search's two jobs will; the wall time of that pair is one DivideMix run's wall time here.
2. A search of ``configs/search/mnist1d_space.yaml`` per seed, two jobs, with a budget of ``--budget-factor``
   (3) times that wall time: no trial starts, and a running one stops, after it.
3. The winner, ``best.yaml``, retrained on the whole noisy training set (no split held out).

Rows: CE and the hindsight-best single method (the best last accuracy over the leaderboard's methods at these
seeds, read from its run cache, ``--leaderboard-cache``: a choice made with clean test labels, which a user
cannot make), the searched combination retrained, and the search's oracle (its trial with the best clean test
accuracy, trained without the held-out split). Also the Spearman correlation between each selection criterion
and the clean test accuracy over a study's finished trials. Searches, retrains and DivideMix timings are kept
under ``--out``; a setting whose search is done is not searched again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from common import RunResult, markdown_table, mean_spread, noise_overrides, run_many
from dividemix import label, parse_setting
from leaderboard import METHODS, setting_overrides

from lightning_noisy.search.command import main as search_main
from lightning_noisy.search.report import finished_rows, spearman

BASE = "configs/mnist1d_ce.yaml"
SPACE = "configs/search/mnist1d_space.yaml"
DIVIDEMIX = "configs/mnist1d_dividemix.yaml"
DEFAULT_SETTINGS = ("sym:0.5", "sym:0.8", "asym:0.4", "inst:0.4")


def base_config(kind: str, rate: float, seed: int, extra: Sequence[str]) -> dict[str, Any]:
    """``configs/mnist1d_ce.yaml`` with the setting's noise and ``seed`` for the run and the noise."""
    config = yaml.safe_load(Path(BASE).read_text())
    config["seed_everything"] = seed
    init_args = config["data"]["init_args"]
    for override in [*noise_overrides(kind, rate), *extra]:
        key, _, value = override.removeprefix("--").partition("=")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    init_args["noise_seed"] = seed
    return config


def dividemix_wall(kind: str, rate: float, seeds: Sequence[int], extra: Sequence[str], out: Path) -> float:
    """Seconds of one DivideMix run here: its runs for ``seeds`` side by side (two jobs), timed; kept in ``out``."""
    path = out / "dividemix_wall.json"
    if path.is_file():
        return float(json.loads(path.read_text())["seconds"])
    start = time.perf_counter()
    run_many([(DIVIDEMIX, [*noise_overrides(kind, rate), *setting_overrides("DivideMix", kind, rate), *extra], s)
              for s in seeds], processes=2)
    seconds = time.perf_counter() - start
    path.write_text(json.dumps({"seconds": seconds, "seeds": list(seeds)}))
    return seconds


def search(kind: str, rate: float, seed: int, budget: float, extra: Sequence[str], out: Path, jobs: int) -> dict[str, Any]:
    """Run (or reuse) the search of one setting and seed; its wall time, trial count and criteria."""
    import optuna

    done = out / "search.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump(base_config(kind, rate, seed, extra), sort_keys=False))
    start = time.perf_counter()
    search_main(["--config", str(base), "--space", SPACE, "--trials", "500", "--jobs", str(jobs), "--out", str(out),
                 "--timeout", f"{budget:.0f}", "--study", f"{kind}-{rate}-s{seed}", "--seed", str(seed)])
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=f"{kind}-{rate}-s{seed}", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    rows = finished_rows(study, study.user_attrs.get("noisy_val_labels", []))
    oracle = max(rows, key=lambda r: r.test_last) if rows else None
    summary = {
        "wall_s": wall, "budget_s": budget, "trials": len(study.trials),
        "states": {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "spearman": {c: spearman([getattr(r, c) for r in rows if math.isfinite(getattr(r, c))],
                                 [r.test_last for r in rows if math.isfinite(getattr(r, c))])
                     for c in ("noisy_val", "majority_filter")},
        "oracle": None if oracle is None else {"trial": oracle.number, "combination": oracle.combination,
                                               "best": oracle.test_best, "last": oracle.test_last},
    }
    done.write_text(json.dumps(summary, indent=1))
    return summary


def leaderboard_runs(cache: Path) -> list[tuple[float, RunResult]]:
    """Every run stored in the leaderboard's cache, with its file's modification time (the newest wins a tie)."""
    runs = []
    for path in cache.glob("*.json"):
        try:
            fields = json.loads(path.read_text())
            runs.append((path.stat().st_mtime, RunResult(**{**fields, "overrides": tuple(fields["overrides"])})))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return runs


def single_methods(runs: list[tuple[float, RunResult]], kind: str, rate: float, seeds: Sequence[int]) -> dict[str, list[RunResult]]:
    """The newest cached run of each leaderboard method at this setting, per seed (methods missing a seed left out)."""
    out = {}
    for method, config in METHODS.items():
        wanted = (*noise_overrides(kind, rate), *setting_overrides(method, kind, rate))
        per_seed = []
        for seed in seeds:
            matches = [(t, r) for t, r in runs if r.config == config and r.overrides == wanted and r.seed == seed]
            if matches:
                per_seed.append(max(matches, key=lambda m: m[0])[1])
        if len(per_seed) == len(seeds):
            out[method] = per_seed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget-factor", type=float, default=3.0, help="search budget in DivideMix wall times")
    parser.add_argument("--jobs", type=int, default=2, help="the search's worker processes (one torch thread each)")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="extra CLI override of the base config and DivideMix, e.g. --trainer.max_epochs=5")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/search"))
    parser.add_argument("--leaderboard-cache", type=Path, default=Path("benchmarks/out/leaderboard"))
    args = parser.parse_args()
    cached = leaderboard_runs(args.leaderboard_cache)
    header = ["setting", "CE best / last", "hindsight-best single method: best / last", "searched, retrained: best / last",
              "search's oracle: best / last", "trials (done, pruned, failed)", "search wall s (budget)",
              "Spearman noisy-val / majority filter"]
    table = []
    for text in args.settings:
        kind, rate = parse_setting(text)
        folder = args.out / text.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        budget = args.budget_factor * dividemix_wall(kind, rate, args.seeds, args.override, folder)
        print(f"{label(kind, rate)}: search budget {budget:.0f} s", flush=True)
        summaries = [search(kind, rate, s, budget, args.override, folder / f"seed{s}", args.jobs) for s in args.seeds]
        retrained = [r for r in run_many([(str(folder / f"seed{s}" / "best.yaml"), [], s) for s in args.seeds],
                                         processes=2, cache_dir=folder / "retrain") if r is not None]
        singles = single_methods(cached, kind, rate, args.seeds)
        ce = singles.get("CE", [])
        hindsight = max(singles, key=lambda m: statistics.fmean(r.last_acc for r in singles[m]), default=None)
        oracles = [s["oracle"] for s in summaries if s["oracle"]]
        table.append([
            label(kind, rate),
            f"{mean_spread(r.best_acc for r in ce)} / {mean_spread(r.last_acc for r in ce)}" if ce else "not cached",
            "not cached" if hindsight is None else f"{hindsight}: {mean_spread(r.best_acc for r in singles[hindsight])}"
            f" / {mean_spread(r.last_acc for r in singles[hindsight])}",
            f"{mean_spread(r.best_acc for r in retrained)} / {mean_spread(r.last_acc for r in retrained)}",
            f"{mean_spread(o['best'] for o in oracles)} / {mean_spread(o['last'] for o in oracles)}",
            " · ".join(f"{s['trials']} ({s['states']['COMPLETE']}, {s['states']['PRUNED']}, {s['states']['FAIL']})"
                       for s in summaries),
            " · ".join(f"{s['wall_s']:.0f}" for s in summaries) + f" ({budget:.0f})",
            " · ".join(f"{s['spearman']['noisy_val']:.2f} / {s['spearman']['majority_filter']:.2f}" for s in summaries),
        ])
        for seed, s in zip(args.seeds, summaries):
            best = (folder / f"seed{seed}" / "best.yaml").read_text().splitlines()[0]
            print(f"  seed {seed}: {best.removeprefix('# ')}; oracle {s['oracle']}", flush=True)
        print(markdown_table(header, table[-1:]), flush=True)
    print("\nBest / last test accuracy in %, mean ± std over seeds " + ", ".join(map(str, args.seeds))
          + "; per-seed figures separated by ·\n")
    print(markdown_table(header, table))


if __name__ == "__main__":
    sys.exit(main())
