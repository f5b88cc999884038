"""ELRPlus: two networks, weight averages, mixup and ELR targets from the peer's average (Liu et al. 2020)."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, NUM_FEATURES, LossProbe, SpawnDDPStrategy, toy_dataset, trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_noisy.methods import ELRPlus
from lightning_noisy.methods.elr_plus import PeerTargets, ema_decay, mixed_elr_loss, update_average
from lightning_noisy.state.sharded import gather_rows

LINEAR = {"in_features": NUM_FEATURES, "hidden": []}


def elr_plus(**kwargs: Any) -> ELRPlus:
    defaults: dict[str, Any] = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": LINEAR}
    defaults.update(kwargs)
    return ELRPlus(**defaults)


def test_pieces_by_hand() -> None:
    assert ema_decay(0, 0.99, 100) == pytest.approx(0.99 * math.exp(-5))
    assert ema_decay(50, 0.99, 100) == pytest.approx(0.99 * math.exp(-5 * 0.25))
    assert ema_decay(500, 0.99, 100) == ema_decay(7, 0.99, 0) == pytest.approx(0.99)
    average, online = nn.Linear(2, 1), nn.Linear(2, 1)
    expected = 0.75 * average.weight.detach() + 0.25 * online.weight.detach()
    update_average(average, online, 0.75)
    torch.testing.assert_close(average.weight.detach(), expected)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    labels = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]])
    ce, term = mixed_elr_loss(logits, labels, targets, weight=3.0)
    expected_ce = -(0.6 * math.log(0.5) + 0.4 * math.log(0.3) + math.log(0.8)) / 2
    expected_term = 3.0 * (math.log(1 - (0.25 + 0.15)) + math.log(1 - (0.02 + 0.64))) / 2
    torch.testing.assert_close(ce, torch.tensor(expected_ce))
    torch.testing.assert_close(term, torch.tensor(expected_term))


def test_first_step_and_stored_targets_by_hand() -> None:
    model, probe = elr_plus(mixup_alpha=0.0, beta=0.6, weight=2.0), LossProbe()
    nets = copy.deepcopy(model.net_a), copy.deepcopy(model.net_b)
    data = toy_dataset(n=8)
    trainer(max_epochs=1, callbacks=[probe]).fit(model, DataLoader(data, batch_size=8))
    x = torch.stack([data[i][0] for i in range(8)])
    y = F.one_hot(data.noisy_labels, NUM_CLASSES).float()
    expected_loss = torch.tensor(0.0)
    for net, peer, targets in ((nets[0], nets[1], model.peer_targets[0]), (nets[1], nets[0], model.peer_targets[1])):
        with torch.no_grad():
            q = torch.softmax(peer(x), 1).clamp(1e-4, 1 - 1e-4)  # the peer's average starts as the peer
            q = q / q.sum(1, keepdim=True)
            p = torch.softmax(net(x), 1)
        target = 0.4 * q  # beta * 0 + (1 - beta) * q
        expected_loss += -(y * p.log()).sum(1).mean() + 2.0 * torch.log(1 - (target * p.clamp(1e-4, 1 - 1e-4)).sum(1)).mean()
        index, stored = targets.local_targets()
        assert torch.equal(index, torch.arange(8))
        torch.testing.assert_close(stored, target)
    torch.testing.assert_close(probe.losses[0][0], expected_loss, rtol=1e-5, atol=1e-6)


def test_averages_follow_their_networks_and_evaluation_is_the_mean_logits() -> None:
    model = elr_plus(ema_gamma=0.5, ema_rampup_steps=0, lr=0.5)
    start = copy.deepcopy(model.average_a)
    run = trainer(max_epochs=2)
    run.fit(model, DataLoader(toy_dataset(), batch_size=8, shuffle=True),
            DataLoader(toy_dataset(return_index=False), batch_size=8))
    assert int(model.optimiser_steps) == 6
    moved = [not torch.equal(p, q) for p, q in zip(start.parameters(), model.average_a.parameters())]
    assert all(moved) and not any(p.requires_grad for p in model.average_a.parameters())
    x = torch.randn(5, NUM_FEATURES)
    torch.testing.assert_close(model(x), (model.net_a(x) + model.net_b(x)) / 2)
    assert {"train/loss_a", "train/elr_b", "test/acc", "noisy/elr_target_acc_a", "noisy/elr_target_acc_b"} <= set(
        run.callback_metrics)


def test_targets_outside_the_training_step_are_an_error() -> None:
    targets = PeerTargets("a", 0.7, None, "float32", None, 16)
    with pytest.raises(RuntimeError, match="called from the training step"):
        targets.ensemble(torch.full((2, 3), 1 / 3))


class SaveState(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = torch.cat([gather_rows(t._targets) for t in pl_module.peer_targets], 1)  # collectives when sharded
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), "the ranks end with different targets"
        if trainer.is_global_zero:
            held = pl_module.peer_targets[0].local_targets()[0].numel()
            torch.save({"state": state, "held": held, "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_two_rank_fits_agree_sharded_or_replicated() -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for shard_state in (None, False):
            pl.seed_everything(4, verbose=False)
            out = Path(folder) / f"{shard_state}.pt"
            model = elr_plus(shard_state=shard_state, fetch_window=2, lr=0.5)
            trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=2, callbacks=[SaveState(out)]).fit(
                model, DataLoader(toy_dataset(n=29, noisy_every=4), batch_size=4, shuffle=True))
            runs[shard_state] = torch.load(out)
    assert runs[None]["held"] == 15 and runs[False]["held"] == 29
    assert torch.equal(runs[None]["state"], runs[False]["state"])
    assert bool((runs[None]["state"].sum(1) > 0).all())  # every sample's targets were written
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, r"beta must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"weight": -1.0}, r"weight must be a finite number >= 0, got -1.0"),
        ({"ema_gamma": 1.0}, r"ema_gamma must be a number in \[0, 1\), got 1.0"),
        ({"ema_rampup_steps": -1}, r"ema_rampup_steps must be an integer >= 0, got -1"),
        ({"mixup_alpha": -0.5}, r"mixup_alpha must be a finite number >= 0, got -0.5"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"storage_topk": 0}, r"storage_topk"),
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        elr_plus(**kwargs)
