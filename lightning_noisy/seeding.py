"""Independent random streams from one user seed.

``torch.Generator().manual_seed(s)`` gives the same stream to every component seeded with ``s``: two of
them drawing ``torch.randperm(n)`` get the same permutation. The shuffling sampler uses exactly that
stream for epoch 0, so a component seeded like it would, for instance, put all its chosen samples at the
start of the first epoch. :func:`stream_generator` derives a separate stream per named use instead.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["stream_generator"]


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for the use ``stream`` (e.g. ``"aum-threshold"``) of ``seed``.

    The seed is mixed with the stream's name by NumPy's ``SeedSequence``, so the streams of different
    names (and the plain ``manual_seed(seed)`` stream) are statistically independent; the result depends
    only on ``(seed, stream)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty name, got {stream!r}")
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(stream.encode()),))
    state = int(sequence.generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device="cpu").manual_seed(state)
