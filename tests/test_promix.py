"""ProMix: class-wise small-loss selection, matched high confidence, debiased heads (Xiao et al., IJCAI 2023)."""

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
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.methods import ProMix
from lightning_noisy.methods.promix import class_wise_small_loss, debiased_logits, linear_ramp

LINEAR = {"in_features": NUM_FEATURES, "hidden": []}


def promix(**kwargs: Any) -> ProMix:
    defaults: dict[str, Any] = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": LINEAR}
    defaults.update(kwargs)
    return ProMix(**defaults)


def same(x: Tensor) -> Tensor:
    return x


def half(x: Tensor) -> Tensor:
    return 0.5 * x


def test_pieces_by_hand() -> None:
    assert linear_ramp(0, 0.2, 0.6, 50) == pytest.approx(0.2)
    assert linear_ramp(25, 0.2, 0.6, 50) == pytest.approx(0.4)
    assert linear_ramp(80, 0.2, 0.6, 50) == linear_ramp(0, 0.2, 0.6, 0) == pytest.approx(0.6)
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    # ceil(0.5 * 6 / 3) = 1 per class: the smallest loss of each class
    assert class_wise_small_loss(losses, labels, 0.5, 3).nonzero().flatten().tolist() == [1, 3, 5]
    # 2 per class, capped at class 2's single sample
    assert class_wise_small_loss(losses, labels, 1.0, 3).nonzero().flatten().tolist() == [0, 1, 3, 4, 5]
    assert not class_wise_small_loss(losses, labels, 0.0, 3).any()
    with pytest.raises(ValueError, match=r"both be \[N\]"):
        class_wise_small_loss(losses, labels[:3], 0.5, 3)
    logits, prior = torch.tensor([[1.0, 2.0]]), torch.tensor([0.25, 0.75])
    torch.testing.assert_close(debiased_logits(logits, prior, 0.5),
                               torch.tensor([[1.0 + 0.5 * math.log(0.25), 2.0 + 0.5 * math.log(0.75)]]))


def test_first_step_after_selection_by_hand() -> None:
    model = promix(warmup_epochs=0, rho_start=0.5, consistency_rampup_epochs=0, mixup_alpha=0.0,
                   unlabelled_weight=0.3, weak_augment=same, strong_augment=half)
    probe = LossProbe()
    start = copy.deepcopy(model)
    data = toy_dataset(n=12)
    trainer(max_epochs=1, callbacks=[probe]).fit(model, DataLoader(data, batch_size=12))
    x = torch.stack([data[i][0] for i in range(12)])
    y = data.noisy_labels
    expected = torch.tensor(0.0)
    with torch.no_grad():
        for net, head, selected in zip(start.nets, start.pseudo_heads, model.selected):
            losses = F.cross_entropy(net(x), y, reduction="none")
            # ceil(0.5 * 12 / 3) = 2 smallest losses per given class
            mine = torch.zeros(12, dtype=torch.bool)
            for label in range(NUM_CLASSES):
                members = (y == label).nonzero().flatten()
                mine[members[losses[members].argsort()[:2]]] = True
            assert torch.equal(selected, mine)
            weak, pseudo_weak = net(x), head(net.features(x))
            strong, pseudo_strong = net(0.5 * x), head(net.features(0.5 * x))
            kept = mine | (torch.softmax(weak, 1).gather(1, y[:, None]).squeeze(1) > 0.99)
            other = ~kept
            # the priors are uniform in the first epoch, so the debiasing shifts every logit alike
            for out in (weak, strong, pseudo_weak, pseudo_strong):
                expected += F.cross_entropy(out[kept], y[kept])
            guess = torch.softmax(weak[other], 1) ** 2
            guess = guess / guess.sum(1, keepdim=True)  # sharpened at T = 0.5
            expected += 0.3 * (F.cross_entropy(pseudo_weak[other], guess) + F.cross_entropy(pseudo_strong[other], guess))
    torch.testing.assert_close(probe.losses[0][0], expected, rtol=1e-5, atol=1e-6)


def test_warmup_step_by_hand_with_the_confidence_penalty() -> None:
    model, probe = promix(warmup_epochs=1, penalty_weight=0.5, weak_augment=half), LossProbe()
    start = copy.deepcopy(model)
    data = toy_dataset(n=8)
    trainer(max_epochs=1, callbacks=[probe]).fit(model, DataLoader(data, batch_size=8))
    x, y = 0.5 * torch.stack([data[i][0] for i in range(8)]), data.noisy_labels
    expected = torch.tensor(0.0)
    with torch.no_grad():
        for net, head in zip(start.nets, start.pseudo_heads):
            logits = net(x)
            p = torch.softmax(logits, 1)
            entropy = -(p * p.log()).sum(1).mean()
            expected += F.cross_entropy(logits, y) + F.cross_entropy(head(net.features(x)), y) - 0.5 * entropy
    torch.testing.assert_close(probe.losses[0][0], expected, rtol=1e-5, atol=1e-6)


def test_short_fit_selects_moves_its_priors_and_logs() -> None:
    model = promix(warmup_epochs=1, rho_start=0.5, rho_end=0.5, lr=0.2)
    run = trainer(max_epochs=3)
    run.fit(model, DataLoader(toy_dataset(n=24), batch_size=8, shuffle=True),
            DataLoader(toy_dataset(return_index=False), batch_size=8))
    assert model.selected.shape == (2, 24) and int(model.selected[0].sum()) == 12  # 4 of 8 per class
    torch.testing.assert_close(model.priors.sum(-1), torch.ones(2, 2))
    assert not torch.allclose(model.priors[:, 0], torch.full((2, NUM_CLASSES), 1 / NUM_CLASSES))
    metrics = run.callback_metrics
    assert 0.0 <= float(metrics["promix/kept_fraction"]) <= 1.0
    assert 0.0 <= float(metrics["noisy/promix_selection_precision"]) <= 1.0
    assert float(metrics["promix/rho"]) == pytest.approx(0.5)
    x = torch.randn(5, NUM_FEATURES)
    torch.testing.assert_close(model(x), (model.nets[0](x) + model.nets[1](x)) / 2)


def test_a_batch_without_index_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ProMix needs the sample index"):
        trainer(max_epochs=1).fit(promix(), DataLoader(toy_dataset(return_index=False), batch_size=8))


class RanksAgree(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = torch.cat([pl_module.selected.float().flatten(), pl_module.priors.flatten()])
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), "the ranks end with different selections or priors"
        if trainer.is_global_zero:
            torch.save({"state": state, "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_two_ranks_end_with_the_same_selection_priors_and_weights() -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "state.pt"
        pl.seed_everything(4, verbose=False)
        model = promix(warmup_epochs=1, rho_start=0.5, lr=0.2)
        trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[RanksAgree(out)]).fit(
            model, DataLoader(toy_dataset(n=29, noisy_every=4), batch_size=4, shuffle=True))
        saved = torch.load(out)
    assert int(saved["state"][:58].sum()) > 0  # both networks selected samples


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_epochs": -1}, r"warmup_epochs must be an integer >= 0, got -1"),
        ({"rho_end": 1.5}, r"rho_end must be a number in \[0, 1\], got 1.5"),
        ({"tau": -0.1}, r"tau must be a number in \[0, 1\], got -0.1"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ({"unlabelled_weight": -1.0}, r"unlabelled_weight must be a finite number >= 0, got -1.0"),
        ({"penalty_weight": float("inf")}, r"penalty_weight must be a finite number >= 0, got inf"),
        ({"weak_augment": 3}, r"weak_augment must be a callable .* got int"),
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        promix(**kwargs)
