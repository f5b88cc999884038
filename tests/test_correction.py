"""Tests of forward / backward loss correction and the anchor-point estimator (Patrini et al., CVPR 2017)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_noisy.losses import (
    backward_corrected_loss,
    estimate_transition_matrix,
    forward_corrected_loss,
    validate_transition_matrix,
)
from lightning_noisy.losses.correction import anchor_candidates

T2 = [[0.9, 0.1], [0.3, 0.7]]


def _logits2() -> torch.Tensor:
    # softmax = [0.2, 0.8] and [0.6, 0.4]
    return torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64).log().float()


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, backward_corrected_loss])
def test_identity_transition_gives_cross_entropy(loss_fn) -> None:
    logits = torch.randn(7, 4) * 3
    hard = torch.randint(0, 4, (7,))
    soft = torch.softmax(torch.randn(7, 4), 1)
    for targets in (hard, soft):
        torch.testing.assert_close(
            loss_fn(logits, targets, torch.eye(4), reduction="none"), F.cross_entropy(logits, targets, reduction="none")
        )


def test_forward_hand() -> None:
    # noisy posterior p^T T: [0.2*0.9 + 0.8*0.3, 0.2*0.1 + 0.8*0.7] and [0.6*0.9 + 0.4*0.3, 0.6*0.1 + 0.4*0.7]
    noisy0 = [0.2 * 0.9 + 0.8 * 0.3, 0.2 * 0.1 + 0.8 * 0.7]
    noisy1 = [0.6 * 0.9 + 0.4 * 0.3, 0.6 * 0.1 + 0.4 * 0.7]
    loss = forward_corrected_loss(_logits2(), torch.tensor([0, 1]), torch.tensor(T2), reduction="none")
    _close(loss, [-math.log(noisy0[0]), -math.log(noisy1[1])])
    soft = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    loss = forward_corrected_loss(_logits2(), soft, torch.tensor(T2), reduction="none")
    _close(loss, [-(0.5 * math.log(noisy0[0]) + 0.5 * math.log(noisy0[1])), -math.log(noisy1[1])])


def test_backward_hand() -> None:
    det = 0.9 * 0.7 - 0.1 * 0.3
    inverse = [[0.7 / det, -0.1 / det], [-0.3 / det, 0.9 / det]]
    ell0 = [-math.log(0.2), -math.log(0.8)]
    ell1 = [-math.log(0.6), -math.log(0.4)]
    expected = [
        inverse[0][0] * ell0[0] + inverse[0][1] * ell0[1],  # label 0
        inverse[1][0] * ell1[0] + inverse[1][1] * ell1[1],  # label 1
    ]
    _close(backward_corrected_loss(_logits2(), torch.tensor([0, 1]), torch.tensor(T2), reduction="none"), expected)


def test_backward_is_unbiased_for_the_clean_loss() -> None:
    # E_{noisy ~ T[clean]} [backward loss(noisy)] = CE(clean) (Patrini et al., Theorem 1)
    transition = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
    logits = torch.randn(5, 3)
    clean = torch.tensor([0, 1, 2, 2, 0])
    per_noisy_label = torch.stack(
        [backward_corrected_loss(logits, torch.full((5,), j), transition, reduction="none") for j in range(3)], dim=1
    )
    expected = (transition[clean] * per_noisy_label).sum(1)
    torch.testing.assert_close(expected, F.cross_entropy(logits, clean, reduction="none"), rtol=1e-5, atol=1e-5)


def test_forward_matches_direct_probability_computation() -> None:
    transition = torch.tensor([[0.6, 0.3, 0.1], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 1, 0, 2])
    noisy = torch.softmax(logits, 1) @ transition
    torch.testing.assert_close(
        forward_corrected_loss(logits, targets, transition, reduction="none"),
        -noisy.log().gather(1, targets[:, None]).squeeze(1),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("loss_fn", [forward_corrected_loss, backward_corrected_loss])
def test_extreme_logits_and_zero_entries_are_finite(loss_fn, dtype: torch.dtype) -> None:
    transition = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]], dtype=dtype, requires_grad=True)
    loss = loss_fn(logits, torch.tensor([2, 0]), transition)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradient_flows_into_transition() -> None:
    transition = torch.tensor(T2, requires_grad=True)
    forward_corrected_loss(_logits2(), torch.tensor([0, 1]), transition).backward()
    assert transition.grad is not None and torch.isfinite(transition.grad).all()


def test_backward_rejects_singular_transition() -> None:
    singular = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="singular or ill-conditioned.*condition number"):
        backward_corrected_loss(_logits2(), torch.tensor([0, 1]), singular)
    nearly = torch.tensor([[0.5, 0.5], [0.49, 0.51]])  # condition number ~ 100
    with pytest.raises(ValueError, match="exceeds max_condition=10"):
        backward_corrected_loss(_logits2(), torch.tensor([0, 1]), nearly, max_condition=10.0)
    assert torch.isfinite(backward_corrected_loss(_logits2(), torch.tensor([0, 1]), nearly))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("transition", "match"),
    [
        (torch.tensor([[0.9, 0.1], [0.5, 0.4]]), r"transition rows must sum to 1 \(tol 0.0001\); row 1 sums to 0.9"),
        (torch.tensor([[1.2, -0.2], [0.0, 1.0]]), r"finite and non-negative; row 0"),
        (torch.eye(3), r"transition must have shape \[2, 2\], got shape \(3, 3\)"),
        (torch.ones(2, 3) / 3, r"transition must have shape \[2, 2\], got shape \(2, 3\)"),
        (torch.eye(2, dtype=torch.long), r"transition must be a floating point tensor"),
    ],
)
def test_validate_transition_matrix(transition: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_transition_matrix(transition, 2)
    with pytest.raises(ValueError, match=match):
        forward_corrected_loss(_logits2(), torch.tensor([0, 1]), transition)


def test_validate_transition_matrix_accepts_stochastic_rows() -> None:
    validate_transition_matrix(torch.tensor(T2), 2)
    validate_transition_matrix(torch.tensor([[1.0, 5e-5], [0.0, 1.0]]), 2)  # within tol 1e-4


def test_correction_bad_targets() -> None:
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 2\), got 2"):
        forward_corrected_loss(_logits2(), torch.tensor([0, 2]), torch.tensor(T2))
    with pytest.raises(ValueError, match=r"row 1 sums to 0.5"):
        backward_corrected_loss(_logits2(), torch.tensor([[1.0, 0.0], [0.25, 0.25]]), torch.tensor(T2))


# --------------------------------------------------------------------------- anchor-point estimator


def _noisy_posteriors(transition: torch.Tensor, anchors_per_class: int, mixed: int, seed: int) -> torch.Tensor:
    """Clean posteriors: nearly one-hot anchors (99.5% mass) plus mixtures; noisy = clean @ T."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = transition.shape[0]
    eye = torch.eye(num_classes)
    anchors = (0.995 * eye + 0.005 / num_classes).repeat_interleave(anchors_per_class, dim=0)
    mixtures = torch.distributions.Dirichlet(torch.full((num_classes,), 1.0)).sample((mixed,))
    mixtures = 0.7 * mixtures + 0.3 / num_classes  # keep mixed samples well away from the corners
    clean = torch.cat([anchors, mixtures])[torch.randperm(anchors_per_class * num_classes + mixed, generator=generator)]
    return clean @ transition


