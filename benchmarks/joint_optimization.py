"""Joint Optimization (Tanaka et al., CVPR 2018) reproduced on MNIST-1D: tables and figures for docs/benchmarks.md.

    .venv/bin/python benchmarks/joint_optimization.py                      # canonical 4,000 / 1,000 split
    .venv/bin/python benchmarks/joint_optimization.py --num-samples 25000 --seeds 0 --rates 0.3 0.5 0.7 \
        --skip-asymmetric --skip-figures                                    # the 20,000-sample variant

Table 1 analogue: symmetric noise (a label redrawn from the other classes) at each rate, cross-entropy
(constant lr 0.1, 100 epochs) and Joint Optimization (60 epochs of step 1 at lr 0.1 + 40 epochs of
step 2), best and last test accuracy, mean ± std over seeds, and recovery accuracy: the share of
training labels equal to the clean label after correction, or for cross-entropy its best share of
training predictions equal to the clean label. Table 2 analogue: asymmetric noise with the MNIST class
map (2->7, 3->8, 5<->6, 7->1), with the paper's rows: CE, Forward (transition matrix estimated, as in the
paper's own implementation: ``configs/mnist1d_forward.yaml``), CNN-CRF (10% of the training set clean:
``configs/mnist1d_cnn_crf.yaml``) and JO, each with a best and a last row; recovery of the baselines is the
share of training predictions equal to the clean label, as the paper's note on its Table 2 says. Figures (PNG, seed 0): test accuracy per epoch at a high and a low learning
rate (Fig. 2), training loss per epoch of cross-entropy at several noise rates (Fig. 3), recovery
accuracy per epoch of the soft, hard and hard-top-k updates (Fig. 4), and Figs. 5-6 (:func:`label_source_figures`):
test accuracy and training loss of cross-entropy on ground-truth labels, symmetric noisy labels, pseudo labels
(a briefly trained network's own predictions) and the labels JO's step 1 updated from each. Writes tables to
``<out>/joint_optimization.md``, all runs to ``<out>/joint_optimization.json``.

    .venv/bin/python benchmarks/joint_optimization.py --only-figures-5-6 --out docs/figures   # Figs. 5-6 alone
    .venv/bin/python benchmarks/joint_optimization.py --only-asymmetric                        # Table 2 alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from common import RunResult, markdown_table, mean_spread, noise_overrides, plot_curves, quiet_cli, run_many

CE, JO = "configs/mnist1d_ce.yaml", "configs/mnist1d_joint_optimization.yaml"
METHODS = {"CE": CE, "JO": JO}
#: Table 2's rows: the baselines of Tanaka et al.'s asymmetric table, then JO
TABLE2_METHODS = {"CE": CE, "Forward (estimated T)": "configs/mnist1d_forward.yaml",
                  "CNN-CRF (10% clean)": "configs/mnist1d_cnn_crf.yaml", "JO": JO}


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


def best_recovery(r: RunResult) -> float:
    """JO's largest share of right labels over the epochs, or the baselines' best share of right training predictions."""
    values = [row["noisy/recovery_acc"] for row in r.history if "noisy/recovery_acc" in row]
    return max(values) if values else r.train_pred_acc_best


def last_recovery(r: RunResult) -> float:
    """The label recovery at the end (JO), or the last epoch's share of right training predictions (baselines)."""
    if not math.isnan(r.recovery_acc):
        return r.recovery_acc
    values = [row["noisy/train_pred_acc"] for row in r.history if "noisy/train_pred_acc" in row]
    return values[-1] if values else math.nan


def method_table(results: dict[tuple[str, float], list[RunResult]], methods: list[str], rates: list[float]) -> str:
    """Tanaka's Table 2 layout: a best and a last row per method; test accuracy, then recovery, per rate.

    Recovery is JO's share of right labels (best: its largest over the epochs, last: at the end), and for the
    baselines the share of training predictions equal to the clean label (best and last epoch), as the paper's
    note on its Table 2 says.
    """
    header = ["method", "", *(f"test {r:.0%}" for r in rates), *(f"recovery {r:.0%}" for r in rates)]
    rows = []
    for method in methods:
        for which in ("best", "last"):
            test = [mean_spread(getattr(x, f"{which}_acc") for x in results[(method, r)]) for r in rates]
            pick = best_recovery if which == "best" else last_recovery
            rows.append([method if which == "best" else "", which, *test,
                         *(mean_spread(pick(x) for x in results[(method, r)]) for r in rates)])
    return markdown_table(header, rows)


