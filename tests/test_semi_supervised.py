"""The semi-supervised stages: FixMatch's pseudo labels and loss by hand, DivideMix with the FixMatch stage."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_noisy.methods import DivideMix
from lightning_noisy.methods.semi_supervised import (
    DividedBatch,
    FixMatchStage,
    MixMatchStage,
    confident_pseudo_labels,
)
from tests.helpers import SpawnDDPStrategy, trainer
from tests.test_dividemix import RankCheckedDivideMix, _data


def identity(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return x


def table_net(rows: list[list[float]], dropout: float = 0.0) -> nn.Module:
    """``one-hot input i -> rows[i]``: logits set by hand (a bias-free linear layer), optionally with dropout."""
    linear = nn.Linear(len(rows), len(rows[0]), bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows).T)
    return nn.Sequential(linear, nn.Dropout(dropout))


def test_confident_pseudo_labels_by_hand() -> None:
    p_net = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    p_peer = torch.tensor([[0.99, 0.01], [0.2, 0.8], [0.0, 1.0]])
    labels, keep = confident_pseudo_labels(p_net, p_peer, 0.9)  # means [0.945, 0.055], [0.35, 0.65], [0.1, 0.9]
    assert labels.tolist() == [0, 1, 1] and keep.tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\], got 0"):
        confident_pseudo_labels(p_net, p_peer, 0)
    with pytest.raises(ValueError, match=r"p_peer must have the shape of p_net \(3, 2\), got \(2, 2\)"):
        confident_pseudo_labels(p_net, p_peer[:2], 0.9)


def _hand_batch() -> tuple[nn.Module, nn.Module, DividedBatch]:
    """Inputs e0 (labelled, label 0, w = 1), e1 and e2 (unlabelled; true labels 0 and 1).

    The network's softmax: e0 [0.75, 0.25], e1 [0.9, 0.1], e2 [0.5, 0.5]; the peer's: e1 [0.99, 0.01] and
    e2 [0.2, 0.8], so the co-guessed means are [0.945, 0.055] (kept at tau 0.9, class 0) and [0.35, 0.65].
    """
    net = table_net([[math.log(3.0), 0.0], [math.log(9.0), 0.0], [0.0, 0.0]])
    peer = table_net([[0.0, 0.0], [math.log(99.0), 0.0], [0.0, math.log(4.0)]], dropout=0.9)  # eval: no dropout
    eye = torch.eye(3)
    batch = DividedBatch(eye[:1], torch.tensor([0]), torch.tensor([1.0]), eye[1:], torch.tensor([0, 1]))
    return net, peer, batch


def test_fixmatch_stage_loss_and_counts_by_hand() -> None:
    net, peer, batch = _hand_batch()
    peer.train()
    stage = FixMatchStage(identity, identity, num_classes=2, temperature=0.5, threshold=0.9)
    result = stage.loss(net, peer, batch, unlabelled_weight=2.0, generator=None)
    labelled = -math.log(0.75)  # w = 1: the co-refined target is the given label
    unlabelled = (-math.log(0.9) + 0.0) / 2  # e1 towards class 0; e2 dropped, counted as 0 in the mean
    mean = [(0.75 + 0.9 + 0.5) / 3, (0.25 + 0.1 + 0.5) / 3]
    prior = sum(0.5 * math.log(0.5 / m) for m in mean)  # uniform prior against the mean prediction
    torch.testing.assert_close(result.loss, torch.tensor(labelled + 2.0 * unlabelled + prior), rtol=1e-6, atol=1e-6)
    assert {k: float(v) for k, v in result.counts.items()} == {"unlabelled": 2.0, "kept": 1.0, "kept_correct": 1.0}
    assert peer.training  # guessed in eval mode, then put back


def test_fixmatch_stage_trains_the_unlabelled_samples_on_the_strong_view_only() -> None:
    net, peer, batch = _hand_batch()
    seen: list[torch.Tensor] = []

    def strong(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        seen.append(x)
        return x.flip(1)  # e1 -> e1 (the middle stays), e2 -> e0: network logits [log 3, 0]

    stage = FixMatchStage(identity, strong, num_classes=2, threshold=0.9)
    result = stage.loss(net, peer, batch, unlabelled_weight=1.0, generator=None)
    mean = [(0.75 + 0.9 + 0.75) / 3, (0.25 + 0.1 + 0.25) / 3]
    expected = -math.log(0.75) - math.log(0.9) / 2 + sum(0.5 * math.log(0.5 / m) for m in mean)
    torch.testing.assert_close(result.loss, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert len(seen) == 1 and torch.equal(seen[0], batch.unlabelled)  # pseudo labels came from the weak view
    result.loss.backward()
    assert net[0].weight.grad is not None and peer[0].weight.grad is None  # the peer only guesses


def test_fixmatch_stage_without_unlabelled_samples_or_clean_labels() -> None:
    net, peer, batch = _hand_batch()
    stage = FixMatchStage(identity, identity, num_classes=2, threshold=0.9)
    empty = DividedBatch(batch.inputs, batch.labels, batch.clean_probability, batch.unlabelled[:0])
    result = stage.loss(net, peer, empty, unlabelled_weight=5.0, generator=None)
    prior = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    torch.testing.assert_close(result.loss, torch.tensor(-math.log(0.75) + prior), rtol=1e-6, atol=1e-6)
    assert {k: float(v) for k, v in result.counts.items()} == {"unlabelled": 0.0, "kept": 0.0, "kept_correct": 0.0}
    unknown = DividedBatch(batch.inputs, batch.labels, batch.clean_probability, batch.unlabelled)
    assert float(stage.loss(net, peer, unknown, 1.0, None).counts["kept_correct"]) == 0.0


def test_mixmatch_stage_guesses_with_the_peer_in_eval_mode() -> None:
    net, peer, batch = _hand_batch()
    peer.train()
    norm = nn.BatchNorm1d(2)
    peer.append(norm)
    before = norm.running_mean.clone()
    stage = MixMatchStage(identity, num_classes=2, temperature=0.5, alpha=4.0)
    result = stage.loss(net, peer, batch, 1.0, torch.Generator().manual_seed(0))
    assert result.loss.ndim == 0 and bool(torch.isfinite(result.loss)) and result.counts == {}
    assert peer.training and torch.equal(norm.running_mean, before)  # eval mode: no batch-norm update


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": 0.0}, r"threshold must be a number in \(0, 1\], got 0.0"),
    ({"threshold": 1.5}, r"threshold must be a number in \(0, 1\], got 1.5"),
    ({"temperature": 0.0}, "temperature"),
])
def test_fixmatch_stage_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FixMatchStage(identity, identity, num_classes=2, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ssl": "mixup"}, "ssl must be 'mixmatch' or 'fixmatch', got 'mixup'"),
    ({"ssl": "fixmatch", "fixmatch_threshold": 0}, r"threshold must be a number in \(0, 1\], got 0"),
    ({"strong_augment": "randaugment"}, "strong_augment must be a callable"),
])
def test_dividemix_refuses_bad_stage_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DivideMix(**kwargs)


# -- DivideMix with the FixMatch stage ---------------------------------------------------------------------


class CountingDivideMix(DivideMix):
    """Keeps each epoch's FixMatch counts, summed over its steps, as the stage returned them."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.epoch_counts = {"unlabelled": 0.0, "kept": 0.0, "kept_correct": 0.0}

    def semi_supervised_loss(self, net, peer, batch, lambda_u, generator):
        result = super().semi_supervised_loss(net, peer, batch, lambda_u, generator)
        for key, value in result.counts.items():
            self.epoch_counts[key] += float(value)
        return result


