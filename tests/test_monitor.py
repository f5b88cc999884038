"""NoisyLabelMonitor against values computed from predictions known in advance."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import NUM_CLASSES, TABLE, N, ScriptedClassifier, toy_dataset, trainer
from lightning_noisy.callbacks import NoisyLabelMonitor
from lightning_noisy.data import NoisyLabelDataset, TensorPairDataset


def test_monitor_metrics_match_hand_computation() -> None:
    x = torch.arange(N, dtype=torch.float32)[:, None].repeat(1, 4)
    clean = torch.arange(N) % NUM_CLASSES
    noisy = clean.clone()
    noisy[[1, 4, 7]] = (clean[[1, 4, 7]] + 1) % NUM_CLASSES  # 3 of 10 wrong
    data = NoisyLabelDataset(TensorPairDataset(x, clean), noisy, clean, NUM_CLASSES)
    monitor = NoisyLabelMonitor(histogram=False)
    fit = trainer(max_epochs=2, callbacks=[monitor])
    fit.fit(ScriptedClassifier(), DataLoader(data, batch_size=4, shuffle=True))
    prediction = TABLE[1].argmax(1)  # the last epoch's predictions
    wrong = noisy != clean
    assert torch.equal(monitor.predictions.values, prediction)
    torch.testing.assert_close(monitor.losses.values, -TABLE[1].log().gather(1, noisy[:, None]).squeeze(1))
    metrics = fit.callback_metrics
    assert float(metrics["noisy/noisy_label_acc"]) == pytest.approx(0.7)
    assert float(metrics["noisy/train_pred_acc"]) == float((prediction == clean).float().mean())
    assert float(metrics["noisy/memorized_frac"]) == float((prediction[wrong] == noisy[wrong]).float().mean())


def test_monitor_without_clean_labels_logs_no_accuracy() -> None:
    data = toy_dataset(n=12)
    unlabelled = NoisyLabelDataset(data.dataset, data.noisy_labels, None, NUM_CLASSES)
    fit = trainer(max_epochs=1, callbacks=[NoisyLabelMonitor(histogram=False)])
    fit.fit(ScriptedClassifier(), DataLoader(unlabelled, batch_size=4))
    assert not any(k.startswith("noisy/") for k in fit.callback_metrics)
