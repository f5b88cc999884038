"""The ``lightning-noisy`` command: LightningCLI in subclass mode over the package's modules and data."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningCLI

# imported so that short class names (``NoisyClassifier``, ``MNIST1DDataModule``) resolve in configs
import lightning_noisy.callbacks  # noqa: F401
import lightning_noisy.data  # noqa: F401
import lightning_noisy.methods  # noqa: F401


class NoisyCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule (``class_path`` in the config).

    Callbacks are added from the command line with ``--trainer.callbacks+=LabelCorrectionCallback``.
    """


def build_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> NoisyCLI:
    """Parse ``args`` (``sys.argv`` when ``None``), build the trainer, model and data, and run the subcommand."""
    return NoisyCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **kwargs,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``lightning-noisy`` and ``python -m lightning_noisy``.

    ``lightning-noisy search ...`` runs :mod:`lightning_noisy.search.command`; every other subcommand is
    LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["search"]:
        from lightning_noisy.search.command import main as search

        search(argv[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