def test_fixmatch_dividemix_logs_the_mask_rate_and_pseudo_label_accuracy_of_its_steps(one_thread: None) -> None:
    model = CountingDivideMix(backbone="cnn1d", warmup_epochs=1, ssl="fixmatch", fixmatch_threshold=0.2,
                              lambda_u=1.0, rampup_length=1, seed=0)
    fit = trainer(max_epochs=3)
    fit.fit(model, datamodule=_data(400, batch_size=32))
    counts, logged = model.epoch_counts, fit.callback_metrics
    assert counts["unlabelled"] > 0 and 0 < counts["kept"] <= counts["unlabelled"]
    torch.testing.assert_close(float(logged["noisy/fixmatch_mask_rate"]), counts["kept"] / counts["unlabelled"])
    torch.testing.assert_close(float(logged["noisy/pseudo_label_acc"]), counts["kept_correct"] / counts["kept"])
    assert isinstance(model.stage, FixMatchStage) and model.stage.threshold == 0.2


def test_fixmatch_dividemix_takes_the_users_strong_view(one_thread: None) -> None:
    calls: list[tuple[int, ...]] = []

    def strong(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return -x

    model = DivideMix(backbone="cnn1d", warmup_epochs=1, ssl="fixmatch", strong_augment=strong, lambda_u=1.0,
                      rampup_length=1, seed=0)
    trainer(max_epochs=2).fit(model, datamodule=_data(300, batch_size=32))
    assert calls and all(shape[1:] == (1, 40) for shape in calls)  # the unlabelled draws of the stage's steps


class RankCheckedFixMatch(RankCheckedDivideMix):
    """Both ranks' divisions and weights agree, and so do the mask rates they log: the kept share of both ranks'
    unlabelled draws together."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.local_counts = torch.zeros(2)  # this rank's unlabelled draws and kept pseudo labels

    def semi_supervised_loss(self, net, peer, batch, lambda_u, generator):
        result = super().semi_supervised_loss(net, peer, batch, lambda_u, generator)
        self.local_counts += torch.stack([result.counts["unlabelled"], result.counts["kept"]]).cpu()
        return result

    def _log_stage_counts(self) -> dict[str, float]:
        logged = super()._log_stage_counts()
        both = self.all_gather(self.local_counts).sum(0)
        assert both[0] > self.local_counts[0] > 0  # each rank drew its own unlabelled samples
        torch.testing.assert_close(logged["noisy/fixmatch_mask_rate"], float(both[1] / both[0]))
        rates = self.all_gather(torch.tensor([logged["noisy/fixmatch_mask_rate"]]))
        assert torch.equal(rates[0], rates[1])
        self.checked_epochs = getattr(self, "checked_epochs", 0) + 1
        return logged

    def on_train_end(self) -> None:
        assert self.checked_epochs == 2  # the epochs after the warm-up


@pytest.mark.ddp
def test_two_ranks_train_the_fixmatch_stage_alike() -> None:
    model = RankCheckedFixMatch(backbone="cnn1d", warmup_epochs=1, ssl="fixmatch", fixmatch_threshold=0.2,
                                lambda_u=1.0, rampup_length=1, seed=0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3).fit(model, datamodule=_data(300, batch_size=32))
