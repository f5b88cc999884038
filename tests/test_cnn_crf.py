"""CNN-CRF: potentials and marginals against brute-force enumeration, targets and schedule by hand, a short fit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_noisy.callbacks import NoisyLabelMonitor
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import CNNCRF
from lightning_noisy.methods.cnn_crf import (
    alpha_schedule,
    auxiliary_log_posterior,
    clean_label_logits,
    crf_loss,
    hidden_offset,
    log_partition,
    posterior_target,
)
from tests.helpers import SpawnDDPStrategy, trainer


def _crf(c: int = 3, k: int = 2, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64)
                 for shape in ((b, c), (c,), (c, c), (k,), (c, k)))


def _enumerated(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B, C(noisy), C(clean)]`` unnormalised p(y, y~ | x), summing exp(-E) over every hidden configuration."""
    num_classes, k = u.shape
    out = torch.zeros(a.shape[0], num_classes, num_classes, dtype=torch.float64)
    for h in itertools.product([0.0, 1.0], repeat=k):
        h = torch.tensor(h, dtype=torch.float64)
        for j, i in itertools.product(range(num_classes), repeat=2):  # noisy j, clean i
            out[:, j, i] += torch.exp(a[:, i] + b[j] + w[j, i] + c @ h + u[j] @ h)
    return out


def test_partition_and_marginals_equal_brute_force_enumeration() -> None:
    a, b, w, c, u = _crf()
    joint = _enumerated(a, b, w, c, u)
    offset = hidden_offset(c, u, 3)
    torch.testing.assert_close(log_partition(a, b, w, offset), joint.flatten(1).sum(1).log())
    clean = joint.sum(1) / joint.sum((1, 2))[:, None]  # p(y | x)
    torch.testing.assert_close(torch.softmax(clean_label_logits(a, b, w, offset), 1), clean)
    noisy = torch.tensor([2, 0])
    target = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    expected = -(target * (joint[torch.arange(2), noisy] / joint.sum((1, 2))[:, None]).log()).sum(1)
    torch.testing.assert_close(crf_loss(a, b, w, offset, noisy, target), expected)  # -E_t[log p(y, y~ | x)]


def test_loss_gradient_on_the_logits_is_the_model_marginal_minus_the_target() -> None:
    a, b, w, c, u = _crf()
    a.requires_grad_(True)
    offset = hidden_offset(c, u, 3)
    target = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]], dtype=torch.float64)
    crf_loss(a, b, w, offset, torch.tensor([1, 1]), target).sum().backward()
    marginal = torch.softmax(clean_label_logits(a.detach(), b, w, offset), 1)
    torch.testing.assert_close(a.grad, marginal - target)


def test_no_hidden_units_add_nothing() -> None:
    assert torch.equal(hidden_offset(None, None, 4), torch.zeros(4))
    # one hidden unit with c = 0 and U = [log 3, 0]: softplus gives log 4 and log 2
    offset = hidden_offset(torch.zeros(1), torch.tensor([[math.log(3.0)], [0.0]]), 2)
    torch.testing.assert_close(offset, torch.tensor([math.log(4.0), math.log(2.0)]))


def test_posterior_target_is_the_weighted_geometric_mean_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(y | y~ = 0, x) = [0.25, 0.75] with W = 0
    auxiliary = torch.tensor([[0.8, 0.2], [0.5, 0.5]]).log()
    q = posterior_target(logits, torch.zeros(2, 2), torch.tensor([0]), auxiliary, alpha=1.0)
    mean = torch.tensor([(0.25 * 0.8) ** 0.5, (0.75 * 0.2) ** 0.5])  # (p p_aux)^(1/2), normalised
    torch.testing.assert_close(q, (mean / mean.sum())[None])
    torch.testing.assert_close(posterior_target(logits, torch.zeros(2, 2), torch.tensor([0]), auxiliary, 0.0),
                               torch.tensor([[0.25, 0.75]]))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -1"):
        posterior_target(logits, torch.zeros(2, 2), torch.tensor([0]), auxiliary, -1)


