"""Mixup (Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

``x~ = lam * x_i + (1 - lam) * x_perm(i)`` and ``y~ = lam * y_i + (1 - lam) * y_perm(i)`` with
``lam ~ Beta(alpha, alpha)`` drawn once per batch. DivideMix / MixMatch additionally take
``lam = max(lam, 1 - lam)`` so the mixed sample stays closer to its first source.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_noisy.losses._targets import as_probabilities, check_real

__all__ = ["mixup_batch", "sample_mixup_lambda"]


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def sample_mixup_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)``.

    The randomness comes from torch (``generator``, or torch's global RNG when ``None``, so
    ``seed_everything`` makes it reproducible): a 62-bit seed is drawn from it and the Beta
    variate is sampled by numpy's generator seeded with it.

    Args:
        alpha: concentration, ``> 0`` (``alpha = 1`` is uniform; small values push ``lam`` to 0 or 1).
        generator: optional torch generator.
    """
    alpha = check_real("alpha", alpha, low=0.0, low_inclusive=False)
    _check_generator(generator)
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup_batch(
    x: Tensor,
    targets: Tensor,
    num_classes: int,
    alpha: float,
    *,
    generator: torch.Generator | None = None,
    lambda_min_half: bool = False,
) -> tuple[Tensor, Tensor, float]:
    """Mix a batch with a random permutation of itself.

    Args:
        x: floating inputs ``[B, ...]``.
        targets: hard labels ``[B]`` or soft labels ``[B, num_classes]``.
        num_classes: ``C``.
        alpha: Beta concentration, ``> 0``.
        generator: optional torch generator for ``lam`` and the permutation.
        lambda_min_half: use ``lam = max(lam, 1 - lam)`` (DivideMix, MixMatch).

    Returns:
        ``(mixed_x, mixed_targets, lam)``: ``mixed_x`` has the shape and dtype of ``x``,
        ``mixed_targets`` is float32 ``[B, C]`` on ``x.device``, ``lam`` a Python float.
    """
    alpha = check_real("alpha", alpha, low=0.0, low_inclusive=False)
    _check_generator(generator)
    if not isinstance(lambda_min_half, bool):
        raise ValueError(f"lambda_min_half must be a bool, got {lambda_min_half!r}")
    if not isinstance(x, Tensor) or x.ndim < 1 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else repr(x)
        raise ValueError(f"x must be a floating tensor of shape [B, ...], got {got}")
    if not isinstance(targets, Tensor) or targets.ndim < 1 or targets.shape[0] != x.shape[0]:
        got = f"shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else repr(targets)
        raise ValueError(f"targets must have the batch size of x ({x.shape[0]}), got {got}")
    probs = as_probabilities(targets, num_classes).to(x.device)
    lam = sample_mixup_lambda(alpha, generator)
    if lambda_min_half:
        lam = max(lam, 1.0 - lam)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(x.shape[0], generator=generator, device=device).to(x.device)
    mixed_x = lam * x + (1.0 - lam) * x[perm]
    mixed_targets = lam * probs + (1.0 - lam) * probs[perm]
    return mixed_x, mixed_targets, lam
