"""WarmupEntropyCallback: DivideMix's confidence penalty added to an unmodified module's loss during warm-up."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import PlainClassifier, toy_dataset, trainer
from lightning_noisy.callbacks.warmup_entropy import WarmupEntropyCallback, negative_entropy

LR = 0.5


def _one_step(model: PlainClassifier, callbacks: list[Any], weight: float = 1.0) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loader = DataLoader(toy_dataset(n=8, return_index=bool(callbacks)), batch_size=8)
    trainer(max_epochs=1, limit_train_batches=1, callbacks=callbacks).fit(model, loader)
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_gradient_is_the_plain_gradient_plus_the_penalty_gradient(weight: float) -> None:
    pl.seed_everything(0, verbose=False)
    base = PlainClassifier(lr=LR)
    with_penalty, without = copy.deepcopy(base), copy.deepcopy(base)
    delta_with = _one_step(with_penalty, [WarmupEntropyCallback(warmup_epochs=1, weight=weight)])
    delta_without = _one_step(without, [])

    # the penalty's gradient by hand, on the logits of the same (first) batch from the initial weights
    dataset = toy_dataset(n=8)
    x = torch.stack([dataset[i][0] for i in range(8)])
    reference = copy.deepcopy(base)
    reference.zero_grad()
    logits = reference.net(x)
    p = logits.softmax(1)
    penalty = weight * (p * p.log()).sum(1).mean()
    penalty.backward()
    for name, param in reference.named_parameters():
        expected = delta_without[name] - LR * param.grad
        torch.testing.assert_close(delta_with[name], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(delta_with["net.weight"], delta_without["net.weight"])
    # the module's own received targets are untouched
    assert torch.equal(with_penalty.received_targets[0], without.received_targets[0])


def test_negative_entropy_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = -(math.log(2.0) + -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    assert float(negative_entropy(logits)) == pytest.approx(expected, abs=1e-6)


class Recorder(WarmupEntropyCallback):
    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: Any) -> None:
        self.__dict__.setdefault("terms", []).append((trainer.current_epoch, dict(context.loss_terms)))
        super().on_batch(trainer, pl_module, context)


def test_no_penalty_after_warmup_and_entropy_is_logged() -> None:
    callback = Recorder(warmup_epochs=2)
    model = PlainClassifier()
    trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(toy_dataset(n=16), batch_size=8))
    per_epoch = {e: [("confidence_penalty" in t) for ep, t in callback.terms if ep == e] for e in range(3)}
    assert per_epoch == {0: [True, True], 1: [True, True], 2: [False, False]}
    logged = model.trainer.callback_metrics
    assert 0 <= float(logged["noisy/prediction_entropy"]) <= math.log(3) + 1e-6
    # the last epoch's entropy is the mean over its predictions
    outputs = [o.detach() for o in model.forward_outputs[-2:]]
    expected = torch.cat([-(F.softmax(o, 1) * F.log_softmax(o, 1)).sum(1) for o in outputs]).mean()
    assert float(logged["noisy/prediction_entropy"]) == pytest.approx(float(expected), abs=1e-5)
    assert "training_step" not in model.__dict__  # the contract was released


def test_zero_warmup_never_adds_the_penalty() -> None:
    pl.seed_everything(0, verbose=False)
    base = PlainClassifier(lr=LR)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    delta_a = _one_step(a, [WarmupEntropyCallback(warmup_epochs=0)])
    delta_b = _one_step(b, [])
    for name in delta_a:
        torch.testing.assert_close(delta_a[name], delta_b[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0, got -1"),
        ({"warmup_epochs": 1.5}, "warmup_epochs must be an integer >= 0, got 1.5"),
        ({"warmup_epochs": 1, "weight": -0.5}, "weight must be a finite number >= 0, got -0.5"),
        ({"warmup_epochs": 1, "weight": float("nan")}, "weight must be a finite number >= 0, got nan"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WarmupEntropyCallback(**kwargs)
