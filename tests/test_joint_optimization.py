"""JointOptimization: the two-step schedule, step 2's fresh start, and a real MNIST-1D run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from helpers import trainer
from lightning_noisy.callbacks import LabelCorrectionCallback
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import JointOptimization
from lightning_noisy.methods.joint_optimization import reinitialise, two_step_lr
from lightning_noisy.models import build_backbone


def test_two_step_learning_rate() -> None:
    lrs = [two_step_lr(e, 3, 0.1, 0.2, [2, 4], 0.1) for e in range(9)]
    torch.testing.assert_close(lrs, [0.1, 0.1, 0.1, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002])


def test_reinitialise_is_a_fixed_function_of_the_seed() -> None:
    a, b = build_backbone("cnn1d", 10), build_backbone("cnn1d", 10)
    reinitialise(a, seed=5)
    torch.manual_seed(123)  # the global state must neither matter nor change
    state = torch.get_rng_state()
    reinitialise(b, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


class Step2Probe(pl.Callback):
    """Looks at the network before the first optimiser step of step 2 (after the module's epoch-start hook)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: JointOptimization, batch, batch_idx: int) -> None:
        if trainer.current_epoch == pl_module.step1_epochs and batch_idx == 0:
            fresh = build_backbone("cnn1d", 10)
            reinitialise(fresh, pl_module.hparams.step2_seed)
            self.fresh_equal = all(torch.equal(x, y) for x, y in zip(fresh.parameters(), pl_module.backbone.parameters()))
            self.optimizer_state_empty = len(trainer.optimizers[0].state) == 0
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.slow
def test_mnist1d_run_recovers_labels_and_restarts_for_step_2() -> None:
    """At 40% symmetric noise the corrected labels are more often right than the given ones (seed 0)."""
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    data = MNIST1DDataModule(noise_rate=0.4, batch_size=128)  # the canonical 4,000 / 1,000 split
    model = JointOptimization(step1_epochs=22, start_epoch=12, lr=0.1, step2_lr=0.1, step2_milestones=[1])
    probe = Step2Probe()
    fit = trainer(max_epochs=24, callbacks=[probe])
    fit.fit(model, data)
    (callback,) = [c for c in fit.callbacks if isinstance(c, LabelCorrectionCallback)]
    recovery = float((callback.hard_labels == data.clean_labels).float().mean())
    noisy_acc = float((data.noisy_labels == data.clean_labels).float().mean())
    assert recovery > noisy_acc + 0.05, (recovery, noisy_acc)
    assert callback.num_updates == 22 - 12
    assert probe.fresh_equal and probe.optimizer_state_empty and probe.lr == pytest.approx(0.1)
    assert float(fit.callback_metrics["noisy/recovery_acc"]) == pytest.approx(recovery)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step1_epochs": 0}, "step1_epochs must be >= 1, got 0"),
        ({"step2_lr": 0.0}, "step2_lr must be > 0, got 0.0"),
        ({"step2_milestones": [5, 2]}, r"step2_milestones must be increasing positive epochs, got \[5, 2\]"),
        ({"step1_epochs": 10, "start_epoch": 10}, "stop_epoch must be an integer after start_epoch=10, got 10"),
        ({"alpha": -1.0}, "prior_weight must be >= 0, got -1.0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JointOptimization(**kwargs)
