"""Tests of the robust losses, regularisers, mixup and the loss registry.

The hand-computed examples use logits = log(p), so softmax(logits) = p exactly:
p_0 = [0.2, 0.3, 0.5], p_1 = [0.6, 0.3, 0.1].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from lightning_noisy.losses import (
    as_probabilities,
    available_losses,
    bootstrap_hard_loss,
    bootstrap_soft_loss,
    cross_entropy_loss,
    entropy_loss,
    gce_loss,
    get_loss,
    kl_div_loss,
    label_smoothing_loss,
    mae_loss,
    mixup_batch,
    prior_loss,
    rce_loss,
    sample_mixup_lambda,
    sce_loss,
    truncated_gce_loss,
)
from lightning_noisy.losses._targets import one_hot_rows

P = [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]


def _logits() -> torch.Tensor:
    return torch.tensor(P, dtype=torch.float64).log().float()


def _close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


T3 = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.3, 0.7]])

# Every (logits, targets) loss, with the keyword arguments needed to call it.
LOSSES = {
    "ce": (cross_entropy_loss, {}),
    "mae": (mae_loss, {}),
    "gce": (gce_loss, {"q": 0.7}),
    "truncated_gce": (truncated_gce_loss, {"q": 0.7, "k": 0.4}),
    "rce": (rce_loss, {}),
    "sce": (sce_loss, {"alpha": 0.3, "beta": 0.7}),
    "label_smoothing": (label_smoothing_loss, {"smoothing": 0.2}),
    "bootstrap_soft": (bootstrap_soft_loss, {"beta": 0.9}),
    "bootstrap_hard": (bootstrap_hard_loss, {"beta": 0.8}),
    "kl_div": (kl_div_loss, {}),
    "forward": (get_loss("forward", transition=T3), {}),
    "backward": (get_loss("backward", transition=T3), {}),
}


# --------------------------------------------------------------------------- hand-computed values


def test_cross_entropy_hand_and_reference() -> None:
    targets = torch.tensor([2, 0])
    _close(cross_entropy_loss(_logits(), targets, reduction="none"), [-math.log(0.5), -math.log(0.6)])
    logits = torch.randn(5, 4)
    soft = torch.softmax(torch.randn(5, 4), dim=1)
    torch.testing.assert_close(cross_entropy_loss(logits, soft), F.cross_entropy(logits, soft))
    hard = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(
        cross_entropy_loss(logits, hard, reduction="sum"), F.cross_entropy(logits, hard, reduction="sum")
    )


def test_mae_hand() -> None:
    targets = torch.tensor([2, 0])
    expected = [0.2 + 0.3 + (1 - 0.5), (1 - 0.6) + 0.3 + 0.1]
    _close(mae_loss(_logits(), targets, reduction="none"), expected)
    _close(mae_loss(_logits(), targets), sum(expected) / 2)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    _close(mae_loss(_logits(), soft, reduction="none"), [0.3 + 0.2 + 0.5, 0.6 + 0.3 + 0.9])


def test_mae_hard_is_twice_one_minus_p_y() -> None:
    logits = torch.randn(6, 5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    p_y = torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(mae_loss(logits, targets, reduction="none"), 2 * (1 - p_y))


def test_gce_hand() -> None:
    q = 0.7
    _close(gce_loss(_logits(), torch.tensor([2, 0]), q=q, reduction="none"), [(1 - 0.5**q) / q, (1 - 0.6**q) / q])
    soft = torch.tensor([[0.25, 0.0, 0.75], [0.0, 1.0, 0.0]])
    expected = [0.25 * (1 - 0.2**q) / q + 0.75 * (1 - 0.5**q) / q, (1 - 0.3**q) / q]
    _close(gce_loss(_logits(), soft, q=q, reduction="none"), expected)


def test_gce_tends_to_cross_entropy_as_q_tends_to_zero() -> None:
    logits = torch.randn(8, 5) * 3
    targets = torch.randint(0, 5, (8,))
    torch.testing.assert_close(
        gce_loss(logits, targets, q=1e-4, reduction="none"),
        F.cross_entropy(logits, targets, reduction="none"),
        rtol=1e-3,
        atol=0,
    )


def test_gce_at_q_one_is_one_minus_p_y_and_half_mae() -> None:
    logits = torch.randn(7, 4)
    targets = torch.randint(0, 4, (7,))
    p_y = torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    gce = gce_loss(logits, targets, q=1.0, reduction="none")
    torch.testing.assert_close(gce, 1 - p_y)
    torch.testing.assert_close(gce, mae_loss(logits, targets, reduction="none") / 2)


def test_truncated_gce_threshold_hand() -> None:
    q, k = 0.7, 0.55
    # p_y = 0.5 <= k: truncated to the constant; p_y = 0.6 > k: the L_q loss.
    expected = [(1 - k**q) / q, (1 - 0.6**q) / q]
    _close(truncated_gce_loss(_logits(), torch.tensor([2, 0]), q=q, k=k, reduction="none"), expected)


def test_truncated_gce_gradient_vanishes_below_threshold() -> None:
    logits = _logits().requires_grad_()
    truncated_gce_loss(logits, torch.tensor([2, 0]), q=0.7, k=0.55, reduction="sum").backward()
    assert torch.all(logits.grad[0] == 0)
    assert torch.all(logits.grad[1] != 0)


def test_truncated_gce_weights_hand() -> None:
    q, k = 0.7, 0.55
    # The weights override the live threshold: sample 0 (p_y = 0.5 <= k) kept, sample 1 pruned.
    weights = torch.tensor([1.0, 0.0])
    expected = [(1 - 0.5**q) / q, (1 - k**q) / q]
    _close(truncated_gce_loss(_logits(), torch.tensor([2, 0]), q=q, k=k, weights=weights, reduction="none"), expected)
    halves = torch.tensor([0.5, 0.5])
    half = truncated_gce_loss(_logits(), torch.tensor([2, 0]), q=q, k=k, weights=halves, reduction="none")
    _close(half, [0.5 * (1 - 0.5**q) / q + 0.5 * (1 - k**q) / q, 0.5 * (1 - 0.6**q) / q + 0.5 * (1 - k**q) / q])


def test_rce_hand() -> None:
    a = -4.0
    # one-hot target: RCE = -A * (1 - p_y)
    expected = [-a * (0.2 + 0.3), -a * (0.3 + 0.1)]
    _close(rce_loss(_logits(), torch.tensor([2, 0]), log_clamp=a, reduction="none"), expected)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = [-(0.2 * math.log(0.5) + 0.3 * math.log(0.5) + 0.5 * a), -(0.6 * a + 0.3 * a)]
    _close(rce_loss(_logits(), soft, log_clamp=a, reduction="none"), expected)


def test_sce_is_weighted_sum_of_ce_and_rce() -> None:
    alpha, beta = 0.1, 1.0
    targets = torch.tensor([2, 0])
    expected = [alpha * -math.log(0.5) + beta * 4 * (0.2 + 0.3), alpha * -math.log(0.6) + beta * 4 * (0.3 + 0.1)]
    _close(sce_loss(_logits(), targets, alpha=alpha, beta=beta, reduction="none"), expected)
    logits, soft = torch.randn(6, 4), torch.softmax(torch.randn(6, 4), 1)
    torch.testing.assert_close(
        sce_loss(logits, soft, alpha=0.3, beta=2.0, log_clamp=-6.0),
        0.3 * cross_entropy_loss(logits, soft) + 2.0 * rce_loss(logits, soft, log_clamp=-6.0),
    )


def test_label_smoothing_hand_and_reference() -> None:
    s = 0.1
    t0 = [s / 3, s / 3, 1 - s + s / 3]
    expected = -(t0[0] * math.log(0.2) + t0[1] * math.log(0.3) + t0[2] * math.log(0.5))
    _close(label_smoothing_loss(_logits(), torch.tensor([2, 0]), smoothing=s, reduction="none")[0], expected)
    logits = torch.randn(9, 5)
    hard = torch.randint(0, 5, (9,))
    soft = torch.softmax(torch.randn(9, 5), 1)
    for smoothing in (0.0, 0.1, 0.35):
        for targets in (hard, soft):
            torch.testing.assert_close(
                label_smoothing_loss(logits, targets, smoothing=smoothing, reduction="none"),
                F.cross_entropy(logits, targets, label_smoothing=smoothing, reduction="none"),
            )


def test_bootstrap_soft_hand() -> None:
    b = 0.95
    t0 = [(1 - b) * 0.2, (1 - b) * 0.3, b + (1 - b) * 0.5]
    expected = -(t0[0] * math.log(0.2) + t0[1] * math.log(0.3) + t0[2] * math.log(0.5))
    _close(bootstrap_soft_loss(_logits(), torch.tensor([2, 0]), beta=b, reduction="none")[0], expected)


def test_bootstrap_soft_target_is_detached() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    targets = torch.randint(0, 4, (5,))
    bootstrap_soft_loss(logits, targets, beta=0.7).backward()
    fixed = 0.7 * F.one_hot(targets, 4).float() + 0.3 * torch.softmax(logits.detach(), 1)
    reference = logits.detach().clone().requires_grad_()
    F.cross_entropy(reference, fixed).backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_bootstrap_hard_hand() -> None:
    b = 0.8
    # sample 0: label 2 = argmax; sample 1: label 1, argmax 0.
    expected = [-math.log(0.5), -(b * math.log(0.3) + (1 - b) * math.log(0.6))]
    _close(bootstrap_hard_loss(_logits(), torch.tensor([2, 1]), beta=b, reduction="none"), expected)


def test_entropy_hand() -> None:
    h0 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    h1 = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    _close(entropy_loss(_logits(), reduction="none"), [h0, h1])
    _close(entropy_loss(_logits()), (h0 + h1) / 2)
    # limits: uniform predictions have entropy log C, saturated ones ~0
    _close(entropy_loss(torch.zeros(2, 4)), math.log(4))
    assert entropy_loss(torch.tensor([[1e4, 0.0, 0.0]])) == 0


def test_prior_hand() -> None:
    mean_prediction = [(0.2 + 0.6) / 2, (0.3 + 0.3) / 2, (0.5 + 0.1) / 2]
    expected = sum((1 / 3) * math.log((1 / 3) / s) for s in mean_prediction)
    _close(prior_loss(_logits()), expected)
    prior = torch.tensor([0.5, 0.5, 0.0])
    expected = 0.5 * math.log(0.5 / mean_prediction[0]) + 0.5 * math.log(0.5 / mean_prediction[1])
    _close(prior_loss(_logits(), prior), expected)
    # zero when the mean prediction equals the prior
    _close(prior_loss(torch.tensor([[0.0, 0.0, 0.0]])), 0.0)


def test_kl_div_hand_and_ce_minus_entropy() -> None:
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = [0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.3), math.log(1 / 0.1)]
    _close(kl_div_loss(_logits(), soft, reduction="none"), expected)
    logits = torch.randn(6, 4)
    targets = torch.softmax(torch.randn(6, 4), 1)
    targets[0] = torch.tensor([0.0, 0.25, 0.75, 0.0])
    target_entropy = -torch.xlogy(targets, targets).sum(1)
    torch.testing.assert_close(
        kl_div_loss(logits, targets, reduction="none"),
        F.cross_entropy(logits, targets, reduction="none") - target_entropy,
    )
    torch.testing.assert_close(
        kl_div_loss(logits, targets), F.kl_div(torch.log_softmax(logits, 1), targets, reduction="batchmean")
    )


# --------------------------------------------------------------------------- properties shared by all losses


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_soft_one_hot_equals_hard(name: str) -> None:
    fn, kwargs = LOSSES[name]
    logits = torch.randn(6, 3)
    hard = torch.tensor([0, 1, 2, 2, 1, 0])
    soft = F.one_hot(hard, 3).float()
    assert torch.equal(fn(logits, hard, reduction="none", **kwargs), fn(logits, soft, reduction="none", **kwargs))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reductions(name: str) -> None:
    fn, kwargs = LOSSES[name]
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    per_sample = fn(logits, targets, reduction="none", **kwargs)
    assert per_sample.shape == (5,)
    torch.testing.assert_close(fn(logits, targets, **kwargs), per_sample.mean())
    torch.testing.assert_close(fn(logits, targets, reduction="sum", **kwargs), per_sample.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOSSES) + ["entropy", "prior"])
def test_extreme_logits_give_finite_float32_loss_and_gradient(name: str, dtype: torch.dtype) -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, 0.0, 1e4]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1, 0, 2])  # mostly wrong, saturated predictions
    if name == "entropy":
        loss = entropy_loss(logits)
    elif name == "prior":
        loss = prior_loss(logits)
    else:
        fn, kwargs = LOSSES[name]
        loss = fn(logits, targets, **kwargs)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad).all()


def test_half_precision_matches_float32() -> None:
    logits = torch.randn(6, 4)
    targets = torch.randint(0, 4, (6,))
    for fn in (cross_entropy_loss, gce_loss, mae_loss, sce_loss):
        torch.testing.assert_close(fn(logits.half(), targets), fn(logits.half().float(), targets))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda l, t: gce_loss(l, t, q=0.0), r"q must be in \(0, 1\], got 0.0"),
        (lambda l, t: gce_loss(l, t, q=1.5), r"q must be in \(0, 1\], got 1.5"),
        (lambda l, t: gce_loss(l, t, q=float("nan")), r"q must be in \(0, 1\], got nan"),
        (lambda l, t: truncated_gce_loss(l, t, k=1.0), r"k must be in \(0, 1\), got 1.0"),
        (lambda l, t: truncated_gce_loss(l, t, k=0), r"k must be in \(0, 1\), got 0"),
        (lambda l, t: truncated_gce_loss(l, t, weights=torch.tensor([1.0, -0.5])), r"weights must be in \[0, 1\], got -0.5"),
        (lambda l, t: truncated_gce_loss(l, t, weights=torch.ones(3)), r"weights must have shape \[2\], got shape \(3"),
        (lambda l, t: sce_loss(l, t, alpha=-0.1), r"alpha must be in \[0, inf\], got -0.1"),
        (lambda l, t: sce_loss(l, t, beta=-1.0), r"beta must be in \[0, inf\], got -1.0"),
        (lambda l, t: rce_loss(l, t, log_clamp=0.0), r"log_clamp must be in \[-inf, 0\), got 0.0"),
        (lambda l, t: label_smoothing_loss(l, t, smoothing=1.0), r"smoothing must be in \[0, 1\), got 1.0"),
        (lambda l, t: label_smoothing_loss(l, t, smoothing=-0.1), r"smoothing must be in \[0, 1\), got -0.1"),
        (lambda l, t: bootstrap_soft_loss(l, t, beta=1.2), r"beta must be in \[0, 1\], got 1.2"),
        (lambda l, t: bootstrap_hard_loss(l, t, beta=-0.2), r"beta must be in \[0, 1\], got -0.2"),
        (lambda l, t: cross_entropy_loss(l, t, reduction="avg"), r"reduction must be one of .*got 'avg'"),
        (lambda l, t: cross_entropy_loss(l, torch.tensor([0, 3])), r"targets must be class indices in \[0, 3\), got 3"),
        (lambda l, t: mae_loss(l, torch.tensor([-1, 0])), r"targets must be class indices in \[0, 3\), got -1"),
        (lambda l, t: gce_loss(l, torch.tensor([[0.5, 0.4, 0.0], [0, 0, 1.0]])), r"row 0 sums to 0.9"),
        (lambda l, t: gce_loss(l, torch.tensor([[1.5, -0.5, 0.0], [0, 0, 1.0]])), r"row 0 .*minimum -0.5"),
        (lambda l, t: gce_loss(l, torch.ones(2, 4) / 4), r"soft targets must have shape \[B, 3\], got shape \(2, 4\)"),
        (lambda l, t: gce_loss(l, torch.tensor([0.0, 1.0])), r"hard labels must be an integer tensor"),
        (lambda l, t: gce_loss(l, torch.tensor([0, 1, 2])), r"batch size of logits \(2\), got shape \(3,\)"),
        (lambda l, t: gce_loss(l[0], t), r"logits must have shape \[B, C\], got shape \(3,\)"),
        (lambda l, t: prior_loss(l, torch.tensor([0.5, 0.6, 0.0])), r"prior rows .* row 0 sums to 1.1"),
        (lambda l, t: prior_loss(l, torch.tensor([0.5, 0.5])), r"prior must be a floating tensor of shape \[3\]"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_logits(), torch.tensor([2, 0]))


def test_as_probabilities() -> None:
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(as_probabilities(torch.tensor([1, 0]), 3), expected)
    soft = torch.tensor([[0.25, 0.75]], dtype=torch.float16)
    assert as_probabilities(soft, 2).dtype == torch.float32
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        as_probabilities(torch.tensor([0]), 0)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_equivalence() -> None:
    expected = {"ce", "mae", "gce", "truncated_gce", "sce", "rce", "bootstrap_soft", "bootstrap_hard",
                "label_smoothing", "forward", "backward"}  # fmt: skip
    assert set(available_losses()) == expected
    logits, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(get_loss("gce", q=0.4)(logits, targets), gce_loss(logits, targets, q=0.4))
    torch.testing.assert_close(get_loss("ce")(logits, targets), F.cross_entropy(logits, targets))
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(
        get_loss("truncated_gce", k=0.3)(logits, targets, weights=w),
        truncated_gce_loss(logits, targets, k=0.3, weights=w),
    )


def test_registry_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown loss 'foo'; valid names: backward, bootstrap_hard"):
        get_loss("foo")
    with pytest.raises(ValueError, match=r"q must be in \(0, 1\], got 2"):
        get_loss("gce", q=2)
    with pytest.raises(ValueError, match="unknown argument 'qq' for loss 'gce'; accepted: q, reduction"):
        get_loss("gce", qq=0.5)
    with pytest.raises(ValueError, match="loss 'forward' requires the argument 'transition'"):
        get_loss("forward")
    with pytest.raises(ValueError, match="transition rows must sum to 1"):
        get_loss("backward", transition=torch.tensor([[0.5, 0.4], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        get_loss("bootstrap_hard", beta=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        get_loss("mae", reduction="max")


# --------------------------------------------------------------------------- mixup


def test_sample_mixup_lambda_reproducible_and_beta_distributed() -> None:
    draws = [sample_mixup_lambda(0.4, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    torch.manual_seed(3)
    first = sample_mixup_lambda(1.0)
    torch.manual_seed(3)
    assert sample_mixup_lambda(1.0) == first
    generator = torch.Generator().manual_seed(0)
    samples = np.array([sample_mixup_lambda(0.5, generator) for _ in range(1000)])
    assert stats.kstest(samples, stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(samples, stats.beta(2.0, 2.0).cdf).pvalue < 1e-3


def test_mixup_batch_mixes_inputs_and_targets_with_one_permutation() -> None:
    batch = 6
    x = torch.eye(batch)  # row i = e_i, so mixed row i = lam e_i + (1 - lam) e_perm(i)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_x, mixed_targets, lam = mixup_batch(x, targets, 4, 0.75, generator=torch.Generator().manual_seed(1))
    assert 0.0 <= lam <= 1.0 and mixed_targets.shape == (batch, 4) and mixed_targets.dtype == torch.float32
    perm = (mixed_x - lam * x).argmax(dim=1) if lam < 1 else torch.arange(batch)
    assert sorted(perm.tolist()) == list(range(batch))
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(targets, 4).float()
    torch.testing.assert_close(mixed_targets, lam * onehot + (1 - lam) * onehot[perm])
    torch.testing.assert_close(mixed_targets.sum(1), torch.ones(batch))


def test_mixup_lambda_min_half() -> None:
    generator = torch.Generator().manual_seed(0)
    x, targets = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    lams = [mixup_batch(x, targets, 2, 0.3, generator=generator, lambda_min_half=True)[2] for _ in range(50)]
    assert min(lams) >= 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, r"alpha must be in \(0, inf\], got 0.0"),
        ({"alpha": -1.0}, r"alpha must be in \(0, inf\], got -1.0"),
        ({"alpha": 1.0, "targets": torch.tensor([0, 5])}, r"targets must be class indices in \[0, 3\), got 5"),
        ({"alpha": 1.0, "x": torch.zeros(2, 2, dtype=torch.long)}, r"x must be a floating tensor"),
        ({"alpha": 1.0, "generator": 3}, r"generator must be a torch.Generator or None, got int"),
    ],
)
def test_mixup_bad_input(kwargs: dict, match: str) -> None:
    arguments = {"x": torch.zeros(2, 2), "targets": torch.tensor([0, 1]), "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        mixup_batch(**arguments)


def test_one_hot_rows_equals_torch_one_hot_and_refuses_a_label_out_of_range() -> None:
    labels = torch.tensor([2, 0, 3, 3])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(one_hot_rows(labels, 4, dtype), F.one_hot(labels, 4).to(dtype))
    with pytest.raises(RuntimeError, match="index 4 is out of bounds"):
        one_hot_rows(torch.tensor([1, 4]), 4)
