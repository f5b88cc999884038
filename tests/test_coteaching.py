"""CoTeaching: the forget-rate schedule, the small-loss and disagreement selections, the cross update, a short fit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, NUM_FEATURES, toy_dataset, toy_loader, trainer

from lightning_noisy.callbacks import NoisyLabelMonitor
from lightning_noisy.methods.coteaching import (
    CoTeaching,
    forget_rate_schedule,
    small_loss_selection,
)

MLP_KWARGS = {"in_features": NUM_FEATURES, "hidden": [8]}
LINEAR_KWARGS = {"in_features": NUM_FEATURES, "hidden": []}


def coteaching(**kwargs: object) -> CoTeaching:
    defaults = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": MLP_KWARGS}
    defaults.update(kwargs)
    return CoTeaching(**defaults)


@pytest.mark.parametrize(
    ("epoch", "num_gradual", "exponent", "expected"),
    [(0, 10, 1.0, 0.0), (5, 10, 1.0, 0.2), (10, 10, 1.0, 0.4), (20, 10, 1.0, 0.4), (0, 0, 1.0, 0.4),
     (7, 0, 1.0, 0.4), (5, 10, 2.0, 0.1)],
)
def test_forget_rate_schedule(epoch: int, num_gradual: int, exponent: float, expected: float) -> None:
    assert forget_rate_schedule(epoch, 0.4, num_gradual, exponent) == pytest.approx(expected)


def test_small_loss_selection_is_a_cross_update() -> None:
    loss_a = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    loss_b = torch.tensor([0.2, 0.8, 0.4, 0.6, 0.1])
    idx_a, idx_b = small_loss_selection(loss_a, loss_b, forget_rate=0.4)  # keep round(5 * 0.6) = 3
    assert idx_a.tolist() == [4, 0, 2]  # b's three smallest losses, for network a
    assert idx_b.tolist() == [1, 3, 0]  # a's three smallest losses, for network b


def test_small_loss_selection_edge_cases() -> None:
    ties = torch.ones(4)
    assert [i.tolist() for i in small_loss_selection(ties, ties, 0.5)] == [[0, 1], [0, 1]]  # stable ties
    loss = torch.tensor([0.3, 0.2, 0.1])
    assert small_loss_selection(loss, loss, 0.0)[0].tolist() == [2, 1, 0]  # nothing forgotten
    assert small_loss_selection(loss[:1], loss[:1], 0.9)[0].tolist() == [0]  # at least one kept
    assert small_loss_selection(loss[:0], loss[:0], 0.5)[0].numel() == 0


def test_disagreement_selection_of_coteaching_plus() -> None:
    model = coteaching(disagreement=True, disagreement_start_epoch=2, forget_rate=0.5, num_gradual=0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def one_hot_logits(preds: list[int], scales: list[float]) -> torch.Tensor:
        return F.one_hot(torch.tensor(preds), NUM_CLASSES).float() * torch.tensor(scales)[:, None]

    # a and b agree on samples 0, 2, 5; disagree on 1, 3, 4
    logits_a = one_hot_logits([0, 1, 2, 0, 1, 2], [5.0, 1.0, 5.0, 3.0, 2.0, 5.0])
    logits_b = one_hot_logits([0, 2, 2, 1, 0, 2], [5.0, 1.0, 5.0, 2.0, 0.5, 5.0])
    # losses on the disagreement set {1, 3, 4}:
    #   a: log(1 + 2/e) = 0.55, log(1 + 2/e^3) = 0.095, log(1 + 2/e^2) = 0.24   -> two smallest: 3, 4
    #   b: log(e + 2) = 1.55,   log(e^2 + 2) = 2.24,    log(e^0.5 + 2) = 1.30   -> two smallest: 4, 1
    idx_a, idx_b = model.select(logits_a, logits_b, y, epoch=2)  # keep round(3 * 0.5) = 2 of 3
    assert sorted(idx_a.tolist()) == [1, 4]
    assert sorted(idx_b.tolist()) == [3, 4]
    # before disagreement_start_epoch: plain Co-teaching over the whole batch (3 of 6 kept)
    idx_a, idx_b = model.select(logits_a, logits_b, y, epoch=1)
    assert len(idx_a) == len(idx_b) == 3 and not set(idx_a.tolist()) <= {1, 3, 4}
    # no disagreement: nothing selected
    idx_a, idx_b = model.select(logits_a, logits_a.clone(), y, epoch=2)
    assert idx_a.numel() == idx_b.numel() == 0


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_bad_forget_rate(rate: float) -> None:
    with pytest.raises(ValueError, match=f"forget_rate.*{rate}"):
        forget_rate_schedule(0, rate, 10)
    with pytest.raises(ValueError, match=f"forget_rate.*{rate}"):
        small_loss_selection(torch.zeros(3), torch.zeros(3), rate)
    with pytest.raises(ValueError, match=f"forget_rate.*{rate}"):
        coteaching(forget_rate=rate)


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="num_gradual.*-1"):
        forget_rate_schedule(0, 0.2, -1)
    for exponent in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match=f"exponent must be a finite number > 0, got {exponent!r}"):
            forget_rate_schedule(0, 0.2, 10, exponent)
    with pytest.raises(ValueError, match="disagreement_start_epoch.*-3"):
        coteaching(disagreement_start_epoch=-3)
    with pytest.raises(ValueError, match="hard integer labels"):
        coteaching().select(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 0)


def test_networks_start_from_different_seeds_without_touching_the_global_rng() -> None:
    state = torch.get_rng_state()
    model, again = coteaching(seed=3), coteaching(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(model.net_a.classifier.weight, model.net_b.classifier.weight)
    assert torch.equal(model.net_a.classifier.weight, again.net_a.classifier.weight)


def test_short_fit_trains_both_networks_and_logs_selection_quality() -> None:
    model = coteaching(forget_rate=0.25, num_gradual=1, scheduler="multistep", milestones=[1])
    before_a, before_b = copy.deepcopy(model.net_a), copy.deepcopy(model.net_b)
    run = trainer(max_epochs=2)
    run.fit(model, toy_loader(toy_dataset(), batch_size=8, shuffle=True),
            toy_loader(toy_dataset(return_index=False), batch_size=8))
    for before, after in ((before_a, model.net_a), (before_b, model.net_b)):
        assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))
    metrics = run.callback_metrics
    assert 0.0 <= float(metrics["noisy/pure_ratio"]) <= 1.0
    assert 0.0 <= float(metrics["noisy/selection_recall"]) <= 1.0
    assert float(metrics["train/forget_rate"]) == pytest.approx(0.25)  # epoch 1 = T_k
    assert {"test/acc", "test/acc_a", "test/acc_b", "test/acc_mean", "test/acc_best", "train/loss_a",
            "train/loss_b"} <= set(metrics)
    assert [o.param_groups[0]["lr"] for o in run.optimizers] == pytest.approx([1e-4, 1e-4])  # decayed at 1


@pytest.mark.parametrize("monitor", [False, True], ids=["index_in_batch", "index_taken_by_callback"])
def test_pure_ratio_without_forgetting_is_the_clean_share(monitor: bool) -> None:
    model = coteaching(forget_rate=0.0)
    run = trainer(max_epochs=1, callbacks=[NoisyLabelMonitor(histogram=False)] if monitor else [])
    run.fit(model, toy_loader(toy_dataset(n=24, noisy_every=4), batch_size=8))
    assert float(run.callback_metrics["noisy/pure_ratio"]) == pytest.approx(18 / 24)  # 6 of 24 labels wrong
    assert float(run.callback_metrics["noisy/selection_recall"]) == pytest.approx(1.0)


def test_each_network_steps_on_the_samples_its_peer_selected() -> None:
    lr = 0.5
    model = coteaching(backbone_kwargs=LINEAR_KWARGS, optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                       forget_rate=0.5, num_gradual=0, seed=1)
    initial = copy.deepcopy(model)
    loader = toy_loader(toy_dataset(n=8, noisy_every=2), batch_size=8)
    x, y, _ = next(iter(loader))
    with torch.no_grad():
        idx_a, idx_b = initial.select(initial.net_a(x), initial.net_b(x), y, epoch=0)
    assert len(idx_a) == len(idx_b) == 4
    assert set(idx_a.tolist()) != set(idx_b.tolist())  # otherwise the test could not tell them apart

    trainer(max_epochs=1, limit_train_batches=1).fit(model, loader)

    def sgd_step(net: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of mean cross-entropy over ``idx``, gradient of a linear layer written out."""
        weight, bias = net.classifier.weight.detach(), net.classifier.bias.detach()
        inputs = x[idx]
        residual = torch.softmax(inputs @ weight.T + bias, dim=1) - F.one_hot(y[idx], NUM_CLASSES).float()
        return weight - lr * residual.T @ inputs / len(idx), bias - lr * residual.mean(0)

    for net, trained, idx, other in ((initial.net_a, model.net_a, idx_a, idx_b),
                                     (initial.net_b, model.net_b, idx_b, idx_a)):
        weight, bias = sgd_step(net, idx)
        torch.testing.assert_close(trained.classifier.weight, weight)
        torch.testing.assert_close(trained.classifier.bias, bias)
        assert not torch.allclose(trained.classifier.weight, sgd_step(net, other)[0])


