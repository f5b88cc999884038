"""The noisy validation split of the DataModules and NoisyValidationScore, which scores a model on it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import PlainClassifier, toy_dataset, trainer
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import NoisyValidationScore
from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods import NoisyClassifier

SMALL = {"num_samples": 500, "batch_size": 64}  # 400 train / 100 test


def _setup(**kwargs: Any) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(**SMALL, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _inputs(dataset: Any) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_the_split_keeps_every_label_and_holds_out_the_requested_share() -> None:
    whole = _setup(noise_rate=0.4, noise_seed=3)
    split = _setup(noise_rate=0.4, noise_seed=3, noisy_val_fraction=0.25)
    val_noisy, val_clean = split.noisy_val_labels
    assert val_noisy.numel() == 100 and split.noisy_labels.numel() == 300
    # every sample keeps the label it has without the split, and each lies on exactly one side of it
    x_all, x_train = _inputs(whole._train_eval), _inputs(split._train_eval)
    x_val = torch.cat([x for x, _ in split.noisy_val_dataloader()])
    assert x_val.shape == (100, 1, 40)
    position = {tuple(x.flatten().tolist()): i for i, x in enumerate(x_all)}
    train_rows = torch.tensor([position[tuple(x.flatten().tolist())] for x in x_train])
    val_rows = torch.tensor([position[tuple(x.flatten().tolist())] for x in x_val])
    assert sorted(torch.cat([train_rows, val_rows]).tolist()) == list(range(400))
    assert torch.equal(split.noisy_labels, whole.noisy_labels[train_rows])
    assert torch.equal(val_noisy, whole.noisy_labels[val_rows])
    assert torch.equal(val_clean, whole.clean_labels[val_rows])
    assert torch.equal(torch.cat([y for _, y in split.noisy_val_dataloader()]), val_noisy)
    # the training set's description is of the samples kept
    assert split.noise_info.noise_rate == pytest.approx(float((split.noisy_labels != split.clean_labels).float().mean()))
    assert len(split.train_dataloader().dataset) == 300
    indices = torch.cat([b[2] for b in split.train_dataloader()])
    assert sorted(indices.tolist()) == list(range(300))
    # the split is a function of noise_seed
    again = _setup(noise_rate=0.1, noise_seed=3, noisy_val_fraction=0.25)
    assert torch.equal(_inputs(again._train_eval), x_train)


def test_no_split_by_default() -> None:
    dm = _setup(noise_rate=0.4)
    assert dm.noisy_val_labels[0].numel() == 0 and dm.noisy_val_labels[1] is None
    with pytest.raises(RuntimeError, match="holds out no noisy validation split: set noisy_val_fraction > 0"):
        dm.noisy_val_dataloader()


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1", float("nan")])
def test_a_bad_fraction_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"noisy_val_fraction must be a float in \[0, 1\), got"):
        MNIST1DDataModule(**SMALL, noisy_val_fraction=bad)


def test_a_fraction_that_holds_out_no_sample_fails_before_any_state() -> None:
    dm = MNIST1DDataModule(**SMALL, noisy_val_fraction=0.001)
    with pytest.raises(ValueError, match="holds out 0 of the 400 training samples"):
        dm.setup("fit")
    assert dm._noise is None and dm._train is None and dm._noisy_val is None


class ToyData(pl.LightningDataModule):
    """A toy training set and a noisy validation split of another 12 toy samples."""

    def __init__(self) -> None:
        super().__init__()
        self.train = toy_dataset(n=24, return_index=False)
        self.val = toy_dataset(n=12, noisy_every=3, seed=1, return_index=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=5)

    def noisy_val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=5)

    @property
    def noisy_val_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.val.noisy_labels, self.val.clean_labels


class ValidatedClassifier(PlainClassifier):
    """The plain classifier with a validation loop (of its own it computes nothing there)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


class Logged(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_the_score_is_the_accuracy_against_the_noisy_labels() -> None:
    pl.seed_everything(0, verbose=False)
    score, data, model = NoisyValidationScore(), ToyData(), ValidatedClassifier(lr=0.5)
    logged = Logged()
    trainer(max_epochs=2, callbacks=[score, logged]).fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        predicted = model.net(torch.stack([data.val[i][0] for i in range(12)])).argmax(1)
    noisy, clean = data.noisy_val_labels
    assert torch.equal(score.predictions, predicted)
    assert score.history[-1] == pytest.approx(float((predicted == noisy).float().mean()))
    assert len(score.history) == 2
    assert logged.rows[-1]["noisy_val/acc"] == pytest.approx(score.history[-1])
    assert logged.rows[-1]["noisy/noisy_val_clean_acc"] == pytest.approx(float((predicted == clean).float().mean()))
    assert not (noisy == clean).all()  # the two figures measure different labels


def test_the_score_with_a_package_module_and_datamodule() -> None:
    pl.seed_everything(0, verbose=False)
    score = NoisyValidationScore()
    dm = MNIST1DDataModule(**SMALL, noise_rate=0.4, noisy_val_fraction=0.2)
    trainer(max_epochs=1, callbacks=[score]).fit(NoisyClassifier(backbone="cnn1d"), datamodule=dm)
    assert score.predictions is not None and score.predictions.shape == (80,)
    assert 0.0 <= score.history[0] <= 1.0


def test_a_datamodule_without_the_split_is_refused() -> None:
    class Plain(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(toy_dataset(n=8), batch_size=4)

    with pytest.raises(ValueError, match="NoisyValidationScore needs a DataModule with noisy_val_dataloader"):
        trainer(callbacks=[NoisyValidationScore()]).fit(PlainClassifier(), datamodule=Plain())


def test_a_bad_monitor_name_is_refused() -> None:
    with pytest.raises(ValueError, match="monitor must be a non-empty string, got ''"):
        NoisyValidationScore(monitor="")
