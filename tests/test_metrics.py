"""Tests of lightning_noisy.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_noisy.metrics import CleanSelectionMetrics, RecoveryAccuracy, selection_scores

# ----------------------------------------------------------------------------- RecoveryAccuracy


def test_recovery_accuracy_hard_labels_hand_computed() -> None:
    metric = RecoveryAccuracy(num_classes=3)
    metric.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    metric.update(torch.tensor([1]), torch.tensor([0]))
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_recovery_accuracy_soft_labels_take_argmax() -> None:
    soft = torch.tensor(
        [
            [0.7, 0.2, 0.1],  # -> 0
            [0.1, 0.3, 0.6],  # -> 2
            [0.2, 0.5, 0.3],  # -> 1
            [0.0, 0.0, 1.0],  # -> 2
        ]
    )
    clean = torch.tensor([0, 1, 1, 2])
    metric = RecoveryAccuracy(num_classes=3)
    metric.update(soft, clean)
    assert metric.compute().item() == pytest.approx(3 / 4)
    # Logits give the same argmax, hence the same value.
    metric_logits = RecoveryAccuracy(num_classes=3)
    metric_logits.update(torch.log(soft + 1e-3) * 4.0 - 7.0, clean)
    assert metric_logits.compute().item() == pytest.approx(3 / 4)


def test_recovery_accuracy_noisy_labels_matches_sklearn() -> None:
    from sklearn.metrics import accuracy_score

    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 10, (500,), generator=gen)
    flip = torch.rand(500, generator=gen) < 0.4
    noisy = torch.where(flip, torch.randint(0, 10, (500,), generator=gen), clean)
    metric = RecoveryAccuracy(num_classes=10)
    for chunk_noisy, chunk_clean in zip(noisy.split(77), clean.split(77)):
        metric.update(chunk_noisy, chunk_clean)
    assert metric.compute().item() == pytest.approx(accuracy_score(clean.numpy(), noisy.numpy()))


def test_recovery_accuracy_without_samples_is_nan() -> None:
    metric = RecoveryAccuracy(num_classes=2)
    with pytest.warns(UserWarning):  # torchmetrics: compute() before update()
        assert math.isnan(metric.compute().item())


@pytest.mark.parametrize(
    ("labels", "clean", "match"),
    [
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "labels.*integer"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), r"labels.*\[0, 3\).*\[0, 3\]"),
        (torch.tensor([-1, 1]), torch.tensor([0, 1]), r"labels.*\[-1, 1\]"),
        (torch.tensor([0, 1]), torch.tensor([0, 5]), "clean_labels.*5"),
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), "same length.*3 and 2"),
        (torch.rand(2, 4), torch.tensor([0, 1]), r"C == num_classes == 3.*\(2, 4\)"),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]), "floating point"),
        (torch.tensor([[0.1, float("nan"), 0.2], [1.0, 0.0, 0.0]]), torch.tensor([0, 1]), "finite"),
        (torch.tensor([0, 1]), torch.tensor([[0, 1]]), r"clean_labels.*shape \[N\].*\(1, 2\)"),
        (torch.tensor([True, False]), torch.tensor([0, 1]), "labels.*torch.bool"),
    ],
)
def test_recovery_accuracy_bad_inputs(labels: torch.Tensor, clean: torch.Tensor, match: str) -> None:
    metric = RecoveryAccuracy(num_classes=3)
    with pytest.raises(ValueError, match=match):
        metric.update(labels, clean)
    assert metric.total.item() == 0  # nothing half-recorded


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True, "3"])
def test_recovery_accuracy_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes.*got"):
        RecoveryAccuracy(num_classes=num_classes)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CleanSelectionMetrics


def _random_selection(seed: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean scores correlated with a random clean mask (about 70 % clean)."""
    gen = torch.Generator().manual_seed(seed)
    is_clean = torch.rand(n, generator=gen) < 0.7
    scores = torch.sigmoid(1.5 * is_clean.float() - 0.75 + torch.randn(n, generator=gen))
    return scores, is_clean


def _sklearn_reference(
    scores: np.ndarray, selected: np.ndarray, is_clean: np.ndarray, positive: str
) -> dict[str, float]:
    # Imported here so that the spawned DDP workers, which import this module, skip scikit-learn.
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    if positive == "noisy":
        scores, selected, is_clean = -scores, ~selected, ~is_clean
    return {
        "precision": precision_score(is_clean, selected, zero_division=0),
        "recall": recall_score(is_clean, selected, zero_division=0),
        "f1": f1_score(is_clean, selected, zero_division=0),
        "auroc": roc_auc_score(is_clean, scores),
    }


