"""The semi-supervised family on MNIST-1D: DivideMix against CE, Joint Optimization, SelfLearning, FeatureMixup.

    .venv/bin/python benchmarks/dividemix.py                         # canonical 4,000 / 1,000 split, 3 seeds
    .venv/bin/python benchmarks/dividemix.py --num-samples 25000 --seeds 0 \\
        --settings sym:0.5 sym:0.8 asym:0.4                          # the 20,000-sample variant
    .venv/bin/python benchmarks/dividemix.py --skip-accuracy         # only the co-divide pass cost

Accuracy: every method's ``configs/mnist1d_*.yaml`` (100 epochs each) at every noise setting and seed
(the seed seeds both the run and the label noise); best and last test accuracy, mean ± std over the
seeds, in %. DivideMix takes the per-setting ``lambda_u`` and ``p_threshold`` of the paper's CIFAR-10
table (Appendix B, Table 7) and the warm-up confidence penalty at asymmetric noise (Sec. 3.1). Also
printed: DivideMix's co-divide AUROC (clean probability of network a's division against the true clean
mask) at its last epoch, and the median seconds per training epoch of each method with its ratio to CE.

Cost: on ``--cost-samples`` training samples (default 40,000), the ``CoDivideCallback`` loss pass of a
cnn1d classifier against a plain eval-mode forward pass over the same loader (under ``torch.no_grad`` and
under ``torch.inference_mode``, which the loss pass uses), and the 2-component GMM
(``clean_probability``) on 1e6 losses, fit to a 1e5 subset (the default) and to all, on two synthetic sets
and on losses drawn from the trained classifier's; then the loss pass alone on 1 and 2 CPU ranks (gloo, each rank
loading only its share of the batches); medians of ``--cost-repeats`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import RunResult, markdown_table, mean_spread, noise_overrides, run_many

METHODS: dict[str, str] = {
    "CE": "configs/mnist1d_ce.yaml",
    "Joint Optimization": "configs/mnist1d_joint_optimization.yaml",
    "DivideMix": "configs/mnist1d_dividemix.yaml",
    "DivideMix + FixMatch": "configs/mnist1d_dividemix_fixmatch.yaml",
    "SelfLearning": "configs/mnist1d_self_learning.yaml",
    "FeatureMixup": "configs/mnist1d_feature_mixup.yaml",
}
DEFAULT_SETTINGS = ("sym:0.2", "sym:0.5", "sym:0.8", "sym:0.9", "asym:0.4")
KINDS = {"sym": "symmetric", "asym": "asymmetric", "inst": "instance"}


def dividemix_settings(kind: str, rate: float) -> dict[str, float]:
    """DivideMix's per-setting hyperparameters: the paper's CIFAR-10 values (Appendix B, Table 7).

    ``lambda_u`` 0 at 20% symmetric and at asymmetric noise, 25 at 50% and 80% (and in between), 50 at
    90% with ``p_threshold`` 0.6 and, as the reference code does there, the losses averaged over the last 5
    epochs; the warm-up confidence penalty (weight 1) only for asymmetric noise.
    """
    if kind == "asymmetric":
        return {"lambda_u": 0.0, "penalty_weight": 1.0}
    if rate <= 0.2:
        return {"lambda_u": 0.0}
    if rate >= 0.9:
        return {"lambda_u": 50.0, "p_threshold": 0.6, "loss_average_epochs": 5}
    return {"lambda_u": 25.0}


def dividemix_overrides(kind: str, rate: float) -> list[str]:
    """:func:`dividemix_settings` as CLI overrides."""
    return [f"--model.init_args.{name}={value}" for name, value in dividemix_settings(kind, rate).items()]


def parse_setting(text: str) -> tuple[str, float]:
    """``sym:0.5`` -> ``("symmetric", 0.5)``; ``asym:0.4`` -> ``("asymmetric", 0.4)``; ``inst:0.4`` -> instance."""
    kind, _, rate = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"a setting is sym:RATE, asym:RATE or inst:RATE, got {text!r}")
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"the rate of setting {text!r} must be a number, got {rate!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"the rate of setting {text!r} must be in (0, 1), got {value}")
    return KINDS[kind], value


def label(kind: str, rate: float) -> str:
    short = {"symmetric": "sym.", "asymmetric": "asym.", "instance": "inst."}[kind]
    return f"{short} {rate:.0%}"


def fixmatch_overrides(kind: str, rate: float) -> list[str]:
    """DivideMix's per-setting division values for its FixMatch stage: ``p_threshold``, the loss average and the
    warm-up penalty of :func:`dividemix_settings`, but not its ``lambda_u`` (the weight of MixMatch's squared
    error); the stage keeps FixMatch's weight 1 everywhere, its threshold deciding what is trained on."""
    settings = dividemix_settings(kind, rate)
    settings.pop("lambda_u")
    return [f"--model.init_args.{name}={value}" for name, value in settings.items()]


