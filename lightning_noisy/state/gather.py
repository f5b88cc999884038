"""Collective helpers: gather tensors of uneven length from every rank, in rank order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def row_bytes(tensor: Tensor) -> Tensor:
    """``[M, *S]`` as ``[M, bytes per row]`` uint8 (a view when contiguous): how rows of any dtype travel."""
    size = tensor.element_size()
    for dim in tensor.shape[1:]:
        size *= int(dim)
    return tensor.contiguous().view(torch.uint8).view(tensor.shape[0], size)


def from_row_bytes(data: Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`row_bytes`: ``[M, bytes per row]`` uint8 back to ``[M, *row_shape]`` of ``dtype``."""
    return data.view(dtype).view(data.shape[0], *row_shape)


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
    as_bytes = row_bytes(tensor)  # any dtype travels (gloo has no int16)
    padded = as_bytes.new_zeros((max(sizes), as_bytes.shape[1]))
    padded[: tensor.shape[0]] = as_bytes
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    row_shape = tuple(tensor.shape[1:])
    return [from_row_bytes(part[:size], tensor.dtype, row_shape) for part, size in zip(gathered, sizes)]