def test_estimator_recovers_known_transition() -> None:
    torch.manual_seed(0)
    transition = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.8, 0.0, 0.1], [0.0, 0.3, 0.6, 0.1], [0.2, 0.0, 0.1, 0.7]])
    probs = _noisy_posteriors(transition, anchors_per_class=50, mixed=800, seed=1)
    for filter_outlier in (True, False):
        estimate = estimate_transition_matrix(probs, filter_outlier=filter_outlier)
        torch.testing.assert_close(estimate.sum(1), torch.ones(4))
        assert (estimate - transition).abs().max() < 1e-2


def test_estimator_percentile_matches_numpy_higher() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(203, 5) * 2, 1)
    estimate = estimate_transition_matrix(probs, percentile=90.0)
    for i in range(5):
        value = np.percentile(probs[:, i].numpy(), 90.0, method="higher")
        row = probs[(probs[:, i] == torch.tensor(value)).nonzero()[0, 0]]
        torch.testing.assert_close(estimate[i], row / row.sum())


def test_estimator_filter_outlier_ignores_the_arg_max() -> None:
    transition = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    probs = _noisy_posteriors(transition, anchors_per_class=20, mixed=200, seed=2)
    outlier = torch.tensor([[0.99, 0.01]])  # a single over-confident sample beyond every anchor of class 0
    probs = torch.cat([probs, outlier])
    robust = estimate_transition_matrix(probs, percentile=97.0, filter_outlier=True)
    greedy = estimate_transition_matrix(probs, filter_outlier=False)
    torch.testing.assert_close(greedy[0], outlier[0])
    assert (robust - transition).abs().max() < 1e-2


