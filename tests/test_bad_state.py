"""Nothing non-finite enters per-sample state: NaN inputs, an exploding learning rate, a collapsed network."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import NUM_FEATURES, TABLE, N, NUM_CLASSES, PlainClassifier, ScriptedClassifier, SpawnDDPStrategy, scripted_data, toy_dataset, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import (
    AUMCallback,
    CoDivideCallback,
    ELRCallback,
    ForwardCorrectionCallback,
    LabelCorrectionCallback,
    NoisyLabelMonitor,
    SampleStateCallback,
    SOPCallback,
)
from lightning_noisy.callbacks.guard import PredictionHealth
from lightning_noisy.data import NoisyLabelDataset, TensorPairDataset
from lightning_noisy.state import SampleRecorder

CALLBACKS: dict[str, Callable[[], SampleStateCallback]] = {
    "label_correction": lambda: LabelCorrectionCallback(start_epoch=0, num_average_epochs=2),
    "elr": ELRCallback,
    "sop": SOPCallback,
    "aum": lambda: AUMCallback(threshold_samples=False),
    "monitor": NoisyLabelMonitor,
    "forward": lambda: ForwardCorrectionCallback(estimate_epoch=1),
    "codivide": CoDivideCallback,
}


def non_finite_rows(callback: SampleStateCallback) -> int:
    """Rows of any per-sample buffer holding a NaN or an infinity."""
    total = 0
    for buffer in callback.sample_buffers().values():
        for tensor in buffer.state_dict().values():
            if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.ndim >= 1:
                total += int((~torch.isfinite(tensor.reshape(tensor.shape[0], -1))).any(dim=1).sum())
    return total


def nan_input_data(n: int = 24, bad: int = 5) -> NoisyLabelDataset:
    """The toy blobs with the input of sample ``bad`` set to NaN."""
    toy = toy_dataset(n=n)
    x = torch.stack([toy[i][0] for i in range(n)])
    x[bad] = float("nan")
    return NoisyLabelDataset(TensorPairDataset(x, toy.clean_labels), toy.noisy_labels, toy.clean_labels, NUM_CLASSES)


class ExplodingClassifier(PlainClassifier):
    """Two linear layers under SGD whose learning rate grows a thousandfold every step from 0.1: a schedule gone
    wrong. The layers' weights grow together until their product overflows float32 and the logits turn inf/NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Linear(8, NUM_CLASSES))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        growth = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1e3 ** min(step, 12))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": growth, "interval": "step"}}


# -- the pieces ------------------------------------------------------------------------------------


def test_recorder_leaves_out_non_finite_records_and_counts_them() -> None:
    recorder = SampleRecorder((2,))
    recorder.add(torch.tensor([0, 1, 2, 1]), torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.5, 0.5], [0.0, 1.0]]))
    index, values, counts = recorder.gather()
    # sample 1's mean holds a NaN: left out; 0 and 2 kept as recorded
    assert index.tolist() == [0, 2] and counts.tolist() == [1, 1]
    assert torch.equal(values, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert recorder.non_finite_rows == 1
    kept = SampleRecorder((), drop_non_finite=False)
    kept.add(torch.tensor([0, 1]), torch.tensor([float("inf"), 1.0]))
    assert kept.gather()[0].tolist() == [0, 1] and kept.non_finite_rows == 0


def test_prediction_health_counts_non_finite_rows_and_normalised_entropy() -> None:
    health = PredictionHealth()
    health.add(torch.tensor([[0.0, 0.0], [float("nan"), 1.0]]))  # uniform (entropy ln 2), then a NaN row
    health.add(torch.tensor([[100.0, 0.0]]))  # certain: entropy ~0
    verdict = health.conclude(torch.device("cpu"), distributed=False)
    assert (verdict.rows, verdict.non_finite_rows) == (3, 1)
    assert verdict.mean_entropy == pytest.approx(0.5, abs=1e-6)  # (1 + 0) / 2 finite rows
    assert not verdict.all_non_finite and verdict.near_uniform(0.5) and not verdict.near_uniform(0.51)
    assert health.conclude(torch.device("cpu"), distributed=False).rows == 0  # the next epoch starts empty


@pytest.mark.parametrize("window", [1, 5, 1 << 18])
def test_prediction_health_counts_the_same_whatever_it_holds(window: int) -> None:
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 4, generator=generator) * 5 for _ in range(7)]
    steps[2][1, 0] = float("nan")
    steps[5][:, 1] = float("inf")  # a whole step of non-finite rows
    steps.insert(4, torch.randn(2, 6, generator=generator))  # another class count: what is held is counted first
    each_step = PredictionHealth(window=1)
    held = PredictionHealth(window=window)
    for i, logits in enumerate(steps):
        entropy = i != 6  # a step without the entropy is counted apart as well
        each_step.add(logits, entropy=entropy)
        held.add(logits, entropy=entropy)
    want = each_step.conclude(torch.device("cpu"), distributed=False)
    got = held.conclude(torch.device("cpu"), distributed=False)
    assert (got.rows, got.non_finite_rows) == (want.rows, want.non_finite_rows) == (23, 4)
    assert got.mean_entropy == pytest.approx(want.mean_entropy, rel=1e-6)  # float32 sums of other lengths