def test_alpha_schedule_by_hand() -> None:
    assert alpha_schedule(0.0, 10.0) == pytest.approx(99.0)
    assert alpha_schedule(5.0, 10.0) == pytest.approx(0.49 / 0.51)
    assert alpha_schedule(7.0, 10.0) == 0.5  # 0.29 / 0.71 = 0.41 is below the floor
    assert alpha_schedule(50.0, 10.0, floor=0.25) == 0.25
    with pytest.raises(ValueError, match="anneal_epochs must be > 0, got 0"):
        alpha_schedule(0.0, 0)


def test_auxiliary_table_counts_the_clean_pairs_by_hand() -> None:
    noisy, clean = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])
    table = auxiliary_log_posterior(noisy, clean, 3, smoothing=1.0).exp()
    # noisy 0: counts (2, 1, 0) + 1 -> (3, 2, 1) / 6; noisy 1: (0, 1, 0) + 1 -> (1, 2, 1) / 4; noisy 2: uniform
    torch.testing.assert_close(table, torch.tensor([[3 / 6, 2 / 6, 1 / 6], [1 / 4, 2 / 4, 1 / 4], [1 / 3] * 3]))
    with pytest.raises(ValueError, match="smoothing must be > 0, got 0"):
        auxiliary_log_posterior(noisy, clean, 3, smoothing=0)


def _data(clean_subset_size: int = 40) -> MNIST1DDataModule:
    return MNIST1DDataModule(num_samples=400, batch_size=32, noise_type="asymmetric", noise_rate=0.4,
                             class_map="mnist", noise_seed=0, clean_subset_size=clean_subset_size)


def test_fit_learns_with_the_clean_subset_and_reports_training_predictions(one_thread: None) -> None:
    model = CNNCRF(backbone="cnn1d", anneal_epochs=1.0, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    data = _data()
    fit = trainer(max_epochs=3, callbacks=[NoisyLabelMonitor()])
    fit.fit(model, datamodule=data)
    index, clean = data.clean_subset
    expected = auxiliary_log_posterior(data.noisy_labels[index], clean, 10)
    torch.testing.assert_close(model._auxiliary, expected)
    assert torch.equal(model._clean_label[index], clean) and int((model._clean_label >= 0).sum()) == 40
    assert float(fit.callback_metrics["crf/alpha"]) == 0.5  # past the anneal
    assert "noisy/train_pred_acc" in fit.callback_metrics
    assert not torch.equal(model.pairwise.detach(), torch.zeros(10, 10))  # the CRF trains with the network


def test_fit_without_a_clean_subset_says_what_is_missing(one_thread: None) -> None:
    with pytest.raises(RuntimeError, match="clean_subset_size > 0"):
        trainer(max_epochs=1).fit(CNNCRF(backbone="cnn1d"), datamodule=_data(0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden_units": -1}, "hidden_units must be an int >= 0, got -1"),
    ({"anneal_epochs": 0.0}, "anneal_epochs must be > 0, got 0.0"),
    ({"alpha_floor": -0.5}, "floor must be >= 0, got -0.5"),
    ({"aux_smoothing": 0.0}, "aux_smoothing must be a finite number > 0, got 0.0"),
    ({"pairwise_l2": -1.0}, "pairwise_l2 must be a finite number >= 0, got -1.0"),
    ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
])
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CNNCRF(**kwargs)


class RankCheckedCNNCRF(CNNCRF):
    def on_train_end(self) -> None:
        state = torch.cat([p.detach().flatten() for p in self.parameters()])
        gathered = self.all_gather(state)
        assert torch.equal(gathered[0], gathered[1])
        assert self.hidden_bias is not None and not torch.equal(self.hidden_bias.detach(), torch.zeros(2))


@pytest.mark.ddp
def test_two_ranks_hold_the_same_network_and_crf() -> None:
    model = RankCheckedCNNCRF(backbone="cnn1d", hidden_units=2, anneal_epochs=1.0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=2).fit(model, datamodule=_data())
