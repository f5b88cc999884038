"""Callbacks that add label correction, noisy-sample detection and robust training to any Trainer."""

from lightning_noisy.callbacks.aum import AUMCallback
from lightning_noisy.callbacks.base import SampleStateCallback, TrainingLabels, find_training_labels
from lightning_noisy.callbacks.co_divide import CoDivideCallback, clean_probability, per_class_clean_probability
from lightning_noisy.callbacks.curriculum import CurriculumCallback, density_curriculum
from lightning_noisy.callbacks.elr import ELRCallback
from lightning_noisy.callbacks.forward_correction import ForwardCorrectionCallback
from lightning_noisy.callbacks.label_correction import LabelCorrectionCallback
from lightning_noisy.callbacks.monitor import NoisyLabelMonitor
from lightning_noisy.callbacks.noisy_validation import NoisyValidationScore
from lightning_noisy.callbacks.sop import SOPCallback
from lightning_noisy.callbacks.warmup_entropy import WarmupEntropyCallback

__all__ = [
    "AUMCallback",
    "CoDivideCallback",
    "CurriculumCallback",
    "ELRCallback",
    "ForwardCorrectionCallback",
    "LabelCorrectionCallback",
    "NoisyLabelMonitor",
    "NoisyValidationScore",
    "SOPCallback",
    "SampleStateCallback",
    "TrainingLabels",
    "WarmupEntropyCallback",
    "clean_probability",
    "per_class_clean_probability",
    "density_curriculum",
    "find_training_labels",
]