def method_overrides(method: str, kind: str, rate: float) -> list[str]:
    """DivideMix's per-setting values (:func:`dividemix_overrides`, :func:`fixmatch_overrides`); none for the others."""
    if method == "DivideMix":
        return dividemix_overrides(kind, rate)
    return fixmatch_overrides(kind, rate) if method == "DivideMix + FixMatch" else []


def run_accuracy(
    methods: Sequence[str], settings: Sequence[tuple[str, float]], seeds: Sequence[int], num_samples: int | None,
    jobs: int, extra: Sequence[str], cache_dir: Path | None = None, configs: Mapping[str, str] = METHODS,
    per_setting: Callable[[str, str, float], list[str]] = method_overrides,
) -> dict[tuple[str, tuple[str, float]], list[RunResult]]:
    """Every ``(method, setting, seed)`` run of ``configs[method]`` with the noise of the setting, then
    ``per_setting(method, kind, rate)`` and ``extra`` as CLI overrides; the results by ``(method, setting)``."""
    grid = [(m, s, seed) for s in settings for m in methods for seed in seeds]
    specs = []
    for method, (kind, rate), seed in grid:
        overrides = noise_overrides(kind, rate, num_samples) + per_setting(method, kind, rate)
        specs.append((configs[method], [*overrides, *extra], seed))
    results: dict[tuple[str, tuple[str, float]], list[RunResult]] = {}
    for (method, setting, _), result in zip(grid, run_many(specs, processes=jobs, cache_dir=cache_dir)):
        results.setdefault((method, setting), []).append(result)
    return results


def last_value(run: RunResult, key: str = "noisy/codivide_auroc") -> float:
    """The last epoch's value of a logged metric (NaN if it was never logged)."""
    values = [row[key] for row in run.history if key in row]
    return values[-1] if values else math.nan


def accuracy_tables(
    results: dict[tuple[str, tuple[str, float]], list[RunResult]], methods: Sequence[str],
    settings: Sequence[tuple[str, float]],
) -> str:
    header = ["method", *(label(*s) for s in settings)]
    parts = []
    for title, field in (("Best test accuracy (%)", "best_acc"), ("Last test accuracy (%)", "last_acc")):
        rows = []
        for method in methods:
            cells = [mean_spread(getattr(r, field) for r in results[(method, s)]) for s in settings]
            if field == "last_acc" and method.startswith("DivideMix"):
                gaps = [mean_spread(r.best_acc - r.last_acc for r in results[(method, s)]) for s in settings]
                rows.append([method, *cells])
                rows.append([f"{method} best - last", *gaps])
                continue
            rows.append([method, *cells])
        parts += [title + ":", "", markdown_table(header, rows), ""]
    for key, title in (("noisy/codivide_auroc", "co-divide AUROC"), ("noisy/fixmatch_mask_rate", "FixMatch mask rate"),
                       ("noisy/pseudo_label_acc", "accuracy of the kept FixMatch pseudo labels")):
        rows = [[method, *(mean_spread(last_value(r, key) for r in results[(method, s)]) for s in settings)]
                for method in methods if any(key in row for r in results[(method, settings[0])] for row in r.history)]
        if rows:
            parts += [f"{title[0].upper()}{title[1:]} at the last epoch (%):", "", markdown_table(header, rows), ""]
    if "CE" in methods:
        rows = []
        ce = statistics.median(r.epoch_s for s in settings for r in results[("CE", s)])
        for method in methods:
            seconds = statistics.median(r.epoch_s for s in settings for r in results[(method, s)])
            rows.append([method, f"{seconds:.3f}", f"{seconds / ce:.2f}"])
        parts += ["Median seconds per training epoch over all runs (one torch thread per run):", "",
                  markdown_table(["method", "s / epoch", "ratio to CE"], rows), ""]
    return "\n".join(parts)


