"""One LightningModule per method."""

from lightning_noisy.methods.classifier import NoisyClassifier
from lightning_noisy.methods.cnn_crf import CNNCRF
from lightning_noisy.methods.coteaching import CoTeaching
from lightning_noisy.methods.dividemix import DivideMix
from lightning_noisy.methods.elr_plus import ELRPlus
from lightning_noisy.methods.feature_mixup import FeatureMixup
from lightning_noisy.methods.joint_optimization import JointOptimization
from lightning_noisy.methods.promix import ProMix
from lightning_noisy.methods.self_learning import SelfLearning
from lightning_noisy.methods.sop_plus import SOPPlus

__all__ = [
    "CNNCRF", "CoTeaching", "DivideMix", "ELRPlus", "FeatureMixup", "JointOptimization", "NoisyClassifier", "ProMix", "SOPPlus",
    "SelfLearning",
]
