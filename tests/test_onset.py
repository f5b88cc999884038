"""The onset of memorisation (prediction changes, Label Wave) and LabelCorrectionCallback's ``start_epoch="auto"``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, PlainClassifier, SpawnDDPStrategy, scripted_data, trainer
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import LabelCorrectionCallback
from lightning_noisy.callbacks.onset import MemorisationOnset, prediction_changes

# -- the pure pieces, by hand ------------------------------------------------------------------------


def test_prediction_changes_counts_only_samples_with_a_previous_prediction() -> None:
    previous = torch.tensor([-1, 0, 1, 2, 2])
    current = torch.tensor([1, 0, 2, 2, 0])
    assert prediction_changes(previous, current) == (2, 4)  # samples 2 and 4 changed; sample 0 has no past


def test_onset_is_patience_epochs_after_the_first_minimum_of_the_raw_changes() -> None:
    onset = MemorisationOnset(window=1, patience=3, min_epochs=1)
    changes = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.3]  # minimum 0.1 first at epoch 4 (a tie is no new one)
    found = [onset.observe(epoch, c) for epoch, c in enumerate(changes)]
    assert found == [False] * 7 + [True, False]
    assert (onset.minimum, onset.minimum_epoch, onset.onset_epoch) == (0.1, 4, 7)


def test_onset_reads_the_moving_average_not_one_noisy_epoch() -> None:
    onset = MemorisationOnset(window=3, patience=2, min_epochs=1)
    # moving averages from epoch 2 on: 0.4, 0.3, 0.3 (tie), 0.2333, 0.2667, 0.3 -> minimum at epoch 5, onset at 7
    changes = [0.6, 0.4, 0.2, 0.3, 0.4, 0.0, 0.4, 0.5]
    found = [onset.observe(epoch, c) for epoch, c in enumerate(changes)]
    assert found.index(True) == 7
    assert onset.minimum_epoch == 5 and onset.minimum == pytest.approx(0.7 / 3)
    # unsmoothed, the bump of epochs 3-4 ends the search at epoch 4, before the lower changes of epoch 5
    raw = MemorisationOnset(window=1, patience=2, min_epochs=1)
    assert [raw.observe(e, c) for e, c in enumerate(changes)].index(True) == 4 and raw.minimum_epoch == 2


def test_onset_waits_for_min_epochs_and_state_round_trips() -> None:
    onset = MemorisationOnset(window=1, patience=1, min_epochs=4)
    assert [onset.observe(e, c) for e, c in enumerate([0.1, 0.2, 0.3, 0.4])] == [False, False, False, True]
    copy = MemorisationOnset(window=1, patience=1, min_epochs=4)
    copy.load_state_dict(onset.state_dict())
    assert copy.state_dict() == onset.state_dict() and copy.found


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"window": 0}, "window must be an integer >= 1, got 0"), ({"patience": 1.5}, "patience must be an integer"),
     ({"min_epochs": True}, "min_epochs must be an integer >= 1, got True")],
)
def test_onset_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemorisationOnset(**kwargs)  # type: ignore[arg-type]


def test_onset_rejects_a_share_outside_zero_one() -> None:
    with pytest.raises(ValueError, match=r"changes must be a share in \[0, 1\], got 1.5"):
        MemorisationOnset().observe(0, 1.5)


# -- start_epoch="auto" in a fit -----------------------------------------------------------------

N = 10
# how many samples change their predicted class at each epoch: falls to 0 at epoch 4, rises from epoch 6
FLIPS = [0, 5, 3, 1, 0, 0, 2, 4, 4, 4]


def wave_classes() -> Tensor:
    """``[epochs, N]`` predicted class per epoch: epoch e moves the first ``FLIPS[e]`` samples one class on."""
    classes = [torch.zeros(N, dtype=torch.long)]
    for flips in FLIPS[1:]:
        step = classes[-1].clone()
        step[:flips] = (step[:flips] + 1) % NUM_CLASSES
        classes.append(step)
    return torch.stack(classes)


class WaveClassifier(PlainClassifier):
    """Predicts ``wave_classes()[epoch, sample]`` with confidence (the sample id is the input)."""

    def forward(self, x: Tensor) -> Tensor:
        ids = x[:, 0].long() % N
        return 4.0 * F.one_hot(wave_classes()[self.current_epoch, ids], NUM_CLASSES).float() + 0 * self.net(x)


class LabelsByEpoch(pl.Callback):
    def __init__(self, correction: LabelCorrectionCallback) -> None:
        self.correction = correction
        self.labels: list[Tensor] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.labels.append(self.correction.labels.clone())


def _auto(**kwargs: object) -> LabelCorrectionCallback:
    return LabelCorrectionCallback(update="hard", num_average_epochs=1, onset_window=1, onset_patience=3,
                                   prior_weight=0.0, entropy_weight=0.0, **kwargs)  # type: ignore[arg-type]


def test_auto_start_begins_patience_epochs_after_the_prediction_changes_bottom_out() -> None:
    correction = _auto()
    probe = LabelsByEpoch(correction)
    trainer(max_epochs=len(FLIPS), callbacks=[correction, probe]).fit(
        WaveClassifier(), DataLoader(scripted_data(N), batch_size=4))
    # the changes are FLIPS / N from epoch 1; minimum 0 at epoch 4, no new minimum for 3 epochs -> epoch 7
    assert correction.onset is not None
    assert correction.onset.changes == [f / N for f in FLIPS[1:8]]
    assert correction.resolved_start_epoch == 7 and correction.num_updates == len(FLIPS) - 7
    given = F.one_hot(torch.arange(N) % NUM_CLASSES, NUM_CLASSES).float()
    for epoch in range(7):
        assert torch.equal(probe.labels[epoch], given), f"labels moved before the start, at epoch {epoch}"
    for epoch in range(7, len(FLIPS)):
        assert torch.equal(probe.labels[epoch], F.one_hot(wave_classes()[epoch], NUM_CLASSES).float())


def test_auto_start_resumes_with_its_onset_and_rejects_an_integer_start_checkpoint(tmp_path: Path) -> None:
    data = DataLoader(scripted_data(N), batch_size=4)
    full = _auto()
    trainer(max_epochs=len(FLIPS), callbacks=[full]).fit(WaveClassifier(), data)
    first = _auto()
    model = WaveClassifier()
    trainer(max_epochs=6, callbacks=[first]).fit(model, data)
    ckpt = tmp_path / "epoch6.ckpt"
    model.trainer.save_checkpoint(ckpt)
    resumed = _auto()
    trainer(max_epochs=len(FLIPS), callbacks=[resumed]).fit(WaveClassifier(), data, ckpt_path=str(ckpt))
    assert resumed.resolved_start_epoch == full.resolved_start_epoch == 7
    assert resumed.onset.state_dict() == full.onset.state_dict()  # type: ignore[union-attr]
    assert torch.equal(resumed.labels, full.labels)
    fixed = LabelCorrectionCallback(start_epoch=3, prior_weight=0.0, entropy_weight=0.0)
    with pytest.raises(ValueError, match="written with start_epoch='auto', this callback has start_epoch=3"):
        trainer(max_epochs=8, callbacks=[fixed]).fit(WaveClassifier(), data, ckpt_path=str(ckpt))


class AutoStartChecker(LabelCorrectionCallback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        starts = trainer.strategy.all_gather(torch.tensor(self.resolved_start_epoch))
        assert starts.tolist() == [7, 7], starts
        labels = trainer.strategy.all_gather(self.labels)
        assert torch.equal(labels[0], labels[1])
        assert torch.equal(labels[0], F.one_hot(wave_classes()[len(FLIPS) - 1], NUM_CLASSES).float())


@pytest.mark.ddp
def test_auto_start_is_the_same_epoch_on_two_ranks() -> None:
    correction = AutoStartChecker(update="hard", num_average_epochs=1, onset_window=1, onset_patience=3,
                                  prior_weight=0.0, entropy_weight=0.0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=len(FLIPS), callbacks=[correction]).fit(
        WaveClassifier(), DataLoader(scripted_data(N), batch_size=2, shuffle=True))