def run_grid(kind: str, rates: list[float], seeds: list[int], num_samples: int, jobs: int,
             extra: list[str], methods: dict[str, str] = METHODS, cache: Path | None = None,
             failed: list[str] | None = None) -> dict[tuple[str, float], list[RunResult]]:
    """Every ``(method, rate, seed)`` run; a run that fails (a diverged JO stopped by its collapse guard) is left
    out of its cell and named in ``failed``."""
    grid = [(m, rate, seed) for rate in rates for m in methods for seed in seeds]
    runs = run_many([(methods[m], noise_overrides(kind, rate, num_samples) + extra, seed) for m, rate, seed in grid],
                    processes=jobs, cache_dir=cache, skip_failed=True)
    results: dict[tuple[str, float], list[RunResult]] = {}
    for (m, rate, seed), r in zip(grid, runs):
        results.setdefault((m, rate), [])
        if r is None:
            if failed is not None:
                failed.append(f"{m} at {kind} {rate:.0%}, seed {seed}")
        else:
            results[(m, rate)].append(r)
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


def pseudo_labels(path: Path, epochs: int, num_samples: int) -> float:
    """Train cross-entropy on the clean labels for ``epochs`` epochs and write its training-set predictions as
    labels (the file of ``noise_type=file``) to ``path``; returns their noise level (share unequal to the clean)."""
    import torch

    from lightning_noisy.callbacks.base import train_eval_loader
    from lightning_noisy.data.noise import save_corrected_labels

    torch.set_num_threads(1)
    cli = quiet_cli(CE, ["--data.init_args.noise_type=none", f"--data.init_args.num_samples={num_samples}",
                         f"--trainer.max_epochs={epochs}", "--trainer.callbacks=[]"])
    cli.trainer.fit(cli.model, cli.datamodule)
    clean = cli.datamodule.noisy_labels.clone()  # no noise: the given labels are the clean ones
    predicted = torch.empty_like(clean)
    cli.model.eval()
    with torch.no_grad():
        for x, _, index in train_eval_loader(cli.trainer, "pseudo_labels"):
            predicted[index] = cli.model(x).argmax(1)
    save_corrected_labels(path, predicted, clean_labels=clean, num_classes=int(cli.model.hparams.num_classes))
    return float((predicted != clean).float().mean())


def jo_updated_labels(path: Path, overrides: list[str]) -> float:
    """Run JO's step 1 alone on the labels of ``overrides`` and write its updated labels to ``path``; returns
    their recovery accuracy (share equal to the clean label)."""
    import torch

    torch.set_num_threads(1)
    cli = quiet_cli(JO, [*overrides, "--trainer.max_epochs=60"])  # step 1 only
    assert cli.model.step1_epochs == 60, "the JO config's step 1 is expected to last 60 epochs"
    cli.trainer.fit(cli.model, cli.datamodule)
    correction = cli.model.label_correction
    correction.save_labels(path)
    clean = correction.training_labels.clean
    return float((correction.labels.argmax(1).cpu() == clean).float().mean())


