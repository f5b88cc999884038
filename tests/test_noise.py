"""Tests of the pure noise generators and noisy-label file I/O.

Tolerances on realised rates are 4 binomial standard deviations, ``4 * sqrt(p (1 - p) / n)``:
each sample flips independently with probability ``p``, so the realised share of ``n`` samples
has that standard deviation and lies outside 4 of them with probability below 1e-4 (the seeds
are fixed, so a pass is deterministic; the bound says the generator has the right rate).
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from lightning_noisy.data import (
    CIFAR10_ASYMMETRIC_MAP,
    MNIST_ASYMMETRIC_MAP,
    NoisyLabels,
    asymmetric_noise,
    instance_dependent_noise,
    load_cifar_n_labels,
    load_noisy_labels,
    make_noisy_labels,
    no_noise,
    pair_flip_noise,
    resolve_class_map,
    save_corrected_labels,
    save_noisy_labels,
    symmetric_noise,
    transition_matrix,
)

N, C = 20_000, 10


def four_sigma(p: float, n: int) -> float:
    return 4.0 * math.sqrt(p * (1.0 - p) / n)


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(123))


def assert_consistent(result: NoisyLabels, clean: torch.Tensor) -> None:
    """Fields agree with each other: realised rate and transition matrix recomputed from the labels."""
    assert result.labels.dtype == torch.int64 and result.labels.shape == clean.shape
    assert torch.equal(result.clean_labels, clean)
    assert result.noise_rate == pytest.approx((result.labels != clean).double().mean().item(), abs=0)
    assert result.transition_matrix.dtype == torch.float64
    torch.testing.assert_close(result.transition_matrix.sum(1), torch.ones(result.num_classes, dtype=torch.float64))


# ------------------------------------------------------------------ transition matrix
def test_transition_matrix_hand_computed() -> None:
    clean = torch.tensor([0, 0, 0, 1, 1, 2])
    noisy = torch.tensor([0, 1, 1, 1, 0, 2])
    expected = torch.tensor(
        [[1 / 3, 2 / 3, 0, 0], [1 / 2, 1 / 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],  # class 3 absent: identity row
        dtype=torch.float64,
    )
    torch.testing.assert_close(transition_matrix(clean, noisy, 4), expected)
    torch.testing.assert_close(transition_matrix(clean.numpy(), noisy.numpy(), 4), expected)


def test_transition_matrix_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"noisy must have the shape of clean \(3,\), got \(2,\)"):
        transition_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 2)


def test_no_noise_is_identity(clean: torch.Tensor) -> None:
    result = no_noise(clean, C)
    assert torch.equal(result.labels, clean) and result.noise_rate == 0.0
    torch.testing.assert_close(result.transition_matrix, torch.eye(C, dtype=torch.float64))


# ------------------------------------------------------------------ symmetric
def test_symmetric_other_classes_rate_and_uniform_targets(clean: torch.Tensor) -> None:
    result = symmetric_noise(clean, C, 0.4, seed=1)
    assert_consistent(result, clean)
    assert abs(result.noise_rate - 0.4) < four_sigma(0.4, N)
    # each off-diagonal entry is rate / (C - 1); each row has about N / C = 2000 samples
    off = result.transition_matrix[~torch.eye(C, dtype=torch.bool)]
    p = 0.4 / (C - 1)
    assert (off - p).abs().max() < four_sigma(p, 1800)


def test_symmetric_other_classes_rate_one_changes_every_label(clean: torch.Tensor) -> None:
    result = symmetric_noise(clean, C, 1.0, seed=2)
    assert result.noise_rate == 1.0
    assert torch.all(result.transition_matrix.diagonal() == 0)


def test_symmetric_include_true_class_rate(clean: torch.Tensor) -> None:
    result = symmetric_noise(clean, C, 0.4, include_true_class=True, seed=1)
    assert_consistent(result, clean)
    expected = 0.4 * (C - 1) / C
    assert abs(result.noise_rate - expected) < four_sigma(expected, N)
    # the diagonal is (1 - rate) + rate / C
    diagonal = result.transition_matrix.diagonal()
    assert (diagonal - (0.6 + 0.04)).abs().max() < four_sigma(0.36, 1800)


@pytest.mark.parametrize("n", [1001, 1000, 7])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_symmetric_exact_is_exact(n: int, rate: float) -> None:
    labels = torch.arange(n) % 3
    result = symmetric_noise(labels, 3, rate, exact=True, seed=5)
    assert result.noise_rate == round(rate * n) / n


def test_symmetric_exact_include_true_class_bounded(clean: torch.Tensor) -> None:
    result = symmetric_noise(clean, C, 0.5, include_true_class=True, exact=True, seed=3)
    changed = int((result.labels != clean).sum())
    assert changed <= round(0.5 * N)  # a selected sample may redraw its own class
    # of the 10,000 selected, 9/10 change on average
    assert abs(changed / 10_000 - 0.9) < four_sigma(0.9, 10_000)


# ------------------------------------------------------------------ asymmetric and pair flip
@pytest.mark.parametrize("class_map", [CIFAR10_ASYMMETRIC_MAP, MNIST_ASYMMETRIC_MAP])
def test_asymmetric_touches_only_mapped_classes(clean: torch.Tensor, class_map: dict[int, int]) -> None:
    result = asymmetric_noise(clean, C, 0.4, class_map, seed=4)
    assert_consistent(result, clean)
    t = result.transition_matrix
    for c in range(C):
        row = torch.zeros(C, dtype=torch.float64)
        if c not in class_map:
            row[c] = 1.0
            torch.testing.assert_close(t[c], row, rtol=0, atol=0)
        else:
            n_c = int((clean == c).sum())
            assert abs(t[c, class_map[c]].item() - 0.4) < four_sigma(0.4, n_c)
            assert t[c, c].item() + t[c, class_map[c]].item() == pytest.approx(1.0)  # nothing else


def test_asymmetric_exact_per_class_counts(clean: torch.Tensor) -> None:
    result = asymmetric_noise(clean, C, 0.35, "cifar10", exact=True, seed=4)
    for c, target in CIFAR10_ASYMMETRIC_MAP.items():
        members = clean == c
        assert int((result.labels[members] == target).sum()) == round(0.35 * int(members.sum()))
        assert int((result.labels[members] != c).sum()) == round(0.35 * int(members.sum()))
    unmapped = ~torch.isin(clean, torch.tensor(list(CIFAR10_ASYMMETRIC_MAP)))
    assert torch.equal(result.labels[unmapped], clean[unmapped])


def test_asymmetric_cat_dog_swap() -> None:
    labels = torch.tensor([3] * 4 + [5] * 4)
    result = asymmetric_noise(labels, 10, 1.0, "cifar10", seed=0)
    assert result.labels.tolist() == [5] * 4 + [3] * 4


def test_pair_flip_targets_and_rate(clean: torch.Tensor) -> None:
    result = pair_flip_noise(clean, C, 0.45, seed=6)
    assert_consistent(result, clean)
    changed = result.labels != clean
    assert torch.equal(result.labels[changed], (clean[changed] + 1) % C)
    assert abs(result.noise_rate - 0.45) < four_sigma(0.45, N)


def test_pair_flip_exact_per_class() -> None:
    labels = torch.tensor([0] * 5 + [1] * 10 + [2] * 3)
    result = pair_flip_noise(labels, 3, 0.5, exact=True, seed=0)
    # round(2.5) = 2 and round(1.5) = 2 (half to even, as Python's round)
    expected_counts = {0: 2, 1: 5, 2: 2}
    for c, k in expected_counts.items():
        flipped = result.labels[labels == c]
        assert int((flipped == (c + 1) % 3).sum()) == k
        assert int((flipped == c).sum()) == int((labels == c).sum()) - k


# ------------------------------------------------------------------ instance-dependent
def truncated_normal_mean(mu: float, sigma: float) -> float:
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    a, b = (0 - mu) / sigma, (1 - mu) / sigma
    return mu + sigma * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


@pytest.mark.parametrize(("rate", "rate_std"), [(0.4, 0.1), (0.2, 0.0), (0.05, 0.1)])
def test_instance_dependent_rate(clean: torch.Tensor, rate: float, rate_std: float) -> None:
    features = torch.randn(N, 1, 8, generator=torch.Generator().manual_seed(0))
    result = instance_dependent_noise(features, clean, C, rate, rate_std=rate_std, seed=7)
    assert_consistent(result, clean)
    # marginally each sample flips with probability E[q]
    expected = rate if rate_std == 0 else truncated_normal_mean(rate, rate_std)
    assert abs(result.noise_rate - expected) < four_sigma(expected, N)


def test_instance_dependent_target_depends_on_features() -> None:
    # with large features the softmax is one-hot: identical inputs of one class flip to one class
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(2, 16, generator=gen) * 100
    features = prototypes.repeat_interleave(300, dim=0)
    labels = torch.zeros(600, dtype=torch.int64)
    result = instance_dependent_noise(features, labels, 5, 1.0, rate_std=0.0, seed=1)
    first, second = result.labels[:300], result.labels[300:]
    assert result.noise_rate == 1.0
    assert (first == first[0]).all() and (second == second[0]).all()


def test_instance_dependent_zero_rate_keeps_labels(clean: torch.Tensor) -> None:
    result = instance_dependent_noise(torch.randn(N, 3), clean, C, 0.0, rate_std=0.0, seed=0)
    assert torch.equal(result.labels, clean)


# ------------------------------------------------------------------ seeding
GENERATORS = {
    "symmetric": lambda y, s: symmetric_noise(y, C, 0.3, seed=s),
    "symmetric_all": lambda y, s: symmetric_noise(y, C, 0.3, include_true_class=True, exact=True, seed=s),
    "asymmetric": lambda y, s: asymmetric_noise(y, C, 0.3, "mnist", exact=True, seed=s),
    "pairflip": lambda y, s: pair_flip_noise(y, C, 0.3, seed=s),
    "instance": lambda y, s: instance_dependent_noise(
        torch.arange(y.numel() * 4, dtype=torch.float32).reshape(-1, 4) % 7, y, C, 0.3, seed=s
    ),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_seeding_is_local_and_reproducible(name: str) -> None:
    generate = GENERATORS[name]
    labels = torch.arange(2000) % C
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    first, again, other = generate(labels, 11), generate(labels, 11), generate(labels, 12)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.labels, other.labels)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))


def test_numpy_labels_accepted() -> None:
    labels = np.arange(100, dtype=np.int32) % 4
    result = symmetric_noise(labels, 4, 0.5, seed=0)
    assert torch.equal(result.labels, symmetric_noise(torch.from_numpy(labels).long(), 4, 0.5, seed=0).labels)
    assert result.clean_labels.dtype == torch.int64


# ------------------------------------------------------------------ class maps
def test_resolve_class_map() -> None:
    assert resolve_class_map("cifar10", 10) == CIFAR10_ASYMMETRIC_MAP
    assert resolve_class_map("MNIST", 10) == MNIST_ASYMMETRIC_MAP
    assert resolve_class_map({"2": "7", 3: 8}, 10) == {2: 7, 3: 8}


# ------------------------------------------------------------------ dispatcher
def test_make_noisy_labels_dispatches(clean: torch.Tensor, tmp_path) -> None:
    features = torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    cases = {
        "none": no_noise(clean, C),
        "symmetric": symmetric_noise(clean, C, 0.2, include_true_class=True, seed=3),
        "asymmetric": asymmetric_noise(clean, C, 0.2, "cifar10", exact=True, seed=3),
        "pairflip": pair_flip_noise(clean, C, 0.2, seed=3),
        "instance": instance_dependent_noise(features, clean, C, 0.2, seed=3),
    }
    for noise_type, expected in cases.items():
        result = make_noisy_labels(
            noise_type,
            clean,
            C,
            0.2,
            seed=3,
            features=features,
            class_map="cifar10",
            include_true_class=True,
            exact=noise_type == "asymmetric",
        )
        assert torch.equal(result.labels, expected.labels), noise_type
    path = tmp_path / "noise.pt"
    save_noisy_labels(path, cases["pairflip"])
    loaded = make_noisy_labels("file", clean, C, 0.0, path=path)
    assert torch.equal(loaded.labels, cases["pairflip"].labels)


# ------------------------------------------------------------------ file I/O
def test_save_load_round_trip(clean: torch.Tensor, tmp_path) -> None:
    noisy = symmetric_noise(clean, C, 0.3, seed=9)
    path = tmp_path / "sub" / "noisy.pt"
    save_noisy_labels(path, noisy, noise_type="symmetric", rate=0.3, seed=9, class_map={"3": 5})
    loaded = load_noisy_labels(path, C)
    assert torch.equal(loaded.labels, noisy.labels) and torch.equal(loaded.clean_labels, noisy.clean_labels)
    assert loaded.noise_rate == noisy.noise_rate
    assert torch.equal(loaded.transition_matrix, noisy.transition_matrix)
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"] == {"noise_type": "symmetric", "rate": 0.3, "seed": 9, "class_map": {"3": 5}}
    assert [p.name for p in path.parent.iterdir()] == ["noisy.pt"]  # no temporary file left


def test_load_npy_and_csv(tmp_path) -> None:
    labels = np.array([2, 0, 1, 1, 2], dtype=np.int64)
    clean = torch.tensor([2, 0, 1, 0, 0])
    np.save(tmp_path / "l.npy", labels)
    (tmp_path / "plain.csv").write_text("2\n0\n1\n1\n2\n")
    (tmp_path / "header.csv").write_text("id,label\n10,2\n11,0\n12,1\n13,1\n14,2\n")
    for name in ("l.npy", "plain.csv", "header.csv"):
        result = load_noisy_labels(tmp_path / name, 3, clean_labels=clean)
        assert result.labels.tolist() == labels.tolist(), name
        assert result.noise_rate == pytest.approx(2 / 5)
    unknown = load_noisy_labels(tmp_path / "plain.csv", 3)
    assert unknown.clean_labels is None and math.isnan(unknown.noise_rate)
    assert torch.isnan(unknown.transition_matrix).all()


def test_file_length_mismatch(tmp_path) -> None:
    np.save(tmp_path / "l.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="holds 4 labels but clean_labels has 5"):
        load_noisy_labels(tmp_path / "l.npy", 3, clean_labels=torch.zeros(5, dtype=torch.int64))


def test_pt_clean_labels_must_agree(tmp_path) -> None:
    save_noisy_labels(tmp_path / "n.pt", no_noise(torch.tensor([0, 1, 1]), 2))
    with pytest.raises(ValueError, match=r"clean_labels disagree .* at 1 positions"):
        load_noisy_labels(tmp_path / "n.pt", 2, clean_labels=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="num_classes=3 disagrees with the 2 classes"):
        load_noisy_labels(tmp_path / "n.pt", 3)


def test_save_validates_before_writing(tmp_path) -> None:
    noisy = no_noise(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"metadata .*'bad'.* got <object"):
        save_noisy_labels(tmp_path / "n.pt", noisy, bad=object())
    with pytest.raises(ValueError, match=r"path must end with '.pt', got '.*n.npy'"):
        save_noisy_labels(tmp_path / "n.npy", noisy)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ CIFAR-N
def write_cifar10n(path, clean: np.ndarray, worse: np.ndarray) -> None:
    keys = ("aggre_label", "random_label1", "random_label2", "random_label3")
    torch.save({"clean_label": clean, "worse_label": worse, **{k: clean.copy() for k in keys}}, path)


def test_cifar_n_loader(tmp_path) -> None:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 10, 300)
    worse = np.where(rng.random(300) < 0.4, rng.integers(0, 10, 300), clean)
    write_cifar10n(tmp_path / "CIFAR-10_human.pt", clean, worse)
    result = load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "worse_label", 10)
    assert result.labels.tolist() == worse.tolist() and result.clean_labels.tolist() == clean.tolist()
    assert result.noise_rate == pytest.approx(float(np.mean(worse != clean)))
    same = load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "aggre_label", 10, clean_labels=torch.from_numpy(clean))
    assert same.noise_rate == 0.0
    with pytest.raises(ValueError, match="clean_labels disagree"):
        load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "worse_label", 10, clean_labels=torch.zeros(300).long())
    with pytest.raises(ValueError, match="label_key 'noisy_label' is not in"):
        load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "noisy_label", 10)


def test_cifar100n_coarse(tmp_path) -> None:
    fine = np.arange(200) % 100
    coarse = fine // 5
    noisy_coarse = (coarse + (np.arange(200) % 4 == 0)) % 20
    payload = {
        "clean_label": fine,
        "noisy_label": fine,
        "clean_coarse_label": coarse,
        "noisy_coarse_label": noisy_coarse,
    }
    torch.save(payload, tmp_path / "c100.pt")
    result = load_cifar_n_labels(tmp_path / "c100.pt", "noisy_coarse_label", 20)
    assert result.clean_labels.tolist() == coarse.tolist()
    assert result.noise_rate == pytest.approx(0.25)


# ------------------------------------------------------------------ bad input
LABELS = torch.tensor([0, 1, 2, 1])
BAD_CALLS = [
    ("labels_out_of_range", lambda: symmetric_noise(torch.tensor([0, 3]), 3, 0.1), ["labels", "[0, 3]"]),
    ("labels_negative", lambda: pair_flip_noise(torch.tensor([-1, 0]), 3, 0.1), ["labels", "[-1, 0]"]),
    ("labels_float", lambda: no_noise(torch.tensor([0.0, 1.0]), 2), ["labels", "torch.float32"]),
    ("labels_2d", lambda: no_noise(torch.zeros(2, 2, dtype=torch.long), 2), ["labels", "(2, 2)"]),
    ("num_classes_one", lambda: symmetric_noise(torch.zeros(3).long(), 1, 0.1), ["num_classes", "1"]),
    ("num_classes_too_small", lambda: symmetric_noise(LABELS, 2, 0.1), ["num_classes=2", "[0, 2]"]),
    ("rate_high", lambda: symmetric_noise(LABELS, 3, 1.5), ["rate", "1.5"]),
    ("rate_negative", lambda: pair_flip_noise(LABELS, 3, -0.1), ["rate", "-0.1"]),
    ("rate_nan", lambda: asymmetric_noise(LABELS, 3, float("nan"), {0: 1}), ["rate", "nan"]),
    ("seed_negative", lambda: symmetric_noise(LABELS, 3, 0.1, seed=-1), ["seed", "-1"]),
    ("map_self", lambda: resolve_class_map({1: 1}, 3), ["class_map", "{1: 1}"]),
    ("map_range", lambda: asymmetric_noise(LABELS, 3, 0.1, {0: 5}), ["class_map", "{0: 5}"]),
    ("map_name", lambda: resolve_class_map("svhn", 10), ["class_map", "'svhn'"]),
    ("map_key", lambda: resolve_class_map({"two": 1}, 3), ["class_map", "'two'"]),
    ("map_empty", lambda: resolve_class_map({}, 3), ["class_map", "{}"]),
    ("noise_type", lambda: make_noisy_labels("gaussian", LABELS, 3, 0.1), ["noise_type", "'gaussian'"]),
    ("needs_map", lambda: make_noisy_labels("asymmetric", LABELS, 3, 0.1), ["class_map", "None"]),
    ("needs_features", lambda: make_noisy_labels("instance", LABELS, 3, 0.1), ["features", "None"]),
    ("needs_path", lambda: make_noisy_labels("file", LABELS, 3, 0.1), ["path", "None"]),
    ("needs_key", lambda: make_noisy_labels("cifar_n", LABELS, 3, 0.1, path="x.pt"), ["label_key", "None"]),
    ("feature_count", lambda: instance_dependent_noise(torch.zeros(3, 2), LABELS, 3, 0.1), ["features", "(3, 2)"]),
    (
        "feature_nan",
        lambda: instance_dependent_noise(torch.full((4, 2), math.nan), LABELS, 3, 0.1),
        ["features", "(4, 2)"],
    ),
    (
        "rate_std",
        lambda: instance_dependent_noise(torch.zeros(4, 2), LABELS, 3, 0.1, rate_std=-1.0),
        ["rate_std", "-1.0"],
    ),
    ("label_key", lambda: load_cifar_n_labels("x.pt", "best_label", 10), ["label_key", "'best_label'"]),
    ("file_suffix", lambda: load_noisy_labels("labels.txt", 3), ["path", "labels.txt"]),
]


@pytest.mark.parametrize(("call", "fragments"), [(c, f) for _, c, f in BAD_CALLS], ids=[i for i, _, _ in BAD_CALLS])
def test_bad_input_raises(call, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_csv_contents(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=r"without a 'label' column, got columns \['x', 'y'\]"):
        load_noisy_labels(tmp_path / "a.csv", 3)
    (tmp_path / "b.csv").write_text("label\n1\ncat\n")
    with pytest.raises(ValueError, match=r"must hold integer labels, got 'cat' as label 1 .*; 1 of 2 are not integers"):
        load_noisy_labels(tmp_path / "b.csv", 3)
    (tmp_path / "d.csv").write_text("label\n")
    with pytest.raises(ValueError, match="must hold integer labels, got a header and no labels"):
        load_noisy_labels(tmp_path / "d.csv", 3)
    (tmp_path / "c.csv").write_text("1\n-1\n")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*got values in \[-1, 1\]"):
        load_noisy_labels(tmp_path / "c.csv", 3)


# ------------------------------------------------------------------ corrected labels
def test_save_corrected_soft_labels_round_trip(tmp_path) -> None:
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    path = save_corrected_labels(tmp_path / "c.pt", soft, clean_labels=torch.tensor([0, 2, 0]), source="test")
    loaded = load_noisy_labels(path, 3)
    assert loaded.labels.tolist() == [0, 2, 1] and loaded.noise_rate == pytest.approx(1 / 3)
    payload = torch.load(path, weights_only=True)
    assert torch.equal(payload["soft_labels"], soft) and payload["metadata"] == {"source": "test"}


def test_save_corrected_hard_labels(tmp_path) -> None:
    path = save_corrected_labels(tmp_path / "h.pt", torch.tensor([1, 0, 1]), num_classes=5)
    assert load_noisy_labels(path, 5).labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"num_classes=4 disagrees with the 5 classes"):
        load_noisy_labels(path, 4)


def test_save_corrected_rejects_non_distributions(tmp_path) -> None:
    first_row = r"probability rows .* got 1 of 2 rows that are not; the first is row 0: \[0.5, 0.6\] \(sum 1.1\)"
    with pytest.raises(ValueError, match=first_row):
        save_corrected_labels(tmp_path / "bad.pt", torch.tensor([[0.5, 0.6], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"got 2 of 3 rows that are not; the first is row 1: \[-0.5, 1.5\] \(sum 1\)"):
        save_corrected_labels(tmp_path / "bad.pt", torch.tensor([[0.5, 0.5], [-0.5, 1.5], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"num_classes must match the 2 columns of labels, got 3"):
        save_corrected_labels(tmp_path / "bad.pt", torch.tensor([[0.5, 0.5]]), num_classes=3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("num_classes", "rate"), [(10, 0.9), (10, 1.0), (2, 0.5)])
def test_symmetric_noise_that_leaves_the_labels_uninformative_is_warned_about(num_classes: int, rate: float) -> None:
    labels = torch.arange(200) % num_classes
    with pytest.warns(UserWarning, match=rf"from rate {(num_classes - 1) / num_classes:.3g} on, the labels say nothing"):
        symmetric_noise(labels, num_classes, rate, seed=0)


@pytest.mark.parametrize(("rate", "include_true_class"), [(0.89, False), (0.9, True), (1.0, True)])
def test_informative_symmetric_noise_is_not_warned_about(rate: float, include_true_class: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        symmetric_noise(torch.arange(200) % 10, 10, rate, include_true_class=include_true_class, seed=0)
