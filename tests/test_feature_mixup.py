"""FeatureMixup: pairing, mixing and soft targets by hand, attention weights, a short fit, DDP, bad args."""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, NUM_FEATURES, SpawnDDPStrategy, toy_dataset, toy_loader, trainer
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_noisy.methods.feature_mixup import (
    FeatureMixup,
    PairAttention,
    group_pairs,
    mix_features,
    mixed_targets,
    soft_cross_entropy,
)

MLP_KWARGS = {"in_features": NUM_FEATURES, "hidden": [8]}


def feature_mixup(**kwargs: object) -> FeatureMixup:
    defaults = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": MLP_KWARGS}
    defaults.update(kwargs)
    return FeatureMixup(**defaults)


def test_mix_features_and_targets_by_hand() -> None:
    f_i = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    f_j = torch.tensor([[3.0, 0.0], [2.0, 2.0]])
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(mix_features(f_i, f_j, w), torch.tensor([[2.5, 0.5], [1.0, 3.0]]))
    targets = mixed_targets(torch.tensor([0, 1]), torch.tensor([2, 1]), 3)
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    soft = torch.tensor([[0.25, 0.0, 0.75]])
    assert float(soft_cross_entropy(logits, soft)) == pytest.approx(float(torch.log(torch.tensor(3.0))))


def test_within_pairs_share_a_label_and_cross_pairs_do_not() -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 3])  # groups 0 (3), 1 (2), 2 (2), 3 (1: no pairs)
    within, cross = group_pairs(labels, pairs_per_group=5, generator=torch.Generator().manual_seed(0))
    assert within.shape == (15, 2) and cross.shape == (15, 2)
    assert (labels[within[:, 0]] == labels[within[:, 1]]).all()
    assert (within[:, 0] != within[:, 1]).all()
    assert (labels[cross[:, 0]] != labels[cross[:, 1]]).all()
    assert 7 not in within.flatten().tolist()
    again = group_pairs(labels, 5, torch.Generator().manual_seed(0))
    assert torch.equal(within, again[0]) and torch.equal(cross, again[1])  # seeded: reproducible


def test_pairing_edge_cases() -> None:
    within, cross = group_pairs(torch.tensor([1, 1, 1]), 2)
    assert within.shape == (2, 2) and cross.shape == (0, 2)  # a single label: no cross-group pair
    within, cross = group_pairs(torch.tensor([0, 1, 2]), 2)
    assert within.shape == (0, 2) and cross.shape == (0, 2)  # no group of two


def test_attention_weights_sum_to_one() -> None:
    attention = PairAttention(32)
    assert attention.embed_i.out_features == 6  # 3 D / 16, as the released code's 384 for 2,048 features
    w = attention(torch.randn(7, 32), torch.randn(7, 32))
    assert w.shape == (7, 2) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(7))


def test_attention_by_hand() -> None:
    attention = PairAttention(2, hidden_dim=2)
    with torch.no_grad():
        attention.embed_i.weight.copy_(torch.eye(2))
        attention.embed_i.bias.zero_()
        attention.embed_j.weight.copy_(-torch.eye(2))
        attention.embed_j.bias.zero_()
        attention.score.weight.copy_(torch.tensor([[1.0, 2.0]]))
        attention.score.bias.fill_(-1.0)
    f_i, f_j = torch.tensor([[1.0, -3.0]]), torch.tensor([[-2.0, 0.5]])
    # relu([1, -3]) + relu([2, -0.5]) = [3, 0]; score 1 * 3 + 2 * 0 - 1 = 2
    a = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    torch.testing.assert_close(attention(f_i, f_j), torch.stack([a, 1 - a]).view(1, 2))