def codivide_cost(num_samples: int, repeats: int, gmm_samples: int) -> str:
    """The co-divide loss pass against a plain forward pass over the same loader, and the GMM's cost."""
    import lightning.pytorch as pl
    import torch

    from lightning_noisy.callbacks import CoDivideCallback
    from lightning_noisy.data import MNIST1DDataModule
    from lightning_noisy.methods import NoisyClassifier

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(num_samples=int(num_samples / 0.8), train_split=0.8, noise_type="symmetric",
                             noise_rate=0.4, batch_size=128)
    model = NoisyClassifier(backbone="cnn1d", num_classes=10, lr=0.1)
    callback = CoDivideCallback(start_epoch=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(model, data)
    loader = data.train_eval_dataloader()

    def forward_pass(no_autograd: Callable[[], Any]) -> float:
        start = time.perf_counter()
        model.eval()
        with no_autograd():
            for x, _, _ in loader:
                model(x)
        return time.perf_counter() - start

    forward, inference, loss_pass = [], [], []
    for _ in range(repeats):  # alternating, so that load from elsewhere affects all alike
        forward.append(forward_pass(torch.no_grad))
        inference.append(forward_pass(torch.inference_mode))
        trained_losses = callback.compute_losses(trainer, model)
        loss_pass.append(callback.last_pass_seconds)
    f, i = statistics.median(forward), statistics.median(inference)
    p = statistics.median(loss_pass)
    rows = [
        ["plain eval forward pass, `torch.no_grad`", f"{f:.3f}", "—"],
        ["plain eval forward pass, `torch.inference_mode`", f"{i:.3f}", "—"],
        ["CoDivideCallback loss pass (per-sample CE, gather)", f"{p:.3f}",
         f"{p / f:.2f} / {p / i:.2f} of the no_grad / inference_mode pass"],
        ["loss pass beyond the inference_mode pass, per sample", f"{p - i:+.3f}",
         f"{(p - i) * 1e6 / num_samples:+.2f} µs per sample (forward: {i * 1e6 / num_samples:.2f} µs)"],
    ]
    gmm_table, gmm_rate = gmm_cost(trained_losses, repeats, gmm_samples)
    extra_rate = (p - i) * 1e6 / num_samples
    return (f"Co-divide cost, {num_samples} training samples, cnn1d, one torch thread, median of {repeats}:\n\n"
            + markdown_table(["step", "seconds", "ratio / rate"], rows) + "\n" + gmm_table
            + f"\nThe co-divide beyond one inference_mode forward pass, per 1e6 samples: {extra_rate:.3f} s of loss "
            f"pass and at most {gmm_rate:.3f} s of GMM (default fit) = {extra_rate + gmm_rate:.3f} s\n")


def gmm_cost(trained_losses: Any, repeats: int, num_losses: int) -> tuple[str, float]:
    """Seconds of ``clean_probability`` on ``num_losses`` losses, fit to at most 1e5 of them and to all.

    Three sets of losses: a synthetic one whose Gaussian modes lie apart, a synthetic one of two skewed
    (gamma) modes on which EM takes all its 10 steps, and one drawn with replacement from
    ``trained_losses`` (a trained network's). The table gives the EM steps of a fit to all of them, and
    the share of samples that the capped fit divides otherwise than the fit to all. Returns the table
    and the largest seconds per 1e6 losses of the default (capped) fit.
    """
    import warnings

    import numpy as np
    import torch
    from sklearn.mixture import GaussianMixture

    from lightning_noisy.callbacks.co_divide import DEFAULT_MAX_FIT_SAMPLES, clean_probability, normalise_losses

    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(num_losses, generator=generator) < 0.6
    rng = np.random.default_rng(0)
    skewed = np.where(rng.random(num_losses) < 0.5, rng.gamma(1.0, 0.05, num_losses), rng.gamma(3.0, 0.8, num_losses))
    losses = {
        "synthetic, modes apart": torch.where(clean, 0.2, 2.0) + 0.3 * torch.rand(num_losses, generator=generator),
        "synthetic, two skewed modes": torch.from_numpy(skewed),
        "drawn from the trained network's": trained_losses[
            torch.randint(trained_losses.numel(), (num_losses,), generator=generator)],
    }
    rows, rates = [], {}
    for name, values in losses.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EM capped at 10 steps
            steps = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0).fit(
                normalise_losses(values).double().numpy()[:, None]).n_iter_
        divisions = {}
        for cap in (DEFAULT_MAX_FIT_SAMPLES, None):
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                divisions[cap] = clean_probability(values, max_fit_samples=cap) > 0.5
                seconds.append(time.perf_counter() - start)
            g = statistics.median(seconds)
            rates[name, cap] = g * 1e6 / num_losses
            fit = f"{cap:.0e}" if cap else "all"
            rows.append([f"{name} (EM: {steps} steps)", fit, f"{g:.3f}", f"{rates[name, cap]:.3f}"])
        differ = float((divisions[DEFAULT_MAX_FIT_SAMPLES] != divisions[None]).float().mean())
        rows[-2].append(f"{100 * differ:.3f}%")
        rows[-1].append("—")
    table = (f"\nGMM (`clean_probability`) on {num_losses:.0e} losses, median of {repeats}:\n\n"
             + markdown_table(["losses", "fit to", "seconds", "s per 1e6", "divided otherwise than fit to all"], rows))
    return table, max(rate for (_, cap), rate in rates.items() if cap == DEFAULT_MAX_FIT_SAMPLES)


