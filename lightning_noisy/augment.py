"""Random views of a training batch, drawn on the batch's device: a weak (nuisance) and a strong augmentation.

Methods that compare two views of a sample (DivideMix's MixMatch, SOP+'s consistency term) draw them here.
Every function takes an optional ``torch.Generator`` so that a run can seed its views per step and a resumed
run repeats them. For images, pass a real augmentation (a torchvision transform) instead where the method
takes one; :func:`strong_augment` has only a tensor-level fallback for ``[B, C, H, W]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Augment = Callable[[Tensor], Tensor]

__all__ = [
    "BatchAugment", "RandAugmentCutout", "check_augment", "default_augment", "draw_views", "segment_mask", "step_generator",
    "strong_augment",
]


def default_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    noise_std: float = 0.05,
    max_shift: int = 2,
    max_scale: float = 0.0,
    max_trend: float = 0.0,
) -> Tensor:
    """A generic augmentation for any ``[B, ..., L]`` tensor: scaling, a linear trend, noise, a circular shift.

    Per sample, in this order: the values are multiplied by a factor drawn from ``[1 - max_scale, 1 +
    max_scale]``; a linear trend running from ``-t`` to ``t`` along the last dimension is added, with ``t``
    drawn from ``[-max_trend, max_trend]`` times the sample's standard deviation; Gaussian noise of standard
    deviation ``noise_std`` times that standard deviation is added; the result is rolled along the last
    dimension by a random integer in ``[-max_shift, max_shift]``. Scaling, shear (a trend), noise and circular
    translation are the nuisances MNIST-1D's generator itself applies (Greydanus 2020); for images pass a
    real augmentation (e.g. a torchvision transform). The defaults only add noise and shift a little.
    """
    if x.shape[0] == 0:
        return x
    flat = x.flatten(1)
    scale = flat.float().std(dim=1, unbiased=False).to(x.dtype) if flat.shape[1] > 1 else torch.ones_like(flat[:, 0])
    per_sample = (x.shape[0], *([1] * (x.ndim - 1)))
    scale = scale.view(per_sample)
    device = generator.device if generator is not None else x.device

    def uniform(bound: float) -> Tensor:  # [B, 1, ...] draws from [-bound, bound]
        return ((2 * torch.rand(x.shape[0], generator=generator, device=device) - 1) * bound).to(x).view(per_sample)

    out = x
    if max_scale > 0:
        out = out * (1 + uniform(max_scale))
    if max_trend > 0 and x.ndim >= 2:
        ramp = torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype)
        out = out + uniform(max_trend) * scale * ramp
    noise = torch.randn(x.shape, generator=generator, device=device).to(x)
    out = out + noise_std * scale * noise
    if max_shift > 0 and x.ndim >= 2:
        length = x.shape[-1]
        shift = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=generator, device=device).to(x.device)
        index = (torch.arange(length, device=x.device)[None, :] - shift[:, None]) % length  # [B, L]
        index = index.view(x.shape[0], *([1] * (x.ndim - 2)), length).expand_as(out)
        out = out.gather(-1, index)
    return out


def step_generator(seed: int, epoch: int, batch_idx: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for one training step's random views, a function of its four arguments only,
    so that a run resumed from a checkpoint draws the views of the uninterrupted one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((int(seed), int(epoch), int(batch_idx), int(rank))) % 2**62)  # ints hash stably
    return generator


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def segment_mask(x: Tensor, max_fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero one random window of each sample's last dimension (Cutout for series). ``[B, ..., L]`` as ``x``.

    The window's length is drawn from ``[0, max_fraction * L]`` and its start uniformly, per sample.
    """
    _check_fraction("max_fraction", max_fraction)
    if x.shape[0] == 0 or x.ndim < 2 or max_fraction == 0:
        return x
    length = x.shape[-1]
    device = generator.device if generator is not None else x.device
    width = (torch.rand(x.shape[0], generator=generator, device=device) * max_fraction * length).long().to(x.device)
    start = (torch.rand(x.shape[0], generator=generator, device=device).to(x.device) * (length - width + 1)).long()
    position = torch.arange(length, device=x.device)[None, :]
    keep = (position < start[:, None]) | (position >= (start + width)[:, None])  # [B, L]
    return x * keep.view(x.shape[0], *([1] * (x.ndim - 2)), length).to(x.dtype)


