"""SOPCallback: sparse over-parameterisation of the label noise for an unmodified module (Liu et al., ICML 2022)."""

from __future__ import annotations

import tempfile
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
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import SOPCallback
from lightning_noisy.callbacks.sop import corrected_probabilities, noise_terms, v_term_loss
from lightning_noisy.state.sharded import gather_rows


def test_pieces_by_hand() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    u, v = torch.tensor([0.5, 2.0]), torch.tensor([[3.0, 0.1, 0.2], [0.0, 0.0, 0.3]])
    u_term, v_term = noise_terms(u, v, labels)
    # u^2 y, clamped to 1 - 1e-4; v^2 (1 - y), clamped likewise
    torch.testing.assert_close(u_term, torch.tensor([[0.25, 0.0, 0.0], [0.0, 1 - 1e-4, 0.0]]))
    torch.testing.assert_close(v_term, torch.tensor([[0.0, 0.01, 0.04], [0.0, 0.0, 0.09]]))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))
    # row 0: [0.75, 0.29, 0.16] / 1.2; row 1: [0.2, 1.1999, 0.51] / 1.9099
    expected = torch.tensor([[0.75, 0.29, 0.16], [0.2, 1.1999, 0.51]])
    torch.testing.assert_close(corrected_probabilities(logits, u_term, v_term), expected / expected.sum(1, keepdim=True))
    # a prediction pushed below 0 is floored at 1e-4 before the normalisation
    floored = corrected_probabilities(torch.log(torch.tensor([[0.98, 0.01, 0.01]])), torch.zeros(1, 3),
                                      torch.tensor([[0.0, 0.5, 0.0]]))
    torch.testing.assert_close(floored, torch.tensor([[0.98, 1e-4, 0.01]]) / 0.9901)
    # ||onehot(argmax z) + U - V - y||^2 / B: row 0 argmax 0 = label: (0.25, -0.01, -0.04); row 1 argmax 2 != 1
    loss = v_term_loss(logits, u_term, v_term, labels)
    row0 = 0.25**2 + 0.01**2 + 0.04**2
    row1 = 0.0 + (1 - 1e-4 - 1) ** 2 + (1 - 0.09) ** 2
    torch.testing.assert_close(loss, torch.tensor((row0 + row1) / 2))


def test_one_epoch_is_one_sgd_step_of_each_samples_parameters() -> None:
    callback, probe = SOPCallback(lr_u=2.0, lr_v=3.0, init_std=0.3, v_weight=0.5), LossProbe()
    data = scripted_data()
    trainer(max_epochs=1, callbacks=[callback, probe]).fit(ScriptedClassifier(), DataLoader(data, batch_size=10))
    start = callback.start_values(torch.arange(10), 3)
    u, v = start[:, 0].clone().requires_grad_(True), start[:, 1:].clone().requires_grad_(True)
    y = F.one_hot(data.noisy_labels, 3).float()
    big_u, big_v = ((u * u)[:, None] * y).clamp(0, 1 - 1e-4), (v * v * (1 - y)).clamp(0, 1 - 1e-4)
    p = (TABLE[0] + big_u - big_v.detach()).clamp_min(1e-4)
    p = (p / p.sum(1, keepdim=True)).clamp(1e-4, 1)
    ce = -(y * p.log()).sum(1).mean()
    mse = ((F.one_hot(TABLE[0].argmax(1), 3) + big_u.detach() - big_v - y) ** 2).sum() / 10
    loss = ce + 0.5 * mse
    loss.backward()
    torch.testing.assert_close(probe.losses[0][0], loss.detach(), rtol=1e-5, atol=1e-6)
    index, stored_u, stored_v = callback.local_parameters()
    assert torch.equal(index, torch.arange(10))
    torch.testing.assert_close(stored_u, (u - 2.0 * u.grad).detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stored_v, (v - 3.0 * v.grad).detach(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(stored_u, start[:, 0])


def test_start_values_depend_on_the_index_and_seed_only() -> None:
    callback = SOPCallback(init_std=1.0)
    index = torch.tensor([5, 70_000, 3, 131_072])
    both = callback.start_values(index, 4)
    for position, i in enumerate(index.tolist()):
        torch.testing.assert_close(callback.start_values(torch.tensor([i]), 4)[0], both[position], rtol=0, atol=0)
    assert not torch.equal(SOPCallback(init_std=1.0, seed=1).start_values(index, 4), both)
    assert abs(float(callback.start_values(torch.arange(20_000), 4).std()) - 1.0) < 0.02


def test_module_whose_logits_bypass_its_forward_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"could not find the logits.*calling the LightningModule itself"):
        trainer(max_epochs=1, callbacks=[SOPCallback()]).fit(
            PlainClassifier(call_self=False), DataLoader(toy_dataset(), batch_size=8))


class ParametersToFile(SOPCallback):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._u is not None and self._v is not None
        u, v = gather_rows(self._u), gather_rows(self._v)  # collectives when sharded
        gathered = trainer.strategy.all_gather(torch.cat([u[:, None], v], 1))
        assert torch.equal(gathered[0], gathered[1]), "the ranks end with different parameters"
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("noisy/")}
            torch.save({"u": u, "v": v, "held": self.local_parameters()[0].numel(), "metrics": metrics,
                        "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_sharded_and_replicated_two_rank_fits_agree() -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for shard_state in (None, False):
            pl.seed_everything(4, verbose=False)
            out = Path(folder) / f"{shard_state}.pt"
            callback = ParametersToFile(out, shard_state=shard_state, init_std=0.1, fetch_window=2)
            trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[callback]).fit(
                PlainClassifier(lr=0.5), DataLoader(toy_dataset(n=29, noisy_every=4), batch_size=4, shuffle=True))
            runs[shard_state] = torch.load(out)
    assert runs[None]["held"] == 15 and runs[False]["held"] == 29
    assert torch.equal(runs[None]["u"], runs[False]["u"]) and torch.equal(runs[None]["v"], runs[False]["v"])
    start = SOPCallback(init_std=0.1).start_values(torch.arange(29), 3)
    assert not torch.equal(runs[None]["u"], start[:, 0])  # trained
    assert runs[None]["metrics"] == runs[False]["metrics"] and {"noisy/sop_u_mean", "noisy/sop_noise_auroc"} <= set(runs[None]["metrics"])
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_u": 0}, r"lr_u must be a finite number > 0, got 0"),
        ({"lr_v": float("inf")}, r"lr_v must be a finite number > 0, got inf"),
        ({"init_std": -1.0}, r"init_std must be a finite number > 0, got -1.0"),
        ({"v_weight": -0.5}, r"v_weight must be a finite number >= 0, got -0.5"),
        ({"seed": 1.5}, r"seed must be an integer, got 1.5"),
        ({"storage_dtype": "bfloat16"}, r"storage_dtype must be 'float32' and storage_topk None"),
        ({"storage_topk": 2}, r"storage_topk"),
        ({"fetch_window": 0}, r"fetch_window must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SOPCallback(**kwargs)