def _rank_pass_seconds(rank: int, world_size: int, port: int, num_samples: int, repeats: int, out: Any) -> None:
    """One rank of :func:`codivide_ranks_cost`: the median seconds of the sharded loss pass, into ``out``."""
    import os

    import torch
    import torch.distributed as dist

    from lightning_noisy.callbacks.co_divide import per_sample_cross_entropy
    from lightning_noisy.data import MNIST1DDataModule
    from lightning_noisy.models import build_backbone

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        data = MNIST1DDataModule(num_samples=int(num_samples / 0.8), train_split=0.8, noise_type="symmetric",
                                 noise_rate=0.4, batch_size=128)
        data.prepare_data()
        data.setup("fit")
        torch.manual_seed(0)
        net = build_backbone("cnn1d", 10).eval()
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            per_sample_cross_entropy(net, data.train_eval_dataloader(), num_samples, "cpu", rank, world_size)
            seconds.append(time.perf_counter() - start)
        if rank == 0:
            out.put(statistics.median(seconds))
    finally:
        dist.destroy_process_group()


def codivide_ranks_cost(num_samples: int, repeats: int, world_sizes: Sequence[int]) -> str:
    """Seconds of the loss pass (:func:`per_sample_cross_entropy`) on 1, 2, ... CPU ranks (gloo), one thread each."""
    import socket

    import torch.multiprocessing as mp

    rows, single = [], None
    context = mp.get_context("spawn")
    for world_size in world_sizes:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = context.SimpleQueue()
        mp.start_processes(_rank_pass_seconds, args=(world_size, port, num_samples, repeats, out),
                           nprocs=world_size, join=True, start_method="spawn")
        seconds = out.get()
        single = seconds if single is None else single
        rows.append([str(world_size), f"{seconds:.3f}", f"{seconds / single:.2f}"])
    return (f"\nCo-divide loss pass on CPU ranks (gloo), {num_samples} training samples, cnn1d, one thread per "
            f"rank, median of {repeats}:\n\n" + markdown_table(["ranks", "seconds", f"ratio to {world_sizes[0]} rank(s)"], rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="sym:RATE or asym:RATE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=None, help="MNIST-1D samples, 80%% for training "
                        "(default: each config's own, the canonical 5,000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="a CLI override for every run, as --override=--trainer.max_epochs=5 (repeatable)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only measure the co-divide cost")
    parser.add_argument("--skip-cost", action="store_true", help="only run the accuracy grid")
    parser.add_argument("--cost-samples", type=int, default=40_000)
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--cost-ranks", nargs="+", type=int, default=[1, 2],
                        help="numbers of CPU ranks for the sharded loss pass (its first entry is the reference)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"),
                        help="folder for the tables; its runs/ keeps each finished run, reused by a rerun")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        settings = [parse_setting(s) for s in args.settings]
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.num_samples}" if args.num_samples else ""
    report = []
    if not args.skip_accuracy:
        start = time.perf_counter()
        print(f"{len(args.methods)} methods x {len(settings)} settings x {len(args.seeds)} seeds", flush=True)
        results = run_accuracy(args.methods, settings, args.seeds, args.num_samples, args.jobs, args.override,
                               args.out / "runs")
        report.append(accuracy_tables(results, args.methods, settings))
        report.append(f"({time.perf_counter() - start:.0f} s wall, {args.jobs} jobs)\n")
        runs = [{"method": m, "setting": label(*s), **dataclasses.asdict(r)} for (m, s), rs in results.items()
                for r in rs]
        (args.out / f"dividemix{suffix}.json").write_text(json.dumps(runs, indent=1, default=str))
    if not args.skip_cost:
        report.append(codivide_cost(args.cost_samples, args.cost_repeats, 1_000_000))
        report.append(codivide_ranks_cost(args.cost_samples, args.cost_repeats, args.cost_ranks))
    text = "\n".join(report)
    print(text)
    (args.out / f"dividemix{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
