"""Under DDP our own ``self.log`` calls raise no Lightning warning (issue 16, "clean DDP logs").

Lightning warns once per name logged at epoch level without ``sync_dist=True`` under DDP, and once per call
whose ``batch_size`` it has to guess. Two CPU ranks fit a plain module with every callback of the package
(in three fits: the logits transforms of SOP and forward correction exclude each other, and AUM's threshold
samples need ``C + 1`` outputs), and each method's module with validation, recording every warning inside the
workers, where the assertions run. One pair of worker processes serves all fits: each worker sets the
variables a cluster launcher would (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``), so every
``Trainer(strategy="ddp", devices=2)`` joins the gloo group the worker opened instead of launching processes.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distributed import free_port
from helpers import trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn

#: the warnings ``LightningModule.log`` and its result collection give (sync_dist, batch_size, dtype, hooks)
FROM_LOG = re.compile(r"self\.log\(|sync_dist")
MLP = {"backbone": "mlp", "backbone_kwargs": {"in_features": 40, "hidden": [16]}}


class Tiny(pl.LightningModule):
    """A user's module: ``x, y = batch`` and cross-entropy. It logs nothing, so every warning about logging is ours."""

    def __init__(self, outputs: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _callbacks() -> list[pl.Callback]:
    from lightning_noisy.callbacks import (
        CoDivideCallback,
        CurriculumCallback,
        ELRCallback,
        ForwardCorrectionCallback,
        LabelCorrectionCallback,
        NoisyLabelMonitor,
        WarmupEntropyCallback,
    )

    return [
        # prior and entropy terms: their per-step values are logged by the callback (noisy/*_loss)
        LabelCorrectionCallback(update="soft", num_average_epochs=1, start_epoch=0, prior_weight=0.5,
                                entropy_weight=0.2),
        NoisyLabelMonitor(), ELRCallback(), CoDivideCallback(start_epoch=0), WarmupEntropyCallback(warmup_epochs=1),
        ForwardCorrectionCallback(estimate_epoch=0), CurriculumCallback(curriculum_epoch=0, stage_epochs=(1, 2)),
    ]


def _sop() -> list[pl.Callback]:
    from lightning_noisy.callbacks import SOPCallback

    return [SOPCallback()]


def _aum() -> list[pl.Callback]:
    from lightning_noisy.callbacks import AUMCallback

    return [AUMCallback(threshold_samples=True)]


def _method(name: str, **kwargs: Any) -> Callable[[], pl.LightningModule]:
    def make() -> pl.LightningModule:
        import lightning_noisy.methods as methods

        return getattr(methods, name)(num_classes=10, **MLP, **kwargs)

    return make


class Fit(NamedTuple):
    module: Callable[[], pl.LightningModule]
    callbacks: Callable[[], list[pl.Callback]]
    epochs: int  # past warm-up, so every hook that logs has logged
    logs: set[str]  # names the fit must log, one at least from every place that logs (the test is not vacuous)
    tensorboard: bool = False


CALLBACK_FITS = {
    "callbacks": Fit(Tiny, _callbacks, 3, {
        "noisy/joint_optimization_loss", "noisy/confidence_penalty_loss", "noisy/elr_loss", "noisy/recovery_acc",
        "noisy/train_pred_acc", "noisy/elr_term", "codivide/labelled_fraction", "warmup/confidence_penalty",
        "noisy/transition_mae", "curriculum/active_fraction"}, tensorboard=True),
    "SOPCallback": Fit(Tiny, _sop, 2, {"noisy/sop_u_mean"}),
    "AUMCallback": Fit(lambda: Tiny(outputs=11), _aum, 2, {"aum/threshold", "noisy/aum_auroc"}),
}
HELD_OUT = {"test/acc", "test/acc_best"}
METHOD_FITS = {
    "NoisyClassifier": Fit(_method("NoisyClassifier"), list, 2, {"train/loss", *HELD_OUT}),
    "CoTeaching": Fit(_method("CoTeaching", num_gradual=1), list, 2, {
        "train/loss_a", "train/forget_rate", "noisy/pure_ratio", "test/acc_a", *HELD_OUT}),
    "DivideMix": Fit(_method("DivideMix", warmup_epochs=1, rampup_length=1), list, 2, {
        "train/loss_a", "train/lambda_u", "codivide/labelled_fraction", "noisy/codivide_auroc", *HELD_OUT}),
    "ProMix": Fit(_method("ProMix", warmup_epochs=1, rho_rampup_epochs=1), list, 2, {
        "train/loss", "promix/rho", "noisy/promix_selection_precision", "promix/kept_fraction", *HELD_OUT}),
    "SOPPlus": Fit(_method("SOPPlus"), list, 2, {"train/consistency", "noisy/sop_u_mean", *HELD_OUT}),
    "ELRPlus": Fit(_method("ELRPlus"), list, 2, {"train/loss_a", "train/elr_b", "noisy/elr_target_acc_a", *HELD_OUT}),
    "SelfLearning": Fit(_method("SelfLearning", warmup_epochs=1, num_sampled=40, num_prototypes=4), list, 2, {
        "train/loss_pseudo", "noisy/pseudo_label_recovery", *HELD_OUT}),
    "FeatureMixup": Fit(_method("FeatureMixup"), list, 2, {"train/loss_mix", "train/attention_within", *HELD_OUT}),
    "JointOptimization": Fit(_method("JointOptimization", step1_epochs=1, start_epoch=0, num_average_epochs=1), list,
                             2, {"train/loss", "noisy/joint_optimization_loss", "noisy/recovery_acc", *HELD_OUT}),
}
FITS = {**CALLBACK_FITS, **METHOD_FITS}
# fork: the workers start with torch and Lightning imported (seconds, not the half minute two spawned
# interpreters take to import them on a loaded 2-core machine); spawn where fork is unsafe or missing
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _clear_warning_caches() -> None:
    """Lightning says each warning once per process: forget what it said, so every fit warns afresh."""
    for name, module in list(sys.modules.items()):
        cache = getattr(module, "warning_cache", None) if name.startswith("lightning") else None
        if isinstance(cache, WarningCache):
            cache.clear()


def _fit(name: str, folder: str) -> list[str]:
    """Fit ``name`` on this rank; the warnings about our ``self.log`` calls it raised."""
    from lightning_noisy.data import MNIST1DDataModule

    fit = FITS[name]
    pl.seed_everything(0, verbose=False)
    # 80 training samples per rank in 4 full batches of 20
    data = MNIST1DDataModule(num_samples=200, batch_size=20, noise_type="symmetric", noise_rate=0.4, noise_seed=0)
    logger = TensorBoardLogger(folder, name=name) if fit.tensorboard else False
    run = trainer(devices=2, strategy=DDPStrategy(), max_epochs=fit.epochs, callbacks=fit.callbacks(), logger=logger)
    _clear_warning_caches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(fit.module(), datamodule=data)
    assert run.world_size == 2
    assert fit.logs <= set(run.callback_metrics), f"{name} did not log {sorted(fit.logs - set(run.callback_metrics))}"
    return [f"{name}: {w.category.__name__}: {w.message}" for w in caught if FROM_LOG.search(str(w.message))]


def _worker(rank: int, world_size: int, port: int, names: list[str], folder: str) -> None:
    # what torchrun or a cluster sets: Lightning then joins this process group instead of launching processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        offending = [line for name in names for line in _fit(name, folder)]
        assert not offending, f"rank {rank}: our self.log calls made Lightning warn:\n" + "\n".join(offending)
    finally:
        dist.destroy_process_group()


def _run(names: list[str], folder: Path) -> None:
    mp.start_processes(_worker, args=(2, free_port(), names, str(folder)), nprocs=2, join=True,
                       start_method=START_METHOD)


@pytest.mark.ddp
def test_two_rank_fits_with_every_callback_and_the_methods_log_without_warnings(tmp_path: Path) -> None:
    _run(list(FITS), tmp_path)
