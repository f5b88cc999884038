"""AUMCallback: margins against the `aum` package, threshold samples, the two-run rule, DDP, resume, bad input."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from aum import AUMCalculator
from helpers import NUM_CLASSES, NUM_FEATURES, PlainClassifier, SpawnDDPStrategy, toy_dataset, trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_noisy.aum_combine import combine_flag_files
from lightning_noisy.aum_combine import main as combine_main
from lightning_noisy.callbacks.aum import AUMCallback, combine_aum_runs, margins, threshold_sample_mask
from lightning_noisy.data.sampler import EpochShuffleSampler


class ThresholdClassifier(PlainClassifier):
    """The plain user module with ``C + 1`` outputs, as AUM's threshold samples need."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__(lr=lr)
        self.net = nn.Linear(NUM_FEATURES, NUM_CLASSES + 1)


def _fit(callback: AUMCallback, epochs: int = 4, n: int = 32, batch_size: int = 8, **kw: Any) -> ThresholdClassifier:
    pl.seed_everything(0, verbose=False)
    model = ThresholdClassifier()
    loader = DataLoader(toy_dataset(n=n, noisy_every=4), batch_size=batch_size)
    trainer(max_epochs=epochs, callbacks=[callback], **kw).fit(model, loader)
    return model


def _reference(model: ThresholdClassifier, start_epoch: int, batches_per_epoch: int, batch_size: int) -> AUMCalculator:
    """Feed the `aum` package the logits and assigned labels the module saw, step by step."""
    calculator = AUMCalculator(save_dir="unused")
    for step, (logits, targets) in enumerate(zip(model.forward_outputs, model.received_targets)):
        if step // batches_per_epoch < start_epoch:
            continue
        first = (step % batches_per_epoch) * batch_size
        calculator.update(logits.detach(), targets, list(range(first, first + targets.shape[0])))
    return calculator


# -- against the `aum` package ---------------------------------------------------------------------


def test_margin_is_assigned_logit_minus_largest_other() -> None:
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, 0.2, 0.1]])
    assert margins(logits, torch.tensor([1, 2])).tolist() == pytest.approx([5.0 - 2.0, 0.1 - 0.5])


def test_margin_is_zero_when_the_assigned_logit_ties_the_largest_other() -> None:
    logits = torch.tensor([[3.0, 3.0, 1.0], [-2.0, -2.0, -2.0]])
    assert margins(logits, torch.tensor([0, 2])).tolist() == [0.0, 0.0]


