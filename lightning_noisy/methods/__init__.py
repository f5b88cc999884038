"""One LightningModule per method."""

from lightning_noisy.methods.classifier import NoisyClassifier
from lightning_noisy.methods.joint_optimization import JointOptimization

__all__ = ["JointOptimization", "NoisyClassifier"]
