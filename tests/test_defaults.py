"""Every callback is constructible with no arguments, and the defaults work together on an unmodified classifier."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch
from helpers import PlainClassifier, SpawnDDPStrategy, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_noisy.callbacks as callbacks
from lightning_noisy.callbacks import (
    AUMCallback,
    CoDivideCallback,
    CurriculumCallback,
    ELRCallback,
    ForwardCorrectionCallback,
    LabelCorrectionCallback,
    NoisyLabelMonitor,
    NoisyValidationScore,
    SampleStateCallback,
    SOPCallback,
    WarmupEntropyCallback,
)

PUBLIC_CALLBACKS = [
    cls for name in callbacks.__all__
    if inspect.isclass(cls := getattr(callbacks, name)) and issubclass(cls, pl.Callback) and cls is not SampleStateCallback
]


def test_the_public_callbacks_are_the_ones_checked_here() -> None:
    assert set(PUBLIC_CALLBACKS) == {AUMCallback, CoDivideCallback, CurriculumCallback, ELRCallback,
                                     ForwardCorrectionCallback, LabelCorrectionCallback, NoisyLabelMonitor,
                                     NoisyValidationScore, SOPCallback, WarmupEntropyCallback}


@pytest.mark.parametrize("cls", PUBLIC_CALLBACKS, ids=lambda cls: cls.__name__)
def test_every_callback_is_constructible_with_no_arguments(cls: type[pl.Callback]) -> None:
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert required == [], f"{cls.__name__} requires {required}"
    cls()


class DefaultsChecker(pl.Callback):
    """After the fit, on each rank: every default callback has done its work and holds finite state."""

    def __init__(self, group: list[pl.Callback]) -> None:
        self.group = group

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        by_type = {type(c): c for c in self.group}
        division = by_type[CoDivideCallback]
        assert isinstance(division, CoDivideCallback) and division.ready  # divided at the end of epoch 9
        assert bool(torch.isfinite(division.probability).all())
        aum = by_type[AUMCallback]
        assert isinstance(aum, AUMCallback) and not aum.use_threshold_samples and aum.threshold == 0.0
        assert bool(torch.isfinite(aum.aum).all())
        correction = by_type[LabelCorrectionCallback]
        assert isinstance(correction, LabelCorrectionCallback) and correction.onset is not None
        assert len(correction.onset.changes) >= 1 and bool(torch.isfinite(correction.labels).all())
        assert bool(torch.isfinite(by_type[ELRCallback].local_targets()[1]).all())  # type: ignore[attr-defined]
        for callback in self.group:
            assert isinstance(callback, SampleStateCallback) and callback.skipped_epochs == 0


@pytest.mark.ddp
def test_defaults_work_together_on_an_unmodified_classifier_under_ddp() -> None:
    group: list[pl.Callback] = [LabelCorrectionCallback(), NoisyLabelMonitor(), AUMCallback(), ELRCallback(),
                                WarmupEntropyCallback(), CoDivideCallback(), CurriculumCallback()]
    torch.manual_seed(0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=11, callbacks=[*group, DefaultsChecker(group)]).fit(
        PlainClassifier(lr=0.2), DataLoader(toy_dataset(n=48), batch_size=6, shuffle=True))