def test_batch_without_disagreement_gives_no_update() -> None:
    model = coteaching(disagreement=True, disagreement_start_epoch=0, optimizer="sgd", weight_decay=0.1)
    model.net_b.load_state_dict(model.net_a.state_dict())  # identical networks never disagree
    before = copy.deepcopy(model.net_a)
    run = trainer(max_epochs=1)
    run.fit(model, toy_loader(toy_dataset(), batch_size=8))
    for p, q in zip(before.parameters(), model.net_a.parameters()):
        assert torch.equal(p, q)  # no optimiser step (weight decay would have moved them)
    assert float(run.callback_metrics["train/loss_a"]) == 0.0
    assert "noisy/pure_ratio" not in run.callback_metrics  # nothing selected
    assert float(run.callback_metrics["noisy/selection_recall"]) == 0.0


@pytest.mark.parametrize("evaluate", ["mean", "a"])
def test_evaluation_scores_each_network_and_their_mean_logits(evaluate: str) -> None:
    model = coteaching(evaluate=evaluate)
    data = toy_dataset(n=40, noisy_every=1000, return_index=False)
    run = trainer(max_epochs=1)
    run.fit(model, toy_loader(toy_dataset(), batch_size=8), toy_loader(data, batch_size=16))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = data.noisy_labels  # what the validation batches carry
    with torch.no_grad():
        logits_a, logits_b = model.net_a(x), model.net_b(x)
        expected = {"a": logits_a, "b": logits_b, "mean": (logits_a + logits_b) / 2}
        assert torch.allclose(model(x), expected[evaluate])
    metrics = run.callback_metrics
    for name, logits in expected.items():  # by hand: the arg max of each network's logits and of their mean
        assert float(metrics[f"test/acc_{name}"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert float(metrics["test/acc"]) == float(metrics[f"test/acc_{evaluate}"])
    tested = run.test(model, toy_loader(data, batch_size=16), verbose=False)[0]
    assert tested["test/acc"] == pytest.approx(float(metrics[f"test/acc_{evaluate}"]))


def test_bad_evaluate_is_refused() -> None:
    with pytest.raises(ValueError, match="evaluate must be 'mean'.*got 'b'"):
        coteaching(evaluate="b")


def test_linear_schedule_holds_then_falls_to_zero_at_max_epochs() -> None:
    model = coteaching(scheduler="linear", milestones=[2], lr=0.1)
    lrs: list[float] = []

    class RecordLearningRate(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            lrs.append(trainer.optimizers[1].param_groups[0]["lr"])

    trainer(max_epochs=6, callbacks=[RecordLearningRate()]).fit(model, toy_loader(toy_dataset(), batch_size=8))
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.075, 0.05, 0.025])  # (6 - e) / (6 - 2) from epoch 2
    with pytest.raises(ValueError, match="at most one milestone.*\\[2, 4\\]"):
        coteaching(scheduler="linear", milestones=[2, 4])
    with pytest.raises(ValueError, match="start before max_epochs=6.*\\[6\\]"):
        trainer(max_epochs=6).fit(coteaching(scheduler="linear", milestones=[6]), toy_loader(toy_dataset()))