def test_loss_is_weighted_ce_plus_weighted_mix_loss() -> None:
    model = feature_mixup(lambda_ce=0.25, lambda_mix=0.5)
    x, y, _ = next(iter(toy_loader(toy_dataset(), batch_size=12)))
    out = model.feature_mixup_loss(x, y, torch.Generator().manual_seed(1))
    assert float(out["loss_ce"].detach()) == pytest.approx(float(F.cross_entropy(model(x), y).detach()))
    assert float(out["loss"].detach()) == pytest.approx(float((0.25 * out["loss_ce"] + 0.5 * out["loss_mix"]).detach()))
    # by hand from the same pairs
    within, cross = group_pairs(y, 4, torch.Generator().manual_seed(1))
    pairs = torch.cat([within, cross])
    feats = model.backbone.features(x)
    w = model.attention(feats[pairs[:, 0]], feats[pairs[:, 1]])
    mixed = w[:, :1] * feats[pairs[:, 0]] + w[:, 1:] * feats[pairs[:, 1]]
    log_p = F.log_softmax(model.backbone.classifier(mixed), 1)
    rows = torch.arange(pairs.shape[0])
    expected = -(log_p[rows, y[pairs[:, 0]]] + log_p[rows, y[pairs[:, 1]]]).mean() / 2  # half each label
    assert float(out["loss_mix"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out["loss"].requires_grad
    out["loss"].backward()
    assert model.attention.score.weight.grad is not None and model.attention.score.weight.grad.abs().sum() > 0


def test_short_fit_decreases_the_loss() -> None:
    model = feature_mixup(lr=0.1, weight_decay=0.0)
    x, y, _ = next(iter(toy_loader(toy_dataset(), batch_size=24)))

    def loss() -> float:
        with torch.no_grad():
            return float(model.feature_mixup_loss(x, y, torch.Generator().manual_seed(0))["loss"])

    before = loss()
    run = trainer(max_epochs=8)
    run.fit(model, toy_loader(toy_dataset(), batch_size=8, shuffle=True), toy_loader(toy_dataset(return_index=False)))
    assert loss() < before
    assert {"train/loss", "train/loss_ce", "train/loss_mix", "train/attention_within", "test/acc",
            "test/acc_best"} <= set(run.callback_metrics)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lambda_mix": -1.0}, "lambda_mix must be a finite number >= 0, got -1.0"),
     ({"lambda_ce": float("nan")}, "lambda_ce must be a finite number >= 0, got nan"),
     ({"pairs_per_group": 0}, "pairs_per_group must be an integer >= 1, got 0"),
     ({"pairs_per_group": 1.5}, "pairs_per_group"), ({"mixup_alpha": 0.5}, "mixup")],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        feature_mixup(**kwargs)


def test_bad_function_arguments() -> None:
    with pytest.raises(ValueError, match="labels must be integer"):
        group_pairs(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="pairs_per_group"):
        group_pairs(torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="expected f_i, f_j"):
        mix_features(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="hard integer labels"):
        feature_mixup().feature_mixup_loss(torch.zeros(2, NUM_FEATURES), torch.zeros(2, 3))


def test_a_batch_without_pairs_gives_the_attention_zero_gradients() -> None:
    model = feature_mixup()
    x = torch.randn(3, NUM_FEATURES, generator=torch.Generator().manual_seed(0))
    out = model.feature_mixup_loss(x, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))  # no label twice
    assert float(out["loss_mix"].detach()) == 0.0 and out["weights_within"].shape == (0, 2)
    out["loss"].backward()
    for name, parameter in model.attention.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name  # in the graph, with zero gradient


class SameWeightsOnEveryRank(pl.Callback):
    """At the end of the fit, on each rank: every rank holds the same weights, and the attention has moved."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attention_start = torch.cat([p.detach().flatten().clone() for p in pl_module.attention.parameters()])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(weights)
        assert torch.equal(gathered[0], gathered[1])
        attention = torch.cat([p.detach().flatten() for p in pl_module.attention.parameters()])
        assert not torch.equal(attention, self.attention_start)  # rank 1's pairs trained it on both ranks


@pytest.mark.ddp
def test_ddp_ranks_with_and_without_pairs_train_together() -> None:
    # the DistributedSampler, unshuffled, gives rank 0 samples 0, 2, 4 (labels 0, 1, 2: no pair) and rank 1
    # samples 1, 3, 5 (labels 0, 0, 1: a within-group pair); before the attention joined every step's graph,
    # this fit hung in DDP's gradient reduction (the timeout turns a hang into an error)
    x = torch.randn(6, NUM_FEATURES, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 0, 2, 1])
    strategy = SpawnDDPStrategy(timeout=timedelta(seconds=60))
    run = trainer(devices=2, strategy=strategy, max_epochs=2, callbacks=[SameWeightsOnEveryRank()])
    run.fit(feature_mixup(), DataLoader(TensorDataset(x, y), batch_size=3))
