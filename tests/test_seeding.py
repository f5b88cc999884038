"""Independent random streams: no component's draw repeats the shuffling sampler's epoch order."""

from __future__ import annotations

import pytest
import torch

from lightning_noisy.callbacks.aum import threshold_sample_mask
from lightning_noisy.data.noise import symmetric_noise
from lightning_noisy.data.sampler import EpochShuffleSampler
from lightning_noisy.seeding import stream_generator


def _epoch_zero_order(n: int, seed: int) -> torch.Tensor:
    sampler = EpochShuffleSampler(range(n), seed=seed)
    sampler.set_epoch(0)
    return torch.tensor(list(sampler))


def test_a_stream_depends_only_on_seed_and_name() -> None:
    first = torch.randperm(100, generator=stream_generator(3, "a"))
    assert torch.equal(first, torch.randperm(100, generator=stream_generator(3, "a")))
    assert not torch.equal(first, torch.randperm(100, generator=stream_generator(3, "b")))
    assert not torch.equal(first, torch.randperm(100, generator=stream_generator(4, "a")))
    assert not torch.equal(first, torch.randperm(100, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("seed", [0, 7])
def test_threshold_samples_are_not_the_start_of_the_first_epoch(seed: int) -> None:
    # before the streams were separated, run 0's threshold samples were exactly the first 1/(C+1) of epoch 0
    n, num_classes = 2200, 10
    mask = threshold_sample_mask(n, num_classes, run=0, seed=seed)
    size = int(mask.sum())
    share_at_start = mask[_epoch_zero_order(n, seed)[:size]].float().mean().item()
    assert share_at_start < 0.25  # about 1/11 when independent; 1.0 when the streams coincide


@pytest.mark.parametrize("seed", [0, 7])
def test_exact_rate_noise_does_not_lead_the_first_epoch(seed: int) -> None:
    n, rate = 2000, 0.4
    labels = torch.arange(n) % 10
    flipped = symmetric_noise(labels, 10, rate, exact=True, seed=seed).labels != labels
    assert int(flipped.sum()) == round(rate * n)
    share_at_start = flipped[_epoch_zero_order(n, seed)[: round(rate * n)]].float().mean().item()
    assert share_at_start < 0.6  # about 0.4 when independent; 1.0 when the streams coincide


@pytest.mark.parametrize(("seed", "stream", "message"), [(-1, "a", "seed"), (True, "a", "seed"), (1.5, "a", "seed"),
                                                         (0, "", "stream"), (0, 3, "stream")])
def test_bad_arguments_say_what_was_wrong(seed: object, stream: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stream_generator(seed, stream)  # type: ignore[arg-type]
