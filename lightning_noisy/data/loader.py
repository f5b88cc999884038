"""A DataLoader that Lightning resumes mid-epoch at the batch where the checkpoint was taken."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict``/``load_state_dict``: the batches of the current epoch already drawn.

    Lightning saves the state of a training loader that has both methods in every checkpoint and restores it
    on resume. A checkpoint taken mid-epoch (``ModelCheckpoint(every_n_train_steps=...)``, or a run killed
    after one) then continues with the next batch of the same epoch instead of starting the epoch again, so
    with a sampler whose order depends only on ``(seed, epoch)`` (``DistributedSampler``,
    :class:`~lightning_noisy.data.EpochShuffleSampler`) the resumed run trains on exactly the batches the
    uninterrupted run would. The batches skipped on resume are drawn from the same sampler, loaded once and
    dropped.

    Takes the arguments of :class:`torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = 0  # batches of the epoch in progress handed out (0 once the epoch is exhausted)
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._drawn = skip
        for batch in itertools.islice(super().__iter__(), skip, None):
            self._drawn += 1
            yield batch
        self._drawn = 0  # a finished epoch: a checkpoint taken now resumes at the next epoch's start

    def state_dict(self) -> dict[str, int]:
        """``{"batches": n}``: the batches of the epoch in progress drawn so far (0 between epochs)."""
        return {"batches": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip ``state["batches"]`` batches at the start of the next iteration."""
        batches = state.get("batches", 0)
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(f"ResumableDataLoader state must hold an integer 'batches' >= 0, got {state!r}")
        self._skip = batches
