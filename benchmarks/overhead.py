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
its ratio to ``plain``; and, since the machine's speed drifts from minute to minute, the ratio within
each round (median epoch of the configuration over median epoch of its baseline in the same round):
their median and range.

    .venv/bin/python benchmarks/overhead.py                       # 50,000 samples: 40,000 for training
    .venv/bin/python benchmarks/overhead.py --num-samples 5000 --epochs 2 --repeats 1   # a quick check
    .venv/bin/python benchmarks/overhead.py --variants AUMCallback "aum package (AUMCalculator)"
    .venv/bin/python benchmarks/overhead.py --variants ELRCallback SOPCallback
    .venv/bin/python benchmarks/overhead.py --variants ELRCallback SOPCallback --channels 128   # a wider network

The callbacks' work is per step and nearly independent of the network, so their ratio to ``plain`` falls as
a step costs more: ``--batch-size`` and ``--channels`` (the width of ``cnn1d``, 32 in the configs) show how.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

from lightning_noisy.callbacks import AUMCallback, ELRCallback, LabelCorrectionCallback, NoisyLabelMonitor, SOPCallback
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import NoisyClassifier

from common import markdown_table

PLAIN = "plain"
PLAIN_AUM = "plain (C+1 outputs)"


class AUMPackageCallback(Callback):
    """The ``aum`` package's ``AUMCalculator.update`` at every training step, as its README wires it."""

    def __init__(self) -> None:
        from aum import AUMCalculator

        self.calculator = AUMCalculator(save_dir="unused")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _, targets, index = batch
        self.calculator.update(outputs["logits"].detach(), targets, index.tolist())


# the configurations compared, in the order they take turns: (fresh callbacks, number of outputs, baseline)
VARIANTS: dict[str, tuple[Callable[[], list[Callback]], int, str]] = {
    PLAIN: (lambda: [], 10, PLAIN),
    "LabelCorrectionCallback": (
        lambda: [LabelCorrectionCallback(update="soft", start_epoch=0, num_average_epochs=10)], 10, PLAIN
    ),
    "NoisyLabelMonitor": (lambda: [NoisyLabelMonitor()], 10, PLAIN),
    "ELRCallback": (lambda: [ELRCallback()], 10, PLAIN),
    "SOPCallback": (lambda: [SOPCallback()], 10, PLAIN),
    PLAIN_AUM: (lambda: [], 11, PLAIN_AUM),
    "AUMCallback": (lambda: [AUMCallback(histogram=False)], 11, PLAIN_AUM),
    "aum package (AUMCalculator)": (lambda: [AUMPackageCallback()], 11, PLAIN_AUM),
}


