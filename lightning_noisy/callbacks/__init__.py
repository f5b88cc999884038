"""Callbacks that add label correction, noisy-sample detection and robust training to any Trainer."""

from lightning_noisy.callbacks.aum import AUMCallback
from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, find_training_labels
from lightning_noisy.callbacks.curriculum import CurriculumCallback, density_curriculum
from lightning_noisy.callbacks.forward_correction import ForwardCorrectionCallback
from lightning_noisy.callbacks.label_correction import LabelCorrectionCallback
from lightning_noisy.callbacks.monitor import NoisyLabelMonitor

__all__ = [
    "AUMCallback",
    "CurriculumCallback",
    "ForwardCorrectionCallback",
    "LabelCorrectionCallback",
    "NoisyLabelMonitor",
    "SampleStateCallback",
    "TrainingLabels",
    "density_curriculum",
    "find_training_labels",
]
