"""The random views: the segment mask, the strong augmentation and the per-step generator."""

from __future__ import annotations

import pytest
import torch

from lightning_noisy.augment import segment_mask, step_generator, strong_augment


def test_segment_mask_zeros_one_window_of_bounded_length() -> None:
    x = torch.arange(1.0, 41.0).repeat(50, 1)  # no zero anywhere
    out = segment_mask(x, 0.25, torch.Generator().manual_seed(0))
    widths = []
    for row, original in zip(out, x):
        zeros = (row == 0).nonzero().flatten()
        widths.append(zeros.numel())
        if zeros.numel():
            assert torch.equal(zeros, torch.arange(int(zeros[0]), int(zeros[0]) + zeros.numel()))  # contiguous
        kept = row != 0
        assert torch.equal(row[kept], original[kept])  # the rest untouched
    assert max(widths) <= 10 and max(widths) > 0  # at most a quarter of 40
    again = segment_mask(x, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(segment_mask(x, 0.0), x)
    with pytest.raises(ValueError, match=r"max_fraction must be a number in \[0, 1\), got 1.0"):
        segment_mask(x, 1.0)


@pytest.mark.parametrize("shape", [(6, 40), (6, 1, 40), (4, 3, 8, 8)])
def test_strong_augment_keeps_the_shape_and_repeats_with_its_generator(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    out = strong_augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, strong_augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, strong_augment(x, torch.Generator().manual_seed(2)))
    assert strong_augment(x[:0]).shape == x[:0].shape


def test_strong_image_view_only_moves_and_zeros_pixels() -> None:
    x = torch.rand(8, 3, 16, 16) + 1.0  # every pixel distinct from 0
    out = strong_augment(x, torch.Generator().manual_seed(3), cutout=0.5)
    for image, original in zip(out, x):
        for channel, source in zip(image, original):
            values = set(channel.flatten().tolist()) - {0.0}
            assert values <= set(source.flatten().tolist())  # flipped and shifted pixels, no new values
        assert int((image == 0).all(0).sum()) >= 1  # a Cutout square zeroes every channel
    with pytest.raises(ValueError, match=r"cutout must be a number in \[0, 1\), got 1.5"):
        strong_augment(x, cutout=1.5)


def test_step_generator_depends_on_its_arguments_only() -> None:
    cpu = torch.device("cpu")
    first = torch.rand(4, generator=step_generator(0, 2, 5, 1, cpu))
    assert torch.equal(first, torch.rand(4, generator=step_generator(0, 2, 5, 1, cpu)))
    for other in [(1, 2, 5, 1), (0, 3, 5, 1), (0, 2, 6, 1), (0, 2, 5, 0)]:
        assert not torch.equal(first, torch.rand(4, generator=step_generator(*other, cpu)))