def test_aum_threshold_and_flags_equal_the_aum_package(tmp_path: Path) -> None:
    callback = AUMCallback(start_epoch=1, percentile=99.0, threshold_samples=True, output_dir=str(tmp_path))
    model = _fit(callback, epochs=4, n=32, batch_size=8)
    reference = _reference(model, start_epoch=1, batches_per_epoch=4, batch_size=8)
    expected = torch.tensor([reference.sums[i] / reference.counts[i] for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(callback.aum, expected, rtol=0, atol=1e-6)
    assert callback.margin_count.values.tolist() == [reference.counts[i] for i in range(32)] == [3] * 32

    mask = callback.threshold_mask
    assert int(mask.sum()) == 32 // (NUM_CLASSES + 1)
    targets = torch.cat(model.received_targets[:4])  # epoch 0, samples in order
    assert torch.equal(targets == NUM_CLASSES, mask)  # exactly the threshold samples get the extra class
    threshold = float(np.percentile(expected[mask].numpy(), 99.0))
    assert callback.threshold == pytest.approx(threshold, abs=1e-6)
    assert torch.equal(callback.flagged, (expected < threshold) & ~mask)

    reference.finalize(str(tmp_path / "reference"))
    with open(tmp_path / "aum_values.csv") as ours, open(tmp_path / "reference" / "aum_values.csv") as theirs:
        our_rows, their_rows = list(csv.reader(ours)), list(csv.reader(theirs))
    assert our_rows[0] == their_rows[0] == ["sample_id", "aum"]
    assert [int(r[0]) for r in our_rows[1:]] == [int(r[0]) for r in their_rows[1:]]
    np.testing.assert_allclose([float(r[1]) for r in our_rows[1:]], [float(r[1]) for r in their_rows[1:]], atol=1e-6)


def test_detection_metrics_are_logged_with_clean_labels() -> None:
    callback = AUMCallback(threshold_samples=True)
    model = _fit(callback, epochs=2)
    logged = model.trainer.callback_metrics
    for name in ("aum/threshold", "aum/flagged_fraction", "noisy/aum_f1", "noisy/aum_auroc"):
        assert name in logged, name
    assert 0 <= float(logged["aum/flagged_fraction"]) <= 1


# -- threshold sets and the two-run rule -----------------------------------------------------------


def test_threshold_sets_of_two_runs_are_disjoint_and_of_size_n_over_c_plus_one() -> None:
    first = threshold_sample_mask(1000, 9, run=0, seed=3)
    second = threshold_sample_mask(1000, 9, run=1, seed=3)
    assert int(first.sum()) == int(second.sum()) == 100
    assert not bool((first & second).any())
    assert torch.equal(first, threshold_sample_mask(1000, 9, run=0, seed=3))


def test_two_run_rule_removes_samples_flagged_in_every_run_where_they_were_ordinary() -> None:
    flagged = [torch.tensor([True, True, False, False, False]), torch.tensor([True, False, False, True, False])]
    threshold = [torch.tensor([False, False, True, False, True]), torch.tensor([False, True, False, False, True])]
    # 0: flagged in both; 1: flagged in run 0, threshold in run 1; 2: threshold, then not flagged;
    # 3: not flagged, then flagged; 4: threshold in both runs, never judged
    assert combine_aum_runs(flagged, threshold).tolist() == [True, True, False, False, False]


def test_two_runs_combine_from_their_flag_files(tmp_path: Path) -> None:
    for run in (0, 1):
        _fit(AUMCallback(threshold_samples=True, threshold_run=run, output_dir=str(tmp_path / f"run{run}")), epochs=2)
    paths = [str(tmp_path / f"run{run}" / "aum_flags.csv") for run in (0, 1)]
    removed = combine_flag_files(paths)
    combine_main([*paths, "--out", str(tmp_path / "removed.pt")])
    assert torch.equal(torch.load(tmp_path / "removed.pt"), removed)
    masks = [threshold_sample_mask(32, NUM_CLASSES, run=run) for run in (0, 1)]
    rows = [list(csv.DictReader(open(p))) for p in paths]
    flags = [torch.tensor([r["flagged"] == "1" for r in sorted(rs, key=lambda r: int(r["sample_id"]))]) for rs in rows]
    assert torch.equal(removed, torch.nonzero(combine_aum_runs(flags, masks)).squeeze(1))


# -- DDP and resume ----------------------------------------------------------------------------------


class RankChecker(AUMCallback):
    """Asserts on each rank that the AUMs equal the mean of all margins recorded on both ranks."""

    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: Any) -> None:
        super().on_batch(trainer, pl_module, context)
        self.__dict__.setdefault("mine", []).append(
            (context.index.clone(), margins(context.logits, context.batch[1]).double())
        )

    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_epoch_boundary(trainer, pl_module)
        index = torch.cat([i for i, _ in self.mine])
        values = torch.cat([v for _, v in self.mine])
        all_index = trainer.strategy.all_gather(index).reshape(-1)
        all_values = trainer.strategy.all_gather(values).reshape(-1)
        n = self.training_labels.num_samples
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, all_index, all_values)
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, all_index, torch.ones_like(all_values))
        single_process = total / count
        torch.testing.assert_close(self.aum, single_process, rtol=0, atol=1e-9)
        gathered = trainer.strategy.all_gather(torch.cat([self.aum, self.flagged.double()]))
        assert torch.equal(gathered[0], gathered[1]), "AUM or flags differ between ranks"
        assert torch.equal(self.flagged, (single_process < self.threshold) & ~self.threshold_mask)


@pytest.mark.ddp
def test_aum_and_flags_identical_on_two_ranks_and_equal_to_one_process() -> None:
    dataset = toy_dataset(n=30, noisy_every=3)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=2, callbacks=[RankChecker(threshold_samples=True)]).fit(
        ThresholdClassifier(), DataLoader(dataset, batch_size=4, shuffle=True)
    )


