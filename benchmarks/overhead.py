"""Time per training epoch of one Trainer with and without the package's per-sample callbacks.

The same ``NoisyClassifier`` (cnn1d, SGD, lr 0.1) on ``MNIST1DDataModule`` (40% symmetric noise) is
fitted from the same seed as it is (``plain``), with ``LabelCorrectionCallback(update="soft",
start_epoch=0, num_average_epochs=10)`` (labels updated at every epoch: the worst case), and with
``NoisyLabelMonitor``. There is no logger (so no histograms are written), no checkpointing, no
progress bar and no validation: only training epochs are timed, from ``on_train_epoch_start`` to
``on_train_epoch_end``, which includes the callbacks' epoch-boundary work (it runs after the last
training batch). The first epoch of every fit is a warm-up and is not counted. The configurations
take turns (plain, label correction, monitor, plain, ...) for ``--repeats`` rounds so that load
from elsewhere on the machine affects them alike. Prints the median seconds per epoch of each and
its ratio to ``plain``.

    .venv/bin/python benchmarks/overhead.py                       # 50,000 samples: 40,000 for training
    .venv/bin/python benchmarks/overhead.py --num-samples 5000 --epochs 2 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_noisy.callbacks import LabelCorrectionCallback, NoisyLabelMonitor
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import NoisyClassifier

from common import markdown_table

PLAIN = "plain"
# the configurations compared, in the order they take turns; each builds fresh callbacks
VARIANTS: dict[str, Callable[[], list[Callback]]] = {
    PLAIN: lambda: [],
    "LabelCorrectionCallback": lambda: [LabelCorrectionCallback(update="soft", start_epoch=0, num_average_epochs=10)],
    "NoisyLabelMonitor": lambda: [NoisyLabelMonitor()],
}


class EpochTimer(Callback):
    """Wall time of every training epoch, from ``on_train_epoch_start`` to ``on_train_epoch_end``.

    Put it last among the callbacks, so that its end comes after the other callbacks' epoch-end hooks.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._start)


def time_epochs(callbacks: list[Callback], num_samples: int, epochs: int, seed: int = 0) -> tuple[list[float], int]:
    """Seconds of each training epoch after the first, for one fit with ``callbacks``; and the training set size."""
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(
        num_samples=num_samples, train_split=0.8, noise_type="symmetric", noise_rate=0.4, noise_seed=seed
    )
    model = NoisyClassifier(backbone="cnn1d", num_classes=10, optimizer="sgd", lr=0.1)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule)
    return timer.times[1:], datamodule.noisy_labels.numel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=50_000, help="MNIST-1D samples, train + test")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is not timed")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of fits, each configuration once per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is a warm-up), got {args.epochs}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per fit
    # the data set is in memory: worker processes would only add their own overhead to both sides
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    num_train = 0
    for round_ in range(args.repeats):
        for name, make_callbacks in VARIANTS.items():
            epoch_times, num_train = time_epochs(make_callbacks(), args.num_samples, args.epochs)
            times[name] += epoch_times
            print(f"round {round_ + 1}/{args.repeats} {name}: " + ", ".join(f"{t:.2f}" for t in epoch_times) + " s")

    print(
        f"\nMNIST-1D, {num_train} training samples, {args.epochs} epochs per fit (first not timed),"
        f" {args.repeats} round(s); torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
    )
    plain = statistics.median(times[PLAIN])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append([name, len(values), f"{median:.3f}", "—" if name == PLAIN else f"{median / plain:.3f}"])
    print(markdown_table(["configuration", "epochs timed", "median s/epoch", "ratio to plain"], rows))


if __name__ == "__main__":
    main()
