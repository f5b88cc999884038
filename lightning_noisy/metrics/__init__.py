"""torchmetrics Metrics for learning with noisy labels: label recovery and clean-set selection."""

from lightning_noisy.metrics.recovery import RecoveryAccuracy, as_hard_labels
from lightning_noisy.metrics.selection import CleanSelectionMetrics, selection_scores

__all__ = ["CleanSelectionMetrics", "RecoveryAccuracy", "as_hard_labels", "selection_scores"]