@pytest.mark.parametrize("positive", ["clean", "noisy"])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_selection_scores_match_sklearn(positive: str, threshold: float) -> None:
    scores, is_clean = _random_selection(seed=1)
    metric = CleanSelectionMetrics(threshold=threshold, positive=positive)  # type: ignore[arg-type]
    for s, c in zip(scores.split(90), is_clean.split(90)):
        metric.update(s, c)
    result = metric.compute()
    expected = _sklearn_reference(scores.numpy(), (scores > threshold).numpy(), is_clean.numpy(), positive)
    assert set(result) == {"precision", "recall", "f1", "auroc"}
    for key, value in expected.items():
        assert result[key].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("positive", ["clean", "noisy"])
def test_selection_auroc_unbounded_scores_with_ties_match_sklearn(positive: str) -> None:
    """Scores far outside [0, 1] (AUM, negative losses) and with ties: AUROC depends only on order."""
    scores, is_clean = _random_selection(seed=2)
    scores = torch.round((scores - 0.5) * 20.0) * 50.0  # values in about [-500, 500], many ties
    metric = CleanSelectionMetrics(threshold=0.0, positive=positive)  # type: ignore[arg-type]
    metric.update(scores, is_clean)
    expected = _sklearn_reference(scores.numpy(), (scores > 0).numpy(), is_clean.numpy(), positive)
    assert metric.compute()["auroc"].item() == pytest.approx(expected["auroc"], abs=1e-6)


def test_selection_bool_mask_matches_sklearn_and_auroc_from_mask() -> None:
    scores, is_clean = _random_selection(seed=3)
    selected = scores > 0.6
    metric = CleanSelectionMetrics(threshold=0.99)  # threshold is ignored for bool masks
    metric.update(selected, is_clean)
    result = metric.compute()
    expected = _sklearn_reference(selected.float().numpy(), selected.numpy(), is_clean.numpy(), "clean")
    for key, value in expected.items():
        assert result[key].item() == pytest.approx(value, abs=1e-6), key
    # AUROC of a 0/1 score is the balanced accuracy of the selection.
    tpr = (selected & is_clean).sum() / is_clean.sum()
    tnr = (~selected & ~is_clean).sum() / (~is_clean).sum()
    assert result["auroc"].item() == pytest.approx(((tpr + tnr) / 2).item(), abs=1e-6)


def test_selection_hand_computed() -> None:
    metric = CleanSelectionMetrics(positive="noisy")
    # clean scores; selected = [T, T, F, F, F]; noisy detections = [F, F, T, T, T]
    metric.update(torch.tensor([0.9, 0.6, 0.4, 0.3, 0.2]), torch.tensor([True, False, True, False, False]))
    result = metric.compute()
    # noisy truth = [F, T, F, T, T]: detections TP = 2 (idx 3, 4), FP = 1 (idx 2), FN = 1 (idx 1)
    assert result["precision"].item() == pytest.approx(2 / 3)
    assert result["recall"].item() == pytest.approx(2 / 3)
    assert result["f1"].item() == pytest.approx(2 / 3)
    # noisy-vs-clean pairs ordered by lower clean score: (0.6 vs 0.9) ok, (0.6 vs 0.4) wrong,
    # (0.3, 0.2 vs 0.9 and 0.4) all ok -> 5 / 6
    assert result["auroc"].item() == pytest.approx(5 / 6)


