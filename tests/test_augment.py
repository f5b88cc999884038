"""The random views: the segment mask, the strong augmentations and the per-step generator."""

from __future__ import annotations

import pytest
import torch

from lightning_noisy.augment import RandAugmentCutout, segment_mask, step_generator, strong_augment


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


# -- FixMatch's strong image view -------------------------------------------------------------------------

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _normalised_images(count: int = 6, side: int = 32) -> torch.Tensor:
    pixels = torch.randint(1, 256, (count, 3, side, side)).float() / 255  # 8-bit images, no black pixel
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_randaugment_cutout_without_operations_or_cutout_returns_the_batch() -> None:
    x = _normalised_images()
    out = RandAugmentCutout(MEAN, STD, num_ops=0, cutout=0.0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)  # 8-bit pixels survive the round trip


def test_randaugment_cutout_squares_are_the_mean_and_at_most_half_the_side() -> None:
    torch.manual_seed(0)
    x = _normalised_images(40)
    out = RandAugmentCutout(MEAN, STD, num_ops=0, cutout=0.5)(x)
    sides = []
    for image, original in zip(out, x):
        zeroed = (image == 0).all(0)  # [H, W]: the mean's value in every channel
        kept = ~zeroed
        torch.testing.assert_close(image[:, kept], original[:, kept], rtol=0, atol=1e-5)
        rows, cols = zeroed.any(1).nonzero().flatten(), zeroed.any(0).nonzero().flatten()
        if rows.numel():
            # a square cut by the image's edges: every pixel of its rows and columns' crossing is zeroed
            assert bool(zeroed[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].all())
            sides.append(max(rows.numel(), cols.numel()))
    assert sides and max(sides) <= 16 and len(set(sides)) > 1  # drawn sizes, up to half of 32


def test_randaugment_cutout_keeps_images_in_the_8_bit_range() -> None:
    torch.manual_seed(1)
    x = _normalised_images()
    out = RandAugmentCutout(MEAN, STD)(x)
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = out.transpose(0, 1).flatten(1)
    assert bool((per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all())
    assert not torch.allclose(out, x, atol=1e-3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mean": (0.5,), "std": (0.5, 0.5)}, "mean and std must have one entry per channel"),
    ({"std": (0.2, 0.0, 0.3)}, "std > 0"),
    ({"num_ops": -1}, "num_ops must be an int >= 0, got -1"),
    ({"max_magnitude": 31}, r"max_magnitude must be an int in \[0, 30\], got 31"),
    ({"cutout": 1.0}, r"cutout must be a number in \[0, 1\), got 1.0"),
])
def test_randaugment_cutout_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RandAugmentCutout(**{"mean": MEAN, "std": STD, **kwargs})


def test_randaugment_cutout_refuses_a_batch_of_other_channels() -> None:
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\], got shape \(2, 1, 8, 8\)"):
        RandAugmentCutout(MEAN, STD)(torch.zeros(2, 1, 8, 8))
