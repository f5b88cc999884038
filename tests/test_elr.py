"""ELRCallback: early-learning regularisation for an unmodified module (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TABLE,
    LossProbe,
    PlainClassifier,
    ScriptedClassifier,
    SpawnDDPStrategy,
    scripted_data,
    toy_dataset,
    trainer,
)
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import ELRCallback
from lightning_noisy.callbacks.elr import clamped_probabilities, elr_term, ensemble_targets
from lightning_noisy.state.sharded import gather_rows


# -- the pure pieces, by hand ---------------------------------------------------------------------------


def test_pieces_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [20.0, 0.0]])  # softmax [0.25, 0.75] and about [1, 2e-9]
    p = clamped_probabilities(logits)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.75], [1 - 1e-4, 1e-4]]))
    old = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    # 0.6 * old + 0.4 * p / sum(p); the clamped second row sums to 1 already
    torch.testing.assert_close(ensemble_targets(old, p, 0.6), torch.tensor([[0.4, 0.6], [0.4 * (1 - 1e-4), 0.4e-4]]))
    targets = torch.tensor([[0.4, 0.6], [0.5, 0.5]])
    # log(1 - (0.4 * 0.25 + 0.6 * 0.75)) = log(0.45); log(1 - (0.5 (1 - 1e-4) + 0.5e-4)) = log(0.5)
    torch.testing.assert_close(elr_term(p, targets), torch.tensor((math.log(0.45) + math.log(0.5)) / 2))


def test_term_pulls_the_prediction_towards_its_target() -> None:
    logits = torch.zeros(1, 3, requires_grad=True)
    elr_term(clamped_probabilities(logits), torch.tensor([[0.0, 1.0, 0.0]])).backward()
    assert logits.grad is not None and logits.grad[0, 1] < 0 < logits.grad[0, 0]  # descent raises class 1


# -- a scripted fit against the recursion written out ---------------------------------------------------


def _expected(epochs: int, beta: float) -> tuple[list[Tensor], Tensor]:
    """Each epoch's clamped predictions and the targets after ``epochs`` epochs, from the definitions."""
    predictions, targets = [], torch.zeros_like(TABLE[0])
    for epoch in range(epochs):
        p = torch.softmax(TABLE[epoch].log(), 1).clamp(1e-4, 1 - 1e-4)
        targets = beta * targets + (1 - beta) * p / p.sum(1, keepdim=True)
        predictions.append(p)
    return predictions, targets


def test_scripted_fit_adds_the_term_and_keeps_the_ensemble() -> None:
    callback, probe = ELRCallback(beta=0.5, weight=2.0), LossProbe()
    data = scripted_data()
    trainer(max_epochs=3, callbacks=[callback, probe]).fit(ScriptedClassifier(), DataLoader(data, batch_size=10))
    predictions, _ = _expected(3, 0.5)
    targets = torch.zeros_like(TABLE[0])
    for epoch in range(3):
        p = predictions[epoch]
        targets = 0.5 * targets + 0.5 * p / p.sum(1, keepdim=True)  # the step sees its own update
        ce = F.cross_entropy(TABLE[epoch].log(), data.noisy_labels)
        expected = ce + 2.0 * torch.log(1 - (targets * p).sum(1)).mean()
        torch.testing.assert_close(probe.losses[epoch][0], expected, rtol=1e-6, atol=1e-6)
    index, stored = callback.local_targets()
    assert torch.equal(index, torch.arange(10))
    torch.testing.assert_close(stored, _expected(3, 0.5)[1], rtol=0, atol=1e-7)


def test_start_epoch_delays_the_term_not_the_ensemble() -> None:
    callback, probe = ELRCallback(beta=0.5, weight=2.0, start_epoch=1), LossProbe()
    data = scripted_data()
    trainer(max_epochs=2, callbacks=[callback, probe]).fit(ScriptedClassifier(), DataLoader(data, batch_size=10))
    torch.testing.assert_close(probe.losses[0][0], F.cross_entropy(TABLE[0].log(), data.noisy_labels))
    assert not torch.allclose(probe.losses[1][0], F.cross_entropy(TABLE[1].log(), data.noisy_labels))
    torch.testing.assert_close(callback.local_targets()[1], _expected(2, 0.5)[1], rtol=0, atol=1e-7)