def label_source_figures(out: Path, num_samples: int, jobs: int, pseudo_epochs: int) -> tuple[list[str], str]:
    """Figs. 5-6 of Tanaka et al.: cross-entropy (lr 0.1, 100 epochs, seed 0) on five label sets.

    Ground truth; pseudo labels (a network trained ``pseudo_epochs`` epochs on the ground truth, its
    predictions); symmetric noise at the pseudo labels' measured noise level; and the labels JO's step 1
    (60 epochs) updated from each noisy set. Returns the PNG names and a table of the label sets.
    """
    labels = out / "label_sources"
    labels.mkdir(parents=True, exist_ok=True)
    pseudo_file, from_pseudo, from_symmetric = (labels / f"{name}.pt" for name in ("pseudo", "jo_pseudo", "jo_symmetric"))
    pseudo_noise = pseudo_labels(pseudo_file, pseudo_epochs, num_samples)
    rate = round(pseudo_noise, 2)
    size = [f"--data.init_args.num_samples={num_samples}"]
    symmetric = noise_overrides("symmetric", rate) + size

    def from_file(path: Path) -> list[str]:
        return ["--data.init_args.noise_type=file", f"--data.init_args.noise_file={path}", *size]

    recovered = {"symmetric": jo_updated_labels(from_symmetric, symmetric),
                 "pseudo": jo_updated_labels(from_pseudo, from_file(pseudo_file))}
    sources = {
        "ground truth": ["--data.init_args.noise_type=none", *size],
        f"symmetric noise ({rate:.0%})": symmetric,
        f"pseudo labels ({pseudo_noise:.1%} wrong)": from_file(pseudo_file),
        f"JO-updated from symmetric ({1 - recovered['symmetric']:.1%} wrong)": from_file(from_symmetric),
        f"JO-updated from pseudo ({1 - recovered['pseudo']:.1%} wrong)": from_file(from_pseudo),
    }
    runs = dict(zip(sources, run_many([(CE, o, 0) for o in sources.values()], processes=jobs)))
    files = ["fig5_label_sources_acc.png", "fig6_label_sources_loss.png"]
    plot_curves(out / files[0], "Fig. 5: cross-entropy on labels from each source", "test accuracy",
                {name: series(r, "test/acc") for name, r in runs.items()})
    plot_curves(out / files[1], "Fig. 6: cross-entropy on labels from each source", "training loss",
                {name: series(r, "train/loss") for name, r in runs.items()})
    rows = [[name, f"{100 * r.best_acc:.1f}", f"{100 * r.last_acc:.1f}", f"{series(r, 'train/loss')[-1]:.3f}"]
            for name, r in runs.items()]
    table = markdown_table(["labels (CE, seed 0)", "best test acc.", "last test acc.", "last training loss"], rows)
    return files, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--asymmetric-rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=5000, help="total samples; 80%% train (default 5000)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="extra CLI override for every run")
    parser.add_argument("--skip-asymmetric", action="store_true")
    parser.add_argument("--only-asymmetric", action="store_true", help="only the Table 2 analogue")
    parser.add_argument("--skip-figures", action="store_true")
    parser.add_argument("--only-figures-5-6", action="store_true", help="only the label-source figures (Figs. 5-6)")
    parser.add_argument("--pseudo-epochs", type=int, default=3,
                        help="epochs of the network whose predictions are the pseudo labels of Figs. 5-6")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.only_figures_5_6:
        files, table = label_source_figures(args.out, args.num_samples, args.jobs, args.pseudo_epochs)
        print(table + f"\n\nFigures: {', '.join(str(args.out / f) for f in files)}; {time.perf_counter() - start:.0f} s")
        return
    n_train = int(args.num_samples * 0.8)
    report = [f"MNIST-1D, {n_train} train / {args.num_samples - n_train} test, seeds {args.seeds}, "
              f"test accuracy and recovery in % (mean ± std over seeds)\n"]
    table1 = {} if args.only_asymmetric else run_grid("symmetric", args.rates, args.seeds, args.num_samples,
                                                       args.jobs, args.override)
    if table1:
        report += ["### Symmetric noise (Table 1 analogue)\n", noise_table(table1, args.rates), ""]
        print("\n".join(report), flush=True)
    everything = {f"symmetric/{m}/{r}": [dataclasses.asdict(x) for x in v] for (m, r), v in table1.items()}
    if not args.skip_asymmetric:
        failed: list[str] = []
        table2 = run_grid("asymmetric", args.asymmetric_rates, args.seeds, args.num_samples, args.jobs, args.override,
                          TABLE2_METHODS, args.out / "runs", failed)
        part = ["### Asymmetric noise, MNIST class map (Table 2 analogue)\n",
                method_table(table2, list(TABLE2_METHODS), args.asymmetric_rates), ""]
        if failed:
            part += ["Runs that failed, left out of their cells: " + "; ".join(failed) + ".", ""]
        print("\n".join(part), flush=True)
        report += part
        everything.update({f"asymmetric/{m}/{r}": [dataclasses.asdict(x) for x in v] for (m, r), v in table2.items()})
    if not args.skip_figures and table1:
        files = figures(args.out, table1, args.num_samples, args.jobs, args.override)
        more, table = label_source_figures(args.out, args.num_samples, args.jobs, args.pseudo_epochs)
        report += [table, "", "Figures: " + ", ".join(str(args.out / f) for f in files + more)]
    report.append(f"\nwall time {time.perf_counter() - start:.0f} s")
    print(report[-1])
    (args.out / "joint_optimization.md").write_text("\n".join(report) + "\n")
    (args.out / "joint_optimization.json").write_text(json.dumps(everything))


if __name__ == "__main__":
    main()