def _resumable(tmp_path: Path, max_epochs: int, ckpt: Path | None = None) -> tuple[AUMCallback, ThresholdClassifier]:
    pl.seed_everything(7, verbose=False)
    dataset = toy_dataset(n=30, noisy_every=3)
    loader = DataLoader(dataset, batch_size=8, sampler=EpochShuffleSampler(dataset, seed=1))
    callback, model = AUMCallback(start_epoch=1, threshold_samples=True), ThresholdClassifier()
    trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path).fit(
        model, loader, ckpt_path=None if ckpt is None else str(ckpt)
    )
    return callback, model


def test_resume_from_epoch_boundary_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, _ = _resumable(tmp_path / "full", max_epochs=4)
    _, first_model = _resumable(tmp_path / "first", max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    first_model.trainer.save_checkpoint(ckpt)
    resumed, _ = _resumable(tmp_path / "resumed", max_epochs=4, ckpt=ckpt)
    assert torch.equal(resumed.margin_count.values, full.margin_count.values)
    assert torch.equal(resumed.aum, full.aum)
    assert torch.equal(resumed.flagged, full.flagged)


# -- bad input -----------------------------------------------------------------------------------


def test_model_without_the_extra_output_is_rejected_and_left_unwrapped() -> None:
    model = PlainClassifier()
    with pytest.raises(ValueError, match=r"must have 4 outputs \(C \+ 1.*for C=3 classes, got 3"):
        trainer(callbacks=[AUMCallback(threshold_samples=True)]).fit(model, DataLoader(toy_dataset(n=8), batch_size=4))
    assert "training_step" not in model.__dict__  # the batch contract was released
    assert not model._forward_hooks  # and so was the output check


@pytest.mark.parametrize("threshold_samples", [False, "auto"])
def test_without_threshold_samples_c_outputs_suffice_and_negative_aums_are_flagged(threshold_samples: Any) -> None:
    callback = AUMCallback(threshold_samples=threshold_samples)  # "auto": PlainClassifier declares no num_classes
    pl.seed_everything(0, verbose=False)
    trainer(max_epochs=3, callbacks=[callback]).fit(PlainClassifier(), DataLoader(toy_dataset(n=24), batch_size=4))
    aum = callback.aum
    assert bool(torch.isfinite(aum).all()) and callback.threshold == 0.0
    assert torch.equal(callback.flagged, aum < 0) and bool(callback.flagged.any()) and not bool(callback.flagged.all())


def test_auto_uses_threshold_samples_when_the_module_declares_c_plus_one_classes() -> None:
    class Declared(ThresholdClassifier):
        num_classes = NUM_CLASSES + 1

    callback = AUMCallback()
    trainer(max_epochs=1, callbacks=[callback]).fit(Declared(), DataLoader(toy_dataset(n=8), batch_size=4))
    assert callback.use_threshold_samples and bool(callback.threshold_mask.any())


def test_auto_without_a_declaration_names_the_switch_for_an_extra_output() -> None:
    with pytest.raises(ValueError, match="got 4; pass threshold_samples=True to use the extra output"):
        trainer(callbacks=[AUMCallback()]).fit(ThresholdClassifier(), DataLoader(toy_dataset(n=8), batch_size=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"percentile": 0.0}, r"percentile must be in \(0, 100\), got 0.0"),
        ({"percentile": 100}, r"percentile must be in \(0, 100\), got 100"),
        ({"start_epoch": -1}, "start_epoch must be >= 0, got -1"),
        ({"threshold_fraction": 1.5}, r"threshold_fraction must be in \(0, 1\), got 1.5"),
        ({"threshold_run": -1}, "threshold_run must be >= 0, got -1"),
        ({"threshold_samples": "yes"}, "threshold_samples must be True, False or 'auto', got 'yes'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AUMCallback(**kwargs)


def test_results_before_fit_and_bad_flag_sets_are_rejected() -> None:
    with pytest.raises(RuntimeError, match="fit a model with it first"):
        AUMCallback().aum  # noqa: B018
    with pytest.raises(ValueError, match="one threshold mask per run"):
        combine_aum_runs([torch.zeros(3, dtype=torch.bool)], [])
    with pytest.raises(ValueError, match=r"threshold_run must be in \[0, 4\)"):
        threshold_sample_mask(40, 3, run=4)