def _correlated_noise(x: Tensor, width: int, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise smoothed along the last dimension by a moving average of ``width``, unit variance."""
    device = generator.device if generator is not None else x.device
    flat = torch.randn(x[..., 0].numel(), 1, x.shape[-1], generator=generator, device=device).to(x)
    smooth = F.avg_pool1d(F.pad(flat, (width // 2, (width - 1) // 2), mode="circular"), width, stride=1)
    return (smooth * width**0.5).view(x.shape)


def _image_strong_augment(x: Tensor, generator: torch.Generator | None, cutout: float) -> Tensor:
    """``[B, C, H, W]``: a random horizontal flip, a translation of up to 1/8 of the side, and Cutout."""
    b, _, h, w = x.shape
    device = generator.device if generator is not None else x.device

    def draw(high: int) -> Tensor:
        return torch.randint(-high, high + 1, (b,), generator=generator, device=device).to(x.device)

    flip = torch.rand(b, generator=generator, device=device).to(x.device) < 0.5
    out = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = draw(h // 8), draw(w // 8)
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None]).clamp(0, h - 1)  # [B, H], edges repeated
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None]).clamp(0, w - 1)
    out = out.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, w))
    out = out.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))
    side = int(round(cutout * min(h, w)))
    if side > 0:  # Cutout (DeVries & Taylor 2017): a square at a random centre, zeroed
        out = _cut_out(out, torch.full((b,), side // 2, device=x.device), generator)
    return out


def _cut_out(x: Tensor, reach: Tensor, generator: torch.Generator | None) -> Tensor:
    """``x [B, C, H, W]`` with, per image, the pixels within ``reach [B]`` rows and columns of a centre drawn
    uniformly (rows first, then columns) set to 0: a square of side ``2 reach + 1``, cut at the edges."""
    b, _, h, w = x.shape
    device = generator.device if generator is not None else x.device
    cy = torch.randint(0, h, (b,), generator=generator, device=device).to(x.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=device).to(x.device)
    inside_y = (torch.arange(h, device=x.device)[None, :] - cy[:, None]).abs() <= reach[:, None]
    inside_x = (torch.arange(w, device=x.device)[None, :] - cx[:, None]).abs() <= reach[:, None]
    square = inside_y[:, :, None] & inside_x[:, None, :]  # [B, H, W]
    return x * (~square)[:, None].to(x.dtype)


def strong_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    noise_std: float = 0.1,
    correlated_noise_std: float = 0.1,
    max_shift: int = 8,
    max_scale: float = 0.4,
    max_trend: float = 1.0,
    mask_fraction: float = 0.25,
    cutout: float = 0.5,
) -> Tensor:
    """A strong random view of a batch: for series ``[B, L]`` or ``[B, C, L]``, and a fallback for images.

    Series: the nuisances of :func:`default_augment` at larger bounds (scale, linear trend, white noise,
    circular shift), plus noise correlated over 5 positions (``correlated_noise_std``, in multiples of each
    sample's standard deviation) and a zeroed window of up to ``mask_fraction`` of the length
    (:func:`segment_mask`). These are the nuisances that MNIST-1D's own generator draws (Greydanus 2020),
    pushed further, and Cutout's idea in one dimension: the strong counterpart of the weak
    :func:`default_augment`, as RandAugment plus Cutout is of crop and flip for images (FixMatch).

    Images ``[B, C, H, W]``: a random flip, a translation of up to an eighth of the side and a Cutout square
    of ``cutout`` times the side (the papers use RandAugment or AutoAugment plus Cutout: pass a torchvision
    transform to the method for those).
    """
    _check_fraction("cutout", cutout)
    if x.shape[0] == 0:
        return x
    if x.ndim == 4:
        return _image_strong_augment(x, generator, cutout)
    out = default_augment(x, generator, noise_std=noise_std, max_shift=0, max_scale=max_scale, max_trend=max_trend)
    if correlated_noise_std > 0 and x.ndim >= 2:
        scale = x.flatten(1).float().std(dim=1, unbiased=False).to(x.dtype).view(x.shape[0], *([1] * (x.ndim - 1)))
        out = out + correlated_noise_std * scale * _correlated_noise(x, 5, generator)
    out = segment_mask(out, mask_fraction, generator)
    return default_augment(out, generator, noise_std=0.0, max_shift=max_shift)


class BatchAugment(ABC):
    """A random view of a batch ``[B, ...] -> [B, ...]`` as a class, so that a config can name it by
    ``class_path`` (a plain function of a tensor works wherever an augmentation is taken, from Python)."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """A random view of ``x``, shaped as ``x``."""


class RandAugmentCutout(BatchAugment):
    """FixMatch's strong view of a normalised image batch ``[B, C, H, W]``: RandAugment, then Cutout, per image.

    As FixMatch (Sohn et al. 2020, Sec. 2.3 and its appendix) applies it: ``num_ops`` operations drawn by
    torchvision's ``RandAugment``, each at a magnitude drawn anew for every image (FixMatch's variant draws
    the magnitude at random instead of fixing it), then a Cutout square whose side is drawn from ``[0,
    cutout]`` times the image side, filled with the dataset's mean (0 after normalisation). The batch is
    un-normalised with ``mean`` and ``std`` (the DataModule's), turned into 8-bit images for RandAugment, and
    normalised again. It draws from torch's global RNG (torchvision's transforms take no generator), and
    costs about 1.4 ms per 32 x 32 image on one CPU thread; a DataLoader transform with workers is cheaper
    where the method can take one.

    Args:
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        num_ops: RandAugment operations per image (FixMatch: 2).
        max_magnitude: magnitudes are drawn from ``0..max_magnitude`` of torchvision's 31 bins (30: the whole range).
        cutout: largest Cutout side, as a fraction of the image side (FixMatch: 0.5).
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], num_ops: int = 2, max_magnitude: int = 30, cutout: float = 0.5,
    ) -> None:
        from torchvision.transforms import v2

        if len(mean) != len(std) or not mean or any(not s > 0 for s in std):
            raise ValueError(f"mean and std must have one entry per channel and std > 0, got {mean!r} and {std!r}")
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
        if isinstance(max_magnitude, bool) or not isinstance(max_magnitude, int) or not 0 <= max_magnitude <= 30:
            raise ValueError(f"max_magnitude must be an int in [0, 30], got {max_magnitude!r}")
        _check_fraction("cutout", cutout)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.max_magnitude, self.cutout = max_magnitude, float(cutout)
        self._randaugment = v2.RandAugment(num_ops=num_ops, magnitude=0)

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected images [B, {len(self.mean)}, H, W], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return x
        mean = torch.tensor(self.mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
        images = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        views = []
        for image in images:
            self._randaugment.magnitude = int(torch.randint(0, self.max_magnitude + 1, ()))
            views.append(self._randaugment(image))
        out = (torch.stack(views).float() / 255 - mean) / std
        b, _, h, w = out.shape
        sides = (torch.rand(b) * self.cutout * min(h, w)).round().long().to(x.device)
        # a side-s square (s odd) or s - 1 (s even), the mean's value: 0 after normalisation
        return _cut_out(out, torch.div(sides - 1, 2, rounding_mode="floor"), None).to(x.dtype)


def check_augment(name: str, value: object) -> None:
    """Refuse an augmentation argument that is neither ``None`` nor a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a callable [B, ...] -> [B, ...] or None, got {type(value).__name__}")


def draw_views(
    x: Tensor, generator: torch.Generator, weak: Augment | None = None, strong: Augment | None = None
) -> tuple[Tensor, Tensor]:
    """``(weak view, strong view)`` of a batch ``x [B, ...]``, each shaped as ``x``.

    ``weak`` and ``strong`` are the user's augmentations (they draw from torch's global RNG); ``None`` takes
    :func:`default_augment` (the batch as loaded for images ``[B, C, H, W]``, whose DataModule's crop and
    flip is the weak view) and :func:`strong_augment`, drawn from ``generator``.
    """
    if weak is not None:
        weak_view = weak(x)
    else:
        weak_view = x if x.ndim == 4 else default_augment(x, generator)
    return weak_view, strong(x) if strong is not None else strong_augment(x, generator)