@pytest.mark.parametrize("window", [0, -3, 2.0, True])
def test_prediction_health_rejects_a_bad_window(window: object) -> None:
    with pytest.raises(ValueError, match=rf"window must be an integer >= 1, got {window!r}"):
        PredictionHealth(window=window)  # type: ignore[arg-type]


# -- NaN inputs and an exploding learning rate, with every callback ----------------------------------


# SOP's corrected probabilities are clamped, so its loss's gradient stays bounded and the network outlives the schedule
SURVIVES = {("exploding_lr", "sop")}


@pytest.mark.parametrize("name", list(CALLBACKS))
@pytest.mark.parametrize("failure", ["nan_input", "exploding_lr"])
def test_no_non_finite_row_enters_any_buffer(name: str, failure: str) -> None:
    torch.manual_seed(0)
    callback = CALLBACKS[name]()
    data = nan_input_data() if failure == "nan_input" else toy_dataset(n=24)
    model = PlainClassifier() if failure == "nan_input" else ExplodingClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(data, batch_size=8))
    broken = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert broken != ((failure, name) in SURVIVES)
    if broken:
        assert any("non-finite" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert non_finite_rows(callback) == 0


def test_label_correction_stops_after_max_skipped_epochs_and_keeps_the_last_good_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = LabelCorrectionCallback(start_epoch=0, num_average_epochs=1, max_skipped_epochs=2)
    # sample 20 sits in the last batch: epoch 0 updates every other row before the network turns NaN
    data = nan_input_data(bad=20)
    with pytest.raises(RuntimeError, match="after 2 epochs in a row in which every one of the 24 training predictions "
                                           "was non-finite"):
        trainer(max_epochs=6, callbacks=[callback]).fit(PlainClassifier(), DataLoader(data, batch_size=8))
    labels = callback.labels
    assert torch.isfinite(labels).all() and callback.num_updates == 1
    assert torch.equal(labels[20], torch.nn.functional.one_hot(data.noisy_labels[20], NUM_CLASSES).float())
    moved = (labels != torch.nn.functional.one_hot(data.noisy_labels, NUM_CLASSES).float()).any(dim=1)
    assert int(moved.sum()) > 0  # the rows updated in epoch 0 kept their update
    saved = torch.load(callback.save_labels(tmp_path / "labels.pt"), weights_only=True)
    assert torch.equal(saved["soft_labels"], labels)


# -- a collapsed network ---------------------------------------------------------------------------


class CollapsingClassifier(ScriptedClassifier):
    """Predicts TABLE (confident) for ``healthy`` epochs, then the uniform distribution: a diverged network."""

    def __init__(self, healthy: int = 2) -> None:
        super().__init__()
        self.healthy = healthy

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x) if self.current_epoch < self.healthy else 0 * self.net(x)
        return out


