"""``LabelCorrectionCallback()`` with no arguments, dropped into a plain user classifier, on MNIST-1D.

The classifier knows nothing of the package (``x, y = batch``, ``F.cross_entropy``, its own small 1-D CNN,
SGD with momentum 0.9); the callback is constructed with its defaults (``start_epoch="auto"``, prior and
entropy terms on). Each run: MNIST-1D (4,000 training / 1,000 test samples) with symmetric noise, 60 epochs,
batch 64 per rank on 2 CPU ranks (DDP, gloo). Prints the start epoch the callback found, the recovery
accuracy of the labels at the end and the last test accuracy, as a markdown table::

    .venv/bin/python benchmarks/dropin_defaults.py                         # the grid below, seed 0-2 at 40%
    .venv/bin/python benchmarks/dropin_defaults.py --runs 0.4:0.1:0        # one run: rate:lr:seed
    .venv/bin/python benchmarks/dropin_defaults.py --runs 0.4:0.1:1 --start 18 22 26   # fixed starts instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noisy.callbacks import LabelCorrectionCallback
from lightning_noisy.data import MNIST1DDataModule

#: rate:lr:seed of the default grid: every noise rate at lr 0.1, seeds 0-2 at 40% at both learning rates
DEFAULT_RUNS = ("0.0:0.1:0", "0.2:0.1:0", "0.4:0.1:0", "0.4:0.1:1", "0.4:0.1:2", "0.6:0.1:0", "0.8:0.1:0",
                "0.4:0.05:0", "0.4:0.05:1", "0.4:0.05:2")


class UserClassifier(pl.LightningModule):
    """A classifier as a user writes it, with no knowledge of the package."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 10, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(x.shape[0], 1, -1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def one_run(rate: float, lr: float, seed: int, epochs: int, devices: int, start: str = "auto") -> None:
    """Fit once and print a ``RESULT {json}`` line (rank 0)."""
    pl.seed_everything(seed, verbose=False)
    data = MNIST1DDataModule(noise_type="symmetric", noise_rate=rate, noise_seed=seed, batch_size=128 // devices)
    correction = LabelCorrectionCallback() if start == "auto" else LabelCorrectionCallback(start_epoch=int(start))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, callbacks=[correction], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(UserClassifier(lr), data)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print("RESULT " + json.dumps({
            "rate": rate, "lr": lr, "seed": seed, "start": correction.resolved_start_epoch,
            "recovery": float(metrics["noisy/recovery_acc"]), "test_acc": float(metrics["val_acc"]),
            "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="rate:lr:seed")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--start", nargs="+", default=["auto"], help="'auto' (the default) or fixed start epochs")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run in this process
    args = parser.parse_args()
    if args.single:
        rate, lr, seed = args.runs[0].split(":")
        one_run(float(rate), float(lr), int(seed), args.epochs, args.devices, args.start[0])
        return
    rows = []
    for run, start in [(run, start) for run in args.runs for start in args.start]:
        # each run in its own process: Lightning's DDP launcher restarts the script per fit
        command = [sys.executable, os.path.abspath(__file__), "--single", "--runs", run, "--epochs", str(args.epochs),
                   "--devices", str(args.devices), "--start", start]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{run}: {result}", flush=True)
        rows.append(result)
    print("\n| noise | lr | seed | start epoch | recovery (%) | last test acc (%) | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:.0%} | {r['lr']} | {r['seed']} | {r['start']} | {100 * r['recovery']:.1f} | "
              f"{100 * r['test_acc']:.1f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
