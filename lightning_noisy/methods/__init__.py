"""One LightningModule per method."""

from lightning_noisy.methods.classifier import NoisyClassifier
from lightning_noisy.methods.coteaching import CoTeaching
from lightning_noisy.methods.joint_optimization import JointOptimization

__all__ = ["CoTeaching", "JointOptimization", "NoisyClassifier"]
