"""Collective helpers: gather tensors of uneven length from every rank, in rank order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_uneven(tensor: Tensor) -> list[Tensor]:
    """Gather ``tensor`` from every rank although its first dimension differs between ranks.

    Each rank pads its tensor to the longest length, the padded tensors are all-gathered and every
    result is trimmed back to its rank's true length. Must be called on every rank.

    Args:
        tensor: ``[M_r, *S]`` on this rank; ``S`` and the dtype must agree across ranks. It must live
            on a device the process group's backend supports (CPU for gloo, CUDA for NCCL).

    Returns:
        ``world_size`` tensors ``[M_r, *S]``, in rank order (a one-element list when not distributed).
    """
    if not is_distributed():
        return [tensor]
    world_size = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    sizes = torch.cat(lengths).tolist()
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [part[:size] for part, size in zip(gathered, sizes)]