def test_estimator_ties_go_to_the_later_sample() -> None:
    # tied entries in rows that differ elsewhere, so the choice shows
    wide = torch.tensor([[0.5, 0.1, 0.4], [0.3, 0.3, 0.4], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.6, 0.2]])
    greedy = estimate_transition_matrix(wide, filter_outlier=False)
    torch.testing.assert_close(greedy[0], wide[2])  # rows 0 and 2 tie at 0.5: the later one
    torch.testing.assert_close(greedy[1], wide[4])  # rows 3 and 4 tie at 0.6
    # the 50th percentile of class 2: ascending 0.2, 0.2, 0.3, 0.4, 0.4 -> position 2 (0.3, row 3)
    torch.testing.assert_close(estimate_transition_matrix(wide, percentile=50.0)[2], wide[3])
    # position 3 of [0.2, 0.2, 0.3, 0.4, 0.4] is the earlier 0.4 (row 0), position 4 the later (row 1)
    torch.testing.assert_close(estimate_transition_matrix(wide, percentile=75.0)[2], wide[0])
    torch.testing.assert_close(estimate_transition_matrix(wide, percentile=100.0)[2], wide[1])


def test_anchor_candidates_of_blocks_are_the_candidates_of_the_whole() -> None:
    generator = torch.Generator().manual_seed(4)
    values = torch.randint(0, 5, (40, 3), generator=generator).float()  # many ties
    index = torch.arange(40) * 3
    whole_values, whole_index = anchor_candidates(values, index, 7)
    blocks = [anchor_candidates(values[a:b], index[a:b], 7) for a, b in ((0, 11), (11, 30), (30, 40))]
    merged = anchor_candidates(torch.cat([v for v, _ in blocks]), torch.cat([i for _, i in blocks]), 7)
    assert torch.equal(merged[0], whole_values) and torch.equal(merged[1], whole_index)
    # the order is value descending, then index descending
    for column in range(3):
        keys = list(zip(whole_values[:, column].tolist(), whole_index[:, column].tolist()))
        assert keys == sorted(keys, reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"percentile": 0.0}, r"percentile must be in \(0, 100\], got 0.0"),
        ({"percentile": 100.5}, r"percentile must be in \(0, 100\], got 100.5"),
        ({"filter_outlier": 1}, r"filter_outlier must be a bool, got 1"),
        ({"probs": torch.ones(3)}, r"probs must be a floating tensor of shape \[N, C\]"),
        ({"probs": torch.tensor([[0.5, 0.6]])}, r"probs rows .* row 0 sums to 1.1"),
    ],
)
def test_estimator_bad_input(kwargs: dict, match: str) -> None:
    probs = kwargs.pop("probs", torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=match):
        estimate_transition_matrix(probs, **kwargs)