class SkipsEpochZero(ScriptedClassifier):
    """Returns no loss in epoch 0 (Lightning then skips the backward pass and the optimiser step)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = super().training_step(batch, batch_idx)
        return None if self.current_epoch == 0 else loss


def test_a_step_without_a_loss_still_records_its_predictions() -> None:
    callback = ELRCallback(beta=0.5, weight=2.0)  # no loss in epoch 0, so no term: the record comes from the logits
    trainer(max_epochs=2, callbacks=[callback]).fit(SkipsEpochZero(), DataLoader(scripted_data(), batch_size=10))
    torch.testing.assert_close(callback.local_targets()[1], _expected(2, 0.5)[1], rtol=0, atol=1e-7)


def test_resume_from_an_epoch_boundary_continues_the_ensemble(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: Path | None = None) -> tuple[ELRCallback, ScriptedClassifier]:
        callback, model = ELRCallback(beta=0.6), ScriptedClassifier()
        trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path).fit(
            model, DataLoader(scripted_data(), batch_size=5), ckpt_path=None if ckpt is None else str(ckpt))
        return callback, model

    full, _ = run(4)
    _, model = run(2)
    model.trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed, _ = run(4, tmp_path / "two.ckpt")
    assert torch.equal(resumed.local_targets()[1], full.local_targets()[1])
    torch.testing.assert_close(full.local_targets()[1], _expected(4, 0.6)[1], rtol=0, atol=1e-7)


# -- DDP: sharded and replicated targets and weights agree bit for bit ----------------------------------


class TargetsToFile(ELRCallback):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._targets is not None
        targets, held = gather_rows(self._targets), self.local_targets()[0].numel()  # a collective when sharded
        gathered = trainer.strategy.all_gather(targets)
        assert torch.equal(gathered[0], gathered[1]), "the ranks end with different targets"
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("noisy/")}
            torch.save({"targets": targets, "held": held, "weights": pl_module.state_dict(), "metrics": metrics}, self.out)


@pytest.mark.ddp
def test_sharded_and_replicated_two_rank_fits_agree() -> None:
    import tempfile

    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for shard_state in (None, False):
            pl.seed_everything(1, verbose=False)
            out = Path(folder) / f"{shard_state}.pt"
            callback = TargetsToFile(out, shard_state=shard_state, fetch_window=2)  # the paper's defaults otherwise
            trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[callback]).fit(
                PlainClassifier(lr=0.5), DataLoader(toy_dataset(n=29, noisy_every=4), batch_size=4, shuffle=True))
            runs[shard_state] = torch.load(out)
    assert runs[None]["held"] == 15 and runs[False]["held"] == 29
    assert torch.equal(runs[None]["targets"], runs[False]["targets"])
    assert runs[None]["targets"].sum(1).min() > 0.6  # every sample trained on, its target a sub-distribution
    assert runs[None]["metrics"] == runs[False]["metrics"] and {"noisy/elr_term", "noisy/elr_target_acc"} <= set(runs[None]["metrics"])
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, r"beta must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"beta": -0.1}, r"beta must be a finite number in \[0.0, 1.0\), got -0.1"),
        ({"weight": -1}, r"weight must be a finite number >= 0.0, got -1"),
        ({"weight": float("nan")}, r"weight must be a finite number >= 0.0, got nan"),
        ({"weight": float("inf")}, r"weight must be a finite number >= 0.0, got inf"),
        ({"start_epoch": -1}, r"start_epoch must be an integer >= 0, got -1"),
        ({"fetch_window": 0}, r"fetch_window must be an integer >= 1, got 0"),
        ({"storage_dtype": "int8"}, r"storage_dtype must be one of"),
        ({"storage_topk": 0}, r"storage_topk must be"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ELRCallback(**kwargs)
