"""Robust and corrected losses as plain functions of ``(logits, targets)``.

Targets are hard labels ``[B]`` or soft labels ``[B, C]``; see :func:`as_probabilities`.
Choose a loss by name with :func:`get_loss`.
"""

from lightning_noisy.losses._targets import as_probabilities
from lightning_noisy.losses.correction import (
    backward_corrected_loss,
    estimate_transition_matrix,
    forward_corrected_loss,
    validate_transition_matrix,
)
from lightning_noisy.losses.mixup import mixup_batch, sample_mixup_lambda
from lightning_noisy.losses.regularizers import (
    bootstrap_hard_loss,
    bootstrap_soft_loss,
    entropy_loss,
    kl_div_loss,
    label_smoothing_loss,
    prior_loss,
)
from lightning_noisy.losses.robust import (
    available_losses,
    cross_entropy_loss,
    gce_loss,
    get_loss,
    mae_loss,
    rce_loss,
    sce_loss,
    truncated_gce_loss,
)

__all__ = [
    "as_probabilities",
    "available_losses",
    "backward_corrected_loss",
    "bootstrap_hard_loss",
    "bootstrap_soft_loss",
    "cross_entropy_loss",
    "entropy_loss",
    "estimate_transition_matrix",
    "forward_corrected_loss",
    "gce_loss",
    "get_loss",
    "kl_div_loss",
    "label_smoothing_loss",
    "mae_loss",
    "mixup_batch",
    "prior_loss",
    "rce_loss",
    "sample_mixup_lambda",
    "sce_loss",
    "truncated_gce_loss",
    "validate_transition_matrix",
]