def test_selection_empty_selection_is_zero_without_warning() -> None:
    _, is_clean = _random_selection(seed=4, n=50)
    metric = CleanSelectionMetrics()
    metric.update(torch.zeros(50, dtype=torch.bool), is_clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metric.compute()
    assert result["precision"].item() == 0.0
    assert result["recall"].item() == 0.0
    assert result["f1"].item() == 0.0
    assert result["auroc"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("positive", ["clean", "noisy"])
def test_selection_all_clean_targets_auroc_nan_with_warning(positive: str) -> None:
    metric = CleanSelectionMetrics(positive=positive)  # type: ignore[arg-type]
    metric.update(torch.tensor([0.9, 0.2, 0.7]), torch.ones(3, dtype=torch.bool))
    with pytest.warns(UserWarning, match="AUROC is undefined"):
        result = metric.compute()
    assert math.isnan(result["auroc"].item())
    if positive == "clean":
        assert result["precision"].item() == 1.0
        assert result["recall"].item() == pytest.approx(2 / 3)
    else:  # one sample detected as noisy, none is: precision 0; no noisy sample: recall 0
        assert result["precision"].item() == 0.0
        assert result["recall"].item() == 0.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_selection_without_samples_is_nan() -> None:
    metric = CleanSelectionMetrics()
    with pytest.warns(UserWarning, match="no sample"):
        result = metric.compute()
    assert all(math.isnan(v.item()) for v in result.values())


def test_selection_reset_forgets_samples() -> None:
    scores, is_clean = _random_selection(seed=5, n=60)
    metric = CleanSelectionMetrics()
    metric.update(1.0 - scores, is_clean)
    metric.reset()
    metric.update(scores, is_clean)
    expected = _sklearn_reference(scores.numpy(), (scores > 0.5).numpy(), is_clean.numpy(), "clean")
    assert metric.compute()["auroc"].item() == pytest.approx(expected["auroc"], abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": float("nan")}, "threshold.*nan"),
        ({"threshold": "0.5"}, "threshold.*'0.5'"),
        ({"positive": "mislabelled"}, "positive.*'mislabelled'"),
        ({"validate_args": 1}, "validate_args.*1"),
    ],
)
def test_selection_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CleanSelectionMetrics(**kwargs)


@pytest.mark.parametrize(
    ("first", "is_clean", "match"),
    [
        (torch.rand(4), torch.tensor([1, 0, 1, 0]), "is_clean.*bool.*torch.int64"),
        (torch.rand(4), torch.ones(3, dtype=torch.bool), "same length.*4 and 3"),
        (torch.tensor([1, 0, 1, 0]), torch.ones(4, dtype=torch.bool), "bool mask or a float.*torch.int64"),
        (torch.rand(4, 1), torch.ones(4, dtype=torch.bool), r"shape \[N\].*\(4, 1\)"),
        (torch.tensor([0.1, float("inf"), 0.2, 0.3]), torch.ones(4, dtype=torch.bool), "finite"),
    ],
)
def test_selection_bad_update_arguments(first: torch.Tensor, is_clean: torch.Tensor, match: str) -> None:
    metric = CleanSelectionMetrics()
    with pytest.raises(ValueError, match=match):
        metric.update(first, is_clean)
    assert len(metric.is_clean) == 0


def test_selection_scores_function_rejects_empty_and_bad_positive() -> None:
    empty = torch.zeros(0, dtype=torch.bool)
    with pytest.raises(ValueError, match="N = 0"):
        selection_scores(torch.zeros(0), empty, empty)
    one = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="positive.*'both'"):
        selection_scores(torch.ones(1), one, one, positive="both")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        scores, is_clean = _random_selection(seed=6, n=150)
        gen = torch.Generator().manual_seed(7)
        clean = torch.randint(0, 5, (150,), generator=gen)
        soft = torch.softmax(torch.randn(150, 5, generator=gen) + 3.0 * torch.nn.functional.one_hot(clean, 5), 1)
        # Uneven halves, several updates on rank 1.
        mine = slice(0, 61) if rank == 0 else slice(61, 150)

        recovery = RecoveryAccuracy(num_classes=5)
        selection = {p: CleanSelectionMetrics(threshold=0.55, positive=p) for p in ("clean", "noisy")}
        masks = CleanSelectionMetrics()
        for part in torch.arange(150)[mine].split(40):
            recovery.update(soft[part], clean[part])
            for metric in selection.values():
                metric.update(scores[part], is_clean[part])
            masks.update(scores[part] > 0.4, is_clean[part])

        reference = RecoveryAccuracy(num_classes=5, sync_on_compute=False)
        reference.update(soft, clean)
        assert torch.equal(recovery.compute(), reference.compute())
        for positive, metric in selection.items():
            ref = CleanSelectionMetrics(threshold=0.55, positive=positive, sync_on_compute=False)  # type: ignore[arg-type]
            ref.update(scores, is_clean)
            got, want = metric.compute(), ref.compute()
            for key in want:
                assert torch.allclose(got[key], want[key]), (rank, positive, key, got[key], want[key])
        ref_mask = CleanSelectionMetrics(sync_on_compute=False)
        ref_mask.update(scores > 0.4, is_clean)
        got, want = masks.compute(), ref_mask.compute()
        for key in want:
            assert torch.allclose(got[key], want[key]), (rank, "mask", key)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_metrics_ddp_two_processes_match_single_process() -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)
