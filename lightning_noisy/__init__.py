"""lightning-noisy: learning with noisy labels as a PyTorch Lightning plugin suite."""

from lightning_noisy.callbacks import (
    AUMCallback,
    CoDivideCallback,
    CurriculumCallback,
    ELRCallback,
    ForwardCorrectionCallback,
    LabelCorrectionCallback,
    NoisyLabelMonitor,
    SOPCallback,
    SampleStateCallback,
    WarmupEntropyCallback,
)
from lightning_noisy.data import (
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderCSVDataModule,
    MNIST1DDataModule,
    NoisyDataModule,
    NoisyLabelDataset,
    NoisyLabels,
    make_noisy_labels,
)
from lightning_noisy.methods import (
    CoTeaching,
    DivideMix,
    ELRPlus,
    FeatureMixup,
    JointOptimization,
    NoisyClassifier,
    ProMix,
    SelfLearning,
    SOPPlus,
)
from lightning_noisy.metrics import CleanSelectionMetrics, RecoveryAccuracy
from lightning_noisy.models import build_backbone
from lightning_noisy.strategies import ShardedStateDDPStrategy

__version__ = "0.1.0"

__all__ = [
    "AUMCallback",
    "CIFARDataModule",
    "CleanSelectionMetrics",
    "CoDivideCallback",
    "CoTeaching",
    "CurriculumCallback",
    "DigitsDataModule",
    "DivideMix",
    "ELRCallback",
    "ELRPlus",
    "FeatureMixup",
    "ForwardCorrectionCallback",
    "ImageFolderCSVDataModule",
    "JointOptimization",
    "LabelCorrectionCallback",
    "MNIST1DDataModule",
    "NoisyClassifier",
    "NoisyDataModule",
    "NoisyLabelDataset",
    "NoisyLabelMonitor",
    "NoisyLabels",
    "ProMix",
    "RecoveryAccuracy",
    "SOPCallback",
    "SOPPlus",
    "SampleStateCallback",
    "SelfLearning",
    "ShardedStateDDPStrategy",
    "WarmupEntropyCallback",
    "build_backbone",
    "make_noisy_labels",
]