def test_collapsed_network_updates_nothing_and_the_fit_stops_naming_the_collapse() -> None:
    callback = LabelCorrectionCallback(start_epoch=0, num_average_epochs=1, update="soft", prior_weight=0.0,
                                       entropy_weight=0.0, max_skipped_epochs=2)
    with pytest.raises(RuntimeError, match="the network has collapsed: its predictions are near uniform"):
        trainer(max_epochs=4, callbacks=[callback]).fit(CollapsingClassifier(), DataLoader(scripted_data(), batch_size=5))
    torch.testing.assert_close(callback.labels, TABLE[1])  # epoch 1's predictions: the last good epoch
    assert callback.num_updates == 2 and callback.skipped_epochs == 2 and non_finite_rows(callback) == 0


def test_uniform_predictions_before_the_network_has_learned_are_not_a_collapse() -> None:
    callback = LabelCorrectionCallback(start_epoch=0, num_average_epochs=1, prior_weight=0.0, entropy_weight=0.0)
    trainer(max_epochs=2, callbacks=[callback]).fit(CollapsingClassifier(healthy=0), DataLoader(scripted_data(), batch_size=5))
    assert callback.num_updates == 2 and callback.skipped_epochs == 0


# -- under DDP -------------------------------------------------------------------------------------


class RankChecker(pl.Callback):
    """After the fit, every state tensor of ``watched`` is finite and identical on both ranks."""

    def __init__(self, watched: SampleStateCallback, expect: Callable[[SampleStateCallback], None]) -> None:
        self.watched = watched
        self.expect = expect

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert non_finite_rows(self.watched) == 0
        if isinstance(self.watched, LabelCorrectionCallback):
            gathered = trainer.strategy.all_gather(self.watched.labels)
            assert torch.equal(gathered[0], gathered[1]), "label stores differ between ranks"
        self.expect(self.watched)


def _expect_collapse_skipped(callback: SampleStateCallback) -> None:
    assert isinstance(callback, LabelCorrectionCallback)
    torch.testing.assert_close(callback.labels, TABLE[1])
    assert callback.skipped_epochs == 2


def _expect_finite(callback: SampleStateCallback) -> None:
    assert isinstance(callback, LabelCorrectionCallback) and callback.skipped_epochs >= 1


@pytest.mark.ddp
def test_collapse_is_skipped_on_both_ranks() -> None:
    callback = LabelCorrectionCallback(start_epoch=0, num_average_epochs=1, prior_weight=0.0, entropy_weight=0.0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=4,
            callbacks=[callback, RankChecker(callback, _expect_collapse_skipped)]).fit(
        CollapsingClassifier(), DataLoader(scripted_data(), batch_size=5))


@pytest.mark.ddp
def test_nan_input_on_one_rank_leaves_both_ranks_finite_and_equal() -> None:
    torch.manual_seed(0)
    callback = LabelCorrectionCallback(start_epoch=0, num_average_epochs=2)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3,
            callbacks=[callback, RankChecker(callback, _expect_finite)]).fit(
        PlainClassifier(), DataLoader(nan_input_data(), batch_size=4))


class _LabelsOutOfRange(torch.utils.data.Dataset):
    """A user's dataset with the attributes the callbacks read, whose labels exceed its ``num_classes``."""

    def __init__(self) -> None:
        self.inner = toy_dataset(n=8)
        self.noisy_labels = self.inner.noisy_labels.clone()
        self.noisy_labels[3] = NUM_CLASSES  # one label too many
        self.clean_labels = None
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        return self.inner[i]


@pytest.mark.parametrize("name", ["elr", "sop"])
def test_training_labels_out_of_range_are_refused_before_any_state_is_made(name: str) -> None:
    callback = CALLBACKS[name]()
    with pytest.raises(ValueError, match=rf"the training labels must be in \[0, num_classes={NUM_CLASSES}\), got labels "
                       rf"from 0 to {NUM_CLASSES} on _LabelsOutOfRange"):
        trainer(max_epochs=1, callbacks=[callback]).fit(PlainClassifier(), DataLoader(_LabelsOutOfRange(), batch_size=4))
    assert callback.sample_buffers() == {}