def with_baselines(variants: Sequence[str]) -> list[str]:
    """The configurations ``variants`` and their baselines, in :data:`VARIANTS`' order (the order they take turns)."""
    baselines = {VARIANTS[name][2] for name in variants}
    return [name for name in VARIANTS if name in variants or name in baselines]


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


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active (on CPU the backward pass runs in this thread too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


class EpochWindow:
    """Something measured over the second training epoch, per step: callbacks' hooks, forward, loss, backward,
    optimiser step and the epoch-boundary work. :meth:`begin` and :meth:`end` start and stop the measurement.

    :attr:`first` goes before the other callbacks and :attr:`last` after them, so the window spans their hooks.
    """

    def __init__(self) -> None:
        self.open = False
        self.steps = 0
        outer = self

        class First(Callback):
            @override
            def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                if trainer.current_epoch == 1:
                    outer.open = True
                    outer.begin()

        class Last(Callback):
            @override
            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                   batch: Any, batch_idx: int) -> None:
                outer.steps += outer.open

            @override
            def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                if outer.open:
                    outer.end()
                    outer.open = False

        self.first, self.last = First(), Last()

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class EpochOpCount(EpochWindow):
    """ATen ops of the second training epoch (:class:`EpochWindow`). A count, unlike a time, does not drift with
    the machine's speed."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = OpCounter()
        self.ops = 0

    @override
    def begin(self) -> None:
        self.mode.__enter__()

    @override
    def end(self) -> None:
        self.mode.__exit__(None, None, None)
        self.ops = self.mode.count

    @property
    def per_step(self) -> float:
        return self.ops / max(self.steps, 1)


def fit(
    callbacks: list[Callback], num_samples: int, epochs: int, num_outputs: int = 10, seed: int = 0,
    batch_size: int = 128, channels: int = 32,
) -> int:
    """One fit of ``NoisyClassifier`` (cnn1d) with ``callbacks``, training epochs only; returns the training set size."""
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(
        num_samples=num_samples, train_split=0.8, noise_type="symmetric", noise_rate=0.4, noise_seed=seed,
        batch_size=batch_size,
    )
    model = NoisyClassifier(backbone="cnn1d", num_classes=num_outputs, optimizer="sgd", lr=0.1,
                            backbone_kwargs={"channels": channels})
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule)
    return datamodule.noisy_labels.numel()


def time_epochs(callbacks: list[Callback], *args: Any, **kwargs: Any) -> tuple[list[float], int]:
    """Seconds of each training epoch after the first, for one :func:`fit` with ``callbacks``; and the training set size."""
    timer = EpochTimer()
    num_train = fit([*callbacks, timer], *args, **kwargs)
    return timer.times[1:], num_train


def count_ops(callbacks: list[Callback], num_samples: int, *args: Any, **kwargs: Any) -> float:
    """ATen ops per step of the second epoch of a two-epoch :func:`fit` with ``callbacks`` (:class:`EpochOpCount`)."""
    counter = EpochOpCount()
    fit([counter.first, *callbacks, counter.last], num_samples, 2, *args, **kwargs)
    return counter.per_step


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=50_000, help="MNIST-1D samples, train + test")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is not timed")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (the callbacks' work "
                        "is mostly per step, so a larger batch spreads it over more samples)")
    parser.add_argument("--channels", type=int, default=32, help="width of the cnn1d network (the configs': 32)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of fits, each configuration once per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="configurations to time (each with its baseline)")
    args = parser.parse_args(argv)
    chosen = {name: VARIANTS[name] for name in with_baselines(args.variants)}
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is a warm-up), got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.channels < 1:
        parser.error(f"--channels must be >= 1, got {args.channels}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" lines per fit
    # the data set is in memory: worker processes would only add their own overhead to both sides
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    sizes = {"batch_size": args.batch_size, "channels": args.channels}
    ops = {name: count_ops(make(), args.num_samples, outputs, **sizes) for name, (make, outputs, _) in chosen.items()}
    times: dict[str, list[float]] = {name: [] for name in chosen}
    round_medians: dict[str, list[float]] = {name: [] for name in chosen}
    num_train = 0
    for round_ in range(args.repeats):
        for name, (make_callbacks, num_outputs, _) in chosen.items():
            epoch_times, num_train = time_epochs(make_callbacks(), args.num_samples, args.epochs, num_outputs, **sizes)
            times[name] += epoch_times
            round_medians[name].append(statistics.median(epoch_times))
            print(f"round {round_ + 1}/{args.repeats} {name}: " + ", ".join(f"{t:.2f}" for t in epoch_times) + " s")

    print(
        f"\nMNIST-1D, {num_train} training samples, cnn1d of {args.channels} channels, batch size {args.batch_size},"
        f" {args.epochs} epochs per fit"
        " (first not timed),"
        f" {args.repeats} round(s); torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
    )
    rows = []
    for name, values in times.items():
        median, baseline = statistics.median(values), VARIANTS[name][2]
        ratio = within = extra_ops = "—"
        if name != baseline:
            extra_ops = f"{ops[name] - ops[baseline]:+.1f}"
            ratio = f"{median / statistics.median(times[baseline]):.3f}"
            paired = [a / b for a, b in zip(round_medians[name], round_medians[baseline])]
            within = f"{statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f})"
        rows.append([name, len(values), f"{median:.3f}", baseline, ratio, within, f"{ops[name]:.1f}", extra_ops])
    print(markdown_table(["configuration", "epochs timed", "median s/epoch", "baseline", "ratio",
                          "ratio within a round: median (range)", "ATen ops / step", "vs baseline"], rows))


if __name__ == "__main__":
    main()
