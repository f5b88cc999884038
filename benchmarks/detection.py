"""Mislabelled-sample detection on MNIST-1D: AUM and Co-teaching's small-loss selection against cleanlab.

For each noise setting and seed, with the same cnn1d network, SGD at a constant lr 0.1 and the same
number of epochs everywhere:

- **AUM**: two runs of ``AUMCallback`` with disjoint threshold sets (``threshold_run`` 0 and 1, an
  ``11``-output model), combined by the two-run rule; its AUROC scores each sample by its AUM from the
  run where it was an ordinary sample.
- **Co-teaching**: ``CoTeaching`` with the forget rate set to the noise rate (Han et al. 2018); after
  training, the ``1 - rate`` share of the training set with the smallest loss (mean of both networks,
  eval mode) is kept; the loss is the AUROC score.
- **co-divide**: ``DivideMix`` (warm-up 10 epochs, the paper's CIFAR-10 setting, and its per-setting
  ``lambda_u``); after training, each network's per-sample losses are divided by the 2-component GMM
  (``clean_probability``) and the two clean probabilities averaged; a sample is removed when that
  average is at most 0.5 (``p_threshold``); the average is the AUROC score.
- **cleanlab**: ``cleanlab.filter.find_label_issues`` on 5-fold out-of-fold predicted probabilities of
  the same network and epochs (one fit per fold, the fold left out with ``exclude_file``); the AUROC
  score is ``cleanlab.rank.get_label_quality_scores``.

Detection is scored against the true mislabelled mask (positive = mislabelled): precision, recall,
F1 and AUROC. Then a fresh CE network is trained on each cleaned set (``exclude_file``) and its best
and last test accuracy are compared with CE on all data.

    .venv/bin/python benchmarks/detection.py                       # canonical split, seeds 0 1 2
    .venv/bin/python benchmarks/detection.py --num-samples 25000 --seeds 0   # the 20,000-sample variant
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_noisy.callbacks import AUMCallback
from lightning_noisy.callbacks.aum import combine_aum_runs
from lightning_noisy.callbacks.co_divide import clean_probability
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import CoTeaching, DivideMix, NoisyClassifier
from lightning_noisy.metrics.selection import selection_scores

from common import ASYMMETRIC_CLASS_MAP, markdown_table, mean_spread
from dividemix import dividemix_settings

NUM_CLASSES = 10
SETTINGS = (("symmetric", 0.2), ("symmetric", 0.4), ("asymmetric", 0.4))
DETECTORS = ("AUM", "Co-teaching", "co-divide", "cleanlab")
METRICS = ("precision", "recall", "f1", "auroc")


@dataclass(frozen=True)
class Setting:
    kind: str
    rate: float
    num_samples: int
    seed: int
    epochs: int
    folds: int

    @property
    def label(self) -> str:
        return f"{'sym.' if self.kind == 'symmetric' else 'asym.'} {round(self.rate * 100)}%"


def _datamodule(setting: Setting, exclude: Tensor | None, workdir: Path) -> MNIST1DDataModule:
    exclude_file = None
    if exclude is not None:
        exclude_file = str(workdir / f"exclude_{time.perf_counter_ns()}.pt")
        torch.save(exclude.to(torch.long), exclude_file)
    return MNIST1DDataModule(
        num_samples=setting.num_samples, batch_size=128, noise_type=setting.kind, noise_rate=setting.rate,
        noise_seed=setting.seed, class_map=ASYMMETRIC_CLASS_MAP if setting.kind == "asymmetric" else None,
        exclude_file=exclude_file,
    )


def _fit(model: pl.LightningModule, datamodule: MNIST1DDataModule, epochs: int, callbacks: list[Any] = ()) -> float:
    """Fit quietly; returns the last test accuracy."""
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule)
    return float(trainer.callback_metrics["test/acc"])


def _classifier(setting: Setting, outputs: int = NUM_CLASSES) -> NoisyClassifier:
    return NoisyClassifier(backbone="cnn1d", num_classes=outputs, optimizer="sgd", lr=0.1, scheduler="constant")


@torch.no_grad()
def _predict(model: pl.LightningModule, datamodule: MNIST1DDataModule, nets: Sequence[torch.nn.Module]) -> tuple[Tensor, Tensor]:
    """``(index [N], mean softmax of ``nets`` [N, C])`` over the training set in order, eval mode."""
    model.eval()
    index, probs = [], []
    for x, _, idx in datamodule.train_eval_dataloader():
        probs.append(torch.stack([F.softmax(net(x), 1) for net in nets]).mean(0))
        index.append(idx)
    return torch.cat(index), torch.cat(probs)


def _detect_aum(setting: Setting, workdir: Path) -> tuple[Tensor, Tensor]:
    flagged, masks, scores = [], [], []
    for run in (0, 1):
        pl.seed_everything(setting.seed + 100 * run, verbose=False)
        callback = AUMCallback(threshold_run=run, threshold_seed=setting.seed, histogram=False)
        _fit(_classifier(setting, NUM_CLASSES + 1), _datamodule(setting, None, workdir), setting.epochs, [callback])
        flagged.append(callback.flagged)
        masks.append(callback.threshold_mask)
        scores.append(callback.aum.float())
    removed = combine_aum_runs(flagged, masks)
    score = torch.where(masks[0], scores[1], scores[0])  # each sample's AUM from a run where it was ordinary
    return removed, score


def _detect_coteaching(setting: Setting, workdir: Path) -> tuple[Tensor, Tensor]:
    pl.seed_everything(setting.seed, verbose=False)
    datamodule = _datamodule(setting, None, workdir)
    model = CoTeaching(backbone="cnn1d", num_classes=NUM_CLASSES, forget_rate=setting.rate, num_gradual=10,
                       seed=setting.seed, optimizer="sgd", lr=0.1, weight_decay=5e-4)
    _fit(model, datamodule, setting.epochs)
    losses = torch.zeros(datamodule.noisy_labels.numel())
    with torch.no_grad():
        model.eval()
        for x, y, idx in datamodule.train_eval_dataloader():
            losses[idx] = (F.cross_entropy(model.net_a(x), y, reduction="none")
                           + F.cross_entropy(model.net_b(x), y, reduction="none")) / 2
    keep = int(round((1 - setting.rate) * losses.numel()))
    removed = torch.ones(losses.numel(), dtype=torch.bool)
    removed[torch.argsort(losses, stable=True)[:keep]] = False
    return removed, -losses


def _detect_codivide(setting: Setting, workdir: Path) -> tuple[Tensor, Tensor]:
    pl.seed_everything(setting.seed, verbose=False)
    datamodule = _datamodule(setting, None, workdir)
    model = DivideMix(backbone="cnn1d", num_classes=NUM_CLASSES, warmup_epochs=10, seed=setting.seed,
                      optimizer="sgd", lr=0.1, **dividemix_settings(setting.kind, setting.rate))
    _fit(model, datamodule, setting.epochs)
    loader, n = datamodule.train_eval_dataloader(), datamodule.noisy_labels.numel()
    probability = torch.stack([
        clean_probability(model.per_sample_losses(net, loader, n).cpu(), seed=setting.seed)
        for net in (model.net_a, model.net_b)
    ]).mean(0)
    return probability <= model.hparams.p_threshold, probability


def _detect_cleanlab(setting: Setting, workdir: Path) -> tuple[Tensor, Tensor]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probe = _datamodule(setting, None, workdir)
    probe.setup("fit")
    labels = probe.noisy_labels
    n = labels.numel()
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(setting.seed)) % setting.folds
    out_of_fold = torch.zeros(n, NUM_CLASSES)
    for fold in range(setting.folds):
        pl.seed_everything(setting.seed + fold, verbose=False)
        held_out = torch.nonzero(folds == fold).squeeze(1)
        model, datamodule = _classifier(setting), _datamodule(setting, held_out, workdir)
        _fit(model, datamodule, setting.epochs)
        index, probs = _predict(model, datamodule, [model])
        mine = folds[index] == fold
        out_of_fold[index[mine]] = probs[mine]
    issues = find_label_issues(labels.numpy(), out_of_fold.numpy(), n_jobs=1)  # no pool inside a worker
    quality = get_label_quality_scores(labels.numpy(), out_of_fold.numpy())
    return torch.from_numpy(issues), torch.from_numpy(quality).float()


def _retrain(setting: Setting, removed: Tensor | None, workdir: Path) -> tuple[float, float]:
    if removed is not None and bool(removed.all()):
        print(f"{setting.label} seed {setting.seed}: every sample was flagged; no retraining", flush=True)
        return math.nan, math.nan
    pl.seed_everything(setting.seed, verbose=False)
    model = _classifier(setting)
    exclude = None if removed is None else torch.nonzero(removed).squeeze(1)
    last = _fit(model, _datamodule(setting, exclude, workdir), setting.epochs)
    return float(model.best_acc), last


def run_setting(setting: Setting) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {"setting": setting}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        probe = _datamodule(setting, None, workdir)
        probe.setup("fit")
        is_clean = probe.noisy_labels == probe.clean_labels
        for name, detect in zip(DETECTORS, (_detect_aum, _detect_coteaching, _detect_codivide, _detect_cleanlab)):
            start = time.perf_counter()
            removed, score = detect(setting, workdir)
            scores = selection_scores(score, ~removed, is_clean, positive="noisy")
            result[name] = {k: float(v) for k, v in scores.items()}
            result[name]["removed"] = float(removed.float().mean())
            print(f"{setting.label} seed {setting.seed} {name}: F1 {result[name]['f1']:.3f}, "
                  f"removed {result[name]['removed']:.3f}", flush=True)
            result[name]["retrain"] = _retrain(setting, removed, workdir)
            result[name]["seconds"] = time.perf_counter() - start
        result["CE"] = {"retrain": _retrain(setting, None, workdir)}
    print(f"done: {setting.label} seed {setting.seed}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D samples, 80%% for training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds for cleanlab")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    settings = [Setting(kind, rate, args.num_samples, seed, args.epochs, args.folds)
                for kind, rate in SETTINGS for seed in args.seeds]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_setting, settings))
    else:
        results = [run_setting(s) for s in settings]
    wall = time.perf_counter() - start
    labels = [f"{'sym.' if k == 'symmetric' else 'asym.'} {round(r * 100)}%" for k, r in SETTINGS]

    def cell(label: str, name: str, pick: Any, scale: float = 100.0) -> str:
        return mean_spread([pick(r[name]) for r in results if r["setting"].label == label], scale)

    print(f"\nMNIST-1D, {args.num_samples} samples (80% train), cnn1d, SGD lr 0.1, {args.epochs} epochs, "
          f"seeds {args.seeds}; {wall:.0f} s wall with {args.jobs} job(s). Mean ± std, in %.\n")
    print("Detection of mislabelled samples (positive = mislabelled)\n")
    rows = [[label, name, *(cell(label, name, lambda r, m=m: r[m]) for m in (*METRICS, "removed"))]
            for label in labels for name in DETECTORS]
    print(markdown_table(["noise", "detector", "precision", "recall", "F1", "AUROC", "removed"], rows))
    print("\nTest accuracy of CE retrained on each cleaned set (best / last)\n")
    rows = [[label, *(f"{cell(label, name, lambda r: r['retrain'][0])} / {cell(label, name, lambda r: r['retrain'][1])}"
                      for name in ("CE", *DETECTORS))] for label in labels]
    print(markdown_table(["noise", "CE on all data", *(f"CE without {d}'s flags" for d in DETECTORS)], rows))
    print("\nSeconds per detector (training runs included), mean over seeds\n")
    rows = [[label, *(cell(label, name, lambda r: r["seconds"], scale=1.0) for name in DETECTORS)] for label in labels]
    print(markdown_table(["noise", *DETECTORS], rows))


if __name__ == "__main__":
    main()
