"""Pure, seeded label-noise generators and noisy-label file I/O.

Every generator takes clean integer labels (a 1-D ``int64`` tensor of length ``N``; numpy
arrays are converted), draws from a local ``torch.Generator`` seeded with ``seed`` (never the
global RNG state) and returns a frozen :class:`NoisyLabels`.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_noisy.seeding import stream_generator

__all__ = [
    "CIFAR10N_LABEL_KEYS",
    "CIFAR10_ASYMMETRIC_MAP",
    "CIFAR100N_LABEL_KEYS",
    "MNIST_ASYMMETRIC_MAP",
    "NOISE_TYPES",
    "NoisyLabels",
    "asymmetric_noise",
    "instance_dependent_noise",
    "load_cifar_n_labels",
    "load_noisy_labels",
    "make_noisy_labels",
    "no_noise",
    "pair_flip_noise",
    "resolve_class_map",
    "save_corrected_labels",
    "save_noisy_labels",
    "symmetric_noise",
    "transition_matrix",
]

LabelsLike = Tensor | np.ndarray
ClassMapSpec = str | Mapping[Any, Any]
PathLike = str | os.PathLike

#: CIFAR-10 class flips: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
#: MNIST flips of Patrini et al. 2017 / Han et al. 2018: 2->7, 3->8, 5<->6, 7->1.
MNIST_ASYMMETRIC_MAP: dict[int, int] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
_NAMED_CLASS_MAPS: dict[str, dict[int, int]] = {
    "cifar10": CIFAR10_ASYMMETRIC_MAP,
    "mnist": MNIST_ASYMMETRIC_MAP,
}

NOISE_TYPES: tuple[str, ...] = ("none", "symmetric", "asymmetric", "pairflip", "instance", "file", "cifar_n")
CIFAR10N_LABEL_KEYS: tuple[str, ...] = (
    "clean_label",
    "aggre_label",
    "worse_label",
    "random_label1",
    "random_label2",
    "random_label3",
)
CIFAR100N_LABEL_KEYS: tuple[str, ...] = ("clean_label", "noisy_label", "clean_coarse_label", "noisy_coarse_label")
_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class NoisyLabels:
    """Noisy labels together with what is known about how they were made.

    Attributes:
        labels: ``[N]`` int64, the noisy labels.
        clean_labels: ``[N]`` int64 when the clean labels are known, else ``None``.
        noise_rate: realised ``mean(labels != clean_labels)``; ``nan`` when clean labels are unknown.
        transition_matrix: ``[C, C]`` float64 empirical ``P(noisy=j | clean=i)``; rows sum to 1 and a
            class absent from the clean labels gets an identity row. All ``nan`` when clean labels are
            unknown.
    """

    labels: Tensor
    clean_labels: Tensor | None
    noise_rate: float
    transition_matrix: Tensor

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return self.transition_matrix.shape[0]

    @classmethod
    def from_labels(cls, labels: LabelsLike, clean_labels: LabelsLike | None, num_classes: int) -> NoisyLabels:
        """Validate ``[N]`` noisy (and optional ``[N]`` clean) labels and derive rate and transition matrix."""
        num_classes = _check_num_classes(num_classes)
        noisy = _as_labels(labels, num_classes)
        clean = None if clean_labels is None else _as_labels(clean_labels, num_classes, "clean_labels")
        if clean is not None and clean.shape != noisy.shape:
            raise ValueError(
                f"clean_labels must have the shape of labels {tuple(noisy.shape)}, got {tuple(clean.shape)}"
            )
        return _result(noisy, clean, num_classes)


# --------------------------------------------------------------------------------------------
# validation helpers (shared with dataset.py and datamodules.py)
# --------------------------------------------------------------------------------------------
def _check_num_classes(num_classes: Any, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"{name} must be an int >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_rate(rate: Any, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a float in [0, 1], got {rate!r}")
    if not 0.0 <= float(rate) <= 1.0:  # also rejects nan
        raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
    return float(rate)


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _to_label_tensor(labels: Any, name: str = "labels") -> Tensor:
    """Convert ``labels`` to a contiguous non-empty ``[N]`` int64 CPU tensor (no range check)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    return labels.detach().to(device="cpu", dtype=torch.int64).contiguous()


def _as_labels(labels: Any, num_classes: int, name: str = "labels") -> Tensor:
    """Convert ``labels`` to a contiguous ``[N]`` int64 CPU tensor with values in ``[0, num_classes)``."""
    labels = _to_label_tensor(labels, name)
    _check_label_range(labels, num_classes, name)
    return labels


def _check_label_range(labels: Tensor, num_classes: int | None, name: str = "labels") -> None:
    """Raise a ValueError naming how many of the ``[N]`` int64 ``labels`` are outside ``[0, num_classes)``
    and the first one; with ``num_classes=None`` only negative labels are rejected."""
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and (num_classes is None or high < num_classes):
        return
    if num_classes is None:
        bad, expected, what = labels < 0, "[0, num_classes)", "negative"
    else:
        bad = (labels < 0) | (labels >= num_classes)
        expected, what = f"[0, {num_classes}) for num_classes={num_classes}", "outside it"
    first = int(bad.to(torch.uint8).argmax())
    raise ValueError(
        f"{name} must be in {expected}, got values in [{low}, {high}]; {int(bad.sum())} of {labels.numel()}"
        f" are {what}, the first at index {first} (value {int(labels[first])})"
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_check_seed(seed))


# --------------------------------------------------------------------------------------------
# transition matrix and result
# --------------------------------------------------------------------------------------------
def transition_matrix(clean: LabelsLike, noisy: LabelsLike, num_classes: int) -> Tensor:
    """Empirical transition matrix ``T[i, j] = P(noisy=j | clean=i)``.

    Args:
        clean: ``[N]`` clean labels.
        noisy: ``[N]`` noisy labels.
        num_classes: ``C``.

    Returns:
        ``[C, C]`` float64; every row sums to 1, a class absent from ``clean`` gets an identity row.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(clean, num_classes, "clean")
    noisy = _as_labels(noisy, num_classes, "noisy")
    if clean.shape != noisy.shape:
        raise ValueError(f"noisy must have the shape of clean {tuple(clean.shape)}, got {tuple(noisy.shape)}")
    counts = torch.bincount(clean * num_classes + noisy, minlength=num_classes**2)
    counts = counts.reshape(num_classes, num_classes).to(torch.float64)
    totals = counts.sum(dim=1, keepdim=True)
    eye = torch.eye(num_classes, dtype=torch.float64)
    return torch.where(totals > 0, counts / totals.clamp_min(1.0), eye)


def _result(noisy: Tensor, clean: Tensor | None, num_classes: int) -> NoisyLabels:
    if clean is None:
        nan = torch.full((num_classes, num_classes), float("nan"), dtype=torch.float64)
        return NoisyLabels(labels=noisy, clean_labels=None, noise_rate=float("nan"), transition_matrix=nan)
    rate = (noisy != clean).double().mean().item()
    return NoisyLabels(noisy, clean, rate, transition_matrix(clean, noisy, num_classes))


# --------------------------------------------------------------------------------------------
# class-conditional generators
# --------------------------------------------------------------------------------------------
def no_noise(labels: LabelsLike, num_classes: int) -> NoisyLabels:
    """Return the clean labels unchanged (noise rate 0, identity transition matrix)."""
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(labels, num_classes)
    return _result(clean.clone(), clean, num_classes)


def symmetric_noise(
    labels: LabelsLike,
    num_classes: int,
    rate: float,
    *,
    include_true_class: bool = False,
    exact: bool = False,
    seed: int = 0,
) -> NoisyLabels:
    """Symmetric (uniform) label noise.

    A sample is selected with probability ``rate`` (``exact=True``: exactly ``round(rate * N)``
    samples, a random subset). A selected label is redrawn uniformly from the ``C - 1`` other
    classes (``include_true_class=False``; realised rate ``~ rate``) or from all ``C`` classes
    (``include_true_class=True``, the convention of Tanaka et al. 2018 / DivideMix; realised
    rate ``~ rate * (C - 1) / C``).

    Args:
        labels: ``[N]`` clean labels.
        num_classes: ``C``.
        rate: selection probability in ``[0, 1]``.
        include_true_class: draw the new label from all classes instead of the other classes.
        exact: select exactly ``round(rate * N)`` samples.
        seed: seed of the local generator.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(labels, num_classes)
    rate = _check_rate(rate)
    if not include_true_class and rate >= (num_classes - 1) / num_classes:
        warnings.warn(
            f"symmetric noise at rate {rate} redrawn from the other {num_classes - 1} classes keeps a label right with "
            f"probability {1 - rate:.3g} and gives each wrong class {rate / (num_classes - 1):.3g}: from rate "
            f"{(num_classes - 1) / num_classes:.3g} on, the labels say nothing about the class (or point away from "
            "it). include_true_class=True redraws from all classes, as Tanaka et al. and DivideMix do",
            UserWarning,
            stacklevel=2,
        )
    gen = _generator(seed)
    n = clean.numel()
    if exact:
        selected = torch.zeros(n, dtype=torch.bool)
        # a stream of its own: with ``gen``'s, the flipped samples would lead the sampler's epoch-0 order
        order = torch.randperm(n, generator=stream_generator(_check_seed(seed), "exact-noise"))
        selected[order[: round(rate * n)]] = True
    else:
        selected = torch.rand(n, generator=gen, dtype=torch.float64) < rate
    if include_true_class:
        new = torch.randint(0, num_classes, (n,), generator=gen)
    else:
        new = (clean + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
    return _result(torch.where(selected, new, clean), clean, num_classes)


def resolve_class_map(spec: ClassMapSpec, num_classes: int) -> dict[int, int]:
    """Turn ``"cifar10"``, ``"mnist"`` or a mapping (keys may be strings like ``"2"``) into a valid ``{int: int}``.

    Keys and values must lie in ``[0, num_classes)`` and no key may map to itself.
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(spec, str):
        if spec.lower() not in _NAMED_CLASS_MAPS:
            raise ValueError(f"class_map must be one of {sorted(_NAMED_CLASS_MAPS)} or a dict, got {spec!r}")
        spec = _NAMED_CLASS_MAPS[spec.lower()]
    if not isinstance(spec, Mapping) or len(spec) == 0:
        raise ValueError(f"class_map must be a non-empty dict or one of {sorted(_NAMED_CLASS_MAPS)}, got {spec!r}")
    try:
        resolved = {_to_class_int(k): _to_class_int(v) for k, v in spec.items()}
    except (TypeError, ValueError):
        raise ValueError(f"class_map must map integer classes to integer classes, got {dict(spec)!r}") from None
    bad = {k: v for k, v in resolved.items() if not (0 <= k < num_classes and 0 <= v < num_classes) or k == v}
    if bad:
        raise ValueError(
            f"class_map entries must be distinct classes in [0, {num_classes}) for num_classes={num_classes},"
            f" got invalid entries {bad!r}"
        )
    return resolved


def _to_class_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise TypeError(value)
    return int(value)  # int, numpy int or a decimal string such as "2"


def _rank_within_class(labels: Tensor, keys: Tensor, num_classes: int) -> Tensor:
    """Rank ``[N]`` of each sample among the samples of its class, ordered by ``keys``."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - starts[labels[order]]
    return rank


def _class_flip(clean: Tensor, num_classes: int, rate: float, target: Tensor, exact: bool, seed: int) -> NoisyLabels:
    """Flip class ``c`` to ``target[c]`` with probability ``rate`` (classes with ``target[c] == c`` untouched)."""
    rate = _check_rate(rate)
    keys = torch.rand(clean.numel(), generator=_generator(seed), dtype=torch.float64)
    if exact:
        counts = torch.bincount(clean, minlength=num_classes).to(torch.float64)
        per_class = torch.round(rate * counts).to(torch.int64)  # half-to-even, as Python's round
        selected = _rank_within_class(clean, keys, num_classes) < per_class[clean]
    else:
        selected = keys < rate
    return _result(torch.where(selected, target[clean], clean), clean, num_classes)


def asymmetric_noise(
    labels: LabelsLike,
    num_classes: int,
    rate: float,
    class_map: ClassMapSpec,
    *,
    exact: bool = False,
    seed: int = 0,
) -> NoisyLabels:
    """Class-dependent noise: a sample of class ``c in class_map`` flips to ``class_map[c]`` with probability ``rate``.

    With ``exact=True`` exactly ``round(rate * n_c)`` samples of each mapped class flip. Classes
    that are not keys of ``class_map`` are never touched. ``class_map`` is anything
    :func:`resolve_class_map` accepts.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(labels, num_classes)
    mapping = resolve_class_map(class_map, num_classes)
    target = torch.arange(num_classes)
    target[torch.tensor(list(mapping))] = torch.tensor(list(mapping.values()))
    return _class_flip(clean, num_classes, rate, target, exact, seed)


def pair_flip_noise(
    labels: LabelsLike, num_classes: int, rate: float, *, exact: bool = False, seed: int = 0
) -> NoisyLabels:
    """Pair-flip noise (Han et al. 2018): class ``c`` flips to ``(c + 1) mod C`` with probability ``rate``.

    With ``exact=True`` exactly ``round(rate * n_c)`` samples of every class flip.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(labels, num_classes)
    target = (torch.arange(num_classes) + 1) % num_classes
    return _class_flip(clean, num_classes, rate, target, exact, seed)


# --------------------------------------------------------------------------------------------
# instance-dependent noise (Xia et al. 2020)
# --------------------------------------------------------------------------------------------
def _as_features(features: Any, n: int) -> Tensor:
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, Tensor):
        raise ValueError(f"features must be a torch.Tensor or numpy.ndarray, got {type(features).__name__}")
    if features.ndim == 0 or features.shape[0] != n:
        raise ValueError(f"features must have one row per label ({n}), got shape {tuple(features.shape)}")
    features = features.detach().to(device="cpu", dtype=torch.float32).reshape(n, -1)
    if features.shape[1] == 0 or not torch.isfinite(features).all():
        raise ValueError(
            f"features must be finite with at least one value per sample, got shape {tuple(features.shape)}"
        )
    return features


def _truncated_normal(n: int, mean: float, std: float, gen: torch.Generator) -> Tensor:
    """``[n]`` float64 draws from ``N(mean, std^2)`` truncated to ``[0, 1]`` (inverse-CDF sampling)."""
    if std == 0.0:
        return torch.full((n,), mean, dtype=torch.float64)
    low = torch.special.ndtr(torch.tensor((0.0 - mean) / std, dtype=torch.float64))
    high = torch.special.ndtr(torch.tensor((1.0 - mean) / std, dtype=torch.float64))
    u = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    return (mean + std * torch.special.ndtri(u)).clamp(0.0, 1.0)


def instance_dependent_noise(
    features: LabelsLike,
    labels: LabelsLike,
    num_classes: int,
    rate: float,
    *,
    rate_std: float = 0.1,
    seed: int = 0,
) -> NoisyLabels:
    """Instance-dependent noise of Xia et al. 2020 ("Part-dependent label noise", NeurIPS).

    Per-sample flip rates ``q_i ~ N(rate, rate_std^2)`` truncated to ``[0, 1]``; a projection
    ``W ~ N(0, 1)`` of shape ``[C, D, C]``; scores ``s_i = x_i W[y_i]`` with ``s_i[y_i] = -inf``;
    ``p_i = q_i softmax(s_i)`` and ``p_i[y_i] = 1 - q_i``; the noisy label is drawn from ``p_i``.
    The expected realised rate is the mean of the truncated normal, which equals ``rate`` only
    away from the bounds (``rate=0`` with ``rate_std=0.1`` gives about 0.08; use ``rate_std=0``
    for a constant per-sample rate).

    Args:
        features: ``[N, ...]`` inputs, flattened to ``[N, D]``.
        labels: ``[N]`` clean labels.
        num_classes: ``C``.
        rate: mean flip rate in ``[0, 1]``.
        rate_std: standard deviation of the per-sample rate, ``>= 0``.
        seed: seed of the local generator.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _as_labels(labels, num_classes)
    rate = _check_rate(rate)
    if isinstance(rate_std, bool) or not isinstance(rate_std, (int, float)) or not 0.0 <= rate_std < math.inf:
        raise ValueError(f"rate_std must be a finite float >= 0, got {rate_std!r}")
    n = clean.numel()
    x = _as_features(features, n)
    gen = _generator(seed)
    flip_rate = _truncated_normal(n, rate, float(rate_std), gen)
    scores = torch.empty(n, num_classes, dtype=torch.float32)
    for c in range(num_classes):  # one projection per class: memory D x C, not N x D x C
        projection = torch.randn(x.shape[1], num_classes, generator=gen)
        rows = (clean == c).nonzero().squeeze(1)
        scores[rows] = x[rows] @ projection
    rows = torch.arange(n)
    scores = scores.double()
    scores[rows, clean] = -math.inf
    probs = flip_rate[:, None] * torch.softmax(scores, dim=1)
    probs[rows, clean] = 1.0 - flip_rate
    noisy = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return _result(noisy, clean, num_classes)


# --------------------------------------------------------------------------------------------
# file I/O
# --------------------------------------------------------------------------------------------
_PRIMITIVES = (str, int, float, bool, type(None))


def _check_metadata(value: Any, name: str) -> None:
    """Metadata must be loadable with ``torch.load(weights_only=True)``: primitives, lists, tuples, str-keyed dicts."""
    if isinstance(value, _PRIMITIVES):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_metadata(item, f"{name}[{i}]")
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for key, item in value.items():
            _check_metadata(item, f"{name}[{key!r}]")
        return
    raise ValueError(f"metadata {name} must be a str, int, float, bool, None, list or str-keyed dict, got {value!r}")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_noisy_labels(path: PathLike, noisy: NoisyLabels, **metadata: Any) -> None:
    """Write ``noisy`` to a ``.pt`` file (atomically; nothing is written when an argument is invalid).

    The file holds ``{"labels", "clean_labels", "num_classes", "metadata"}`` and loads with
    ``torch.load(weights_only=True)``. ``metadata`` (e.g. ``noise_type``, ``rate``, ``seed``) must
    be primitives, lists or str-keyed dicts.
    """
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"path must end with '.pt', got {str(path)!r}")
    if not isinstance(noisy, NoisyLabels):
        raise ValueError(f"noisy must be a NoisyLabels, got {type(noisy).__name__}")
    _check_metadata(metadata, "metadata")
    payload = {
        "labels": noisy.labels.clone(),
        "clean_labels": None if noisy.clean_labels is None else noisy.clean_labels.clone(),
        "num_classes": noisy.num_classes,
        "metadata": dict(metadata),
    }
    _atomic_torch_save(payload, path)


def _check_soft_or_hard(labels: Any, num_classes: int | None) -> tuple[Tensor, Tensor | None, int | None]:
    """``(hard [N] int64, soft [N, C] or None, C or None)`` from ``[N, C]`` probabilities or ``[N]`` labels."""
    if not isinstance(labels, Tensor) or labels.ndim not in (1, 2):
        shape = getattr(labels, "shape", type(labels).__name__)
        raise ValueError(f"labels must be an [N] or [N, C] tensor, got {shape}")
    if labels.ndim == 1:
        if num_classes is None:
            return _to_label_tensor(labels), None, None
        return _as_labels(labels, _check_num_classes(num_classes)), None, num_classes
    soft = labels.detach().cpu()
    if not soft.dtype.is_floating_point or soft.shape[0] == 0:
        raise ValueError(f"labels of shape [N, C] must be non-empty floats, got {soft.dtype} {tuple(soft.shape)}")
    if num_classes is not None and num_classes != soft.shape[1]:
        raise ValueError(f"num_classes must match the {soft.shape[1]} columns of labels, got {num_classes!r}")
    rows = soft.double().sum(dim=1)
    bad = ~torch.isfinite(soft).all(dim=1) | (soft < 0).any(dim=1)
    bad |= ~torch.isclose(rows, torch.ones_like(rows), atol=1e-4)
    if bool(bad.any()):
        row = int(bad.to(torch.uint8).argmax())
        shown = [round(value, 6) for value in soft[row, :8].tolist()]
        raise ValueError(
            "labels of shape [N, C] must hold probability rows (finite, non-negative, summing to 1), got"
            f" {int(bad.sum())} of {soft.shape[0]} rows that are not; the first is row {row}:"
            f" {shown}{' ...' if soft.shape[1] > 8 else ''} (sum {float(rows[row]):.6g})"
        )
    return soft.argmax(dim=1), soft.clone(), _check_num_classes(soft.shape[1])


def save_corrected_labels(
    path: PathLike,
    labels: Tensor,
    *,
    clean_labels: LabelsLike | None = None,
    num_classes: int | None = None,
    **metadata: Any,
) -> Path:
    """Write corrected labels (``[N, C]`` probabilities or ``[N]`` hard labels) in the :func:`save_noisy_labels` format.

    The file's ``labels`` holds the arg max and ``soft_labels`` the ``[N, C]`` probabilities
    (``None`` for hard input), so :func:`load_noisy_labels` / ``noise_type="file"`` reads the hard
    labels back. ``num_classes`` is taken from ``[N, C]`` input; give it for ``[N]`` input.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"path must end with '.pt', got {str(path)!r}")
    hard, soft, num_classes = _check_soft_or_hard(labels, num_classes)
    clean = None
    if clean_labels is not None:  # range-checked here when C is known, else when loaded
        clean = (
            _to_label_tensor(clean_labels, "clean_labels")
            if num_classes is None
            else _as_labels(clean_labels, num_classes, "clean_labels")
        )
        if clean.shape != hard.shape:
            raise ValueError(f"clean_labels must have one label per sample ({hard.numel()}), got {clean.numel()}")
    _check_metadata(metadata, "metadata")
    payload = {
        "labels": hard,
        "soft_labels": soft,
        "clean_labels": clean,
        "num_classes": num_classes,
        "metadata": dict(metadata),
    }
    _atomic_torch_save(payload, path)
    return path


def _read_pt(path: Path, num_classes: int) -> tuple[Any, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "labels" not in payload:
        raise ValueError(f"path {str(path)!r} must hold a dict with a 'labels' entry, got {type(payload).__name__}")
    stored = payload.get("num_classes")
    if stored is not None and stored != num_classes:
        raise ValueError(f"num_classes={num_classes} disagrees with the {stored} classes stored in {str(path)!r}")
    return payload["labels"], payload.get("clean_labels")


def _is_integer_text(cells: np.ndarray) -> np.ndarray:
    return np.char.isdigit(np.char.lstrip(np.char.strip(cells), "-"))


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    widths = {len(row) for row in rows}
    if not rows or len(widths) != 1:
        raise ValueError(
            f"path {str(path)!r} must hold one label per line or a 'label' column, got an empty or ragged file"
        )
    table = np.array(rows, dtype=str)
    if not _is_integer_text(table[0]).all():  # a header row
        header = [name.strip() for name in table[0]]
        if "label" not in header:
            raise ValueError(f"path {str(path)!r} has a header without a 'label' column, got columns {header}")
        table = table[1:, header.index("label")][:, None]
    if table.shape[1] != 1:
        raise ValueError(f"path {str(path)!r} must hold one integer per line, got {table.shape[1]} columns")
    column = np.char.strip(table[:, 0])
    if column.size == 0:
        raise ValueError(f"path {str(path)!r} must hold integer labels, got a header and no labels")
    integer = _is_integer_text(column)
    if not integer.all():
        first = int(np.argmin(integer))
        raise ValueError(
            f"path {str(path)!r} must hold integer labels, got {str(column[first])!r} as label {first}"
            f" (counting from 0, after any header); {int((~integer).sum())} of {column.size} are not integers"
        )
    return column.astype(np.int64)


def _checked_pair(
    noisy: Any, file_clean: Any, clean_labels: LabelsLike | None, num_classes: int, path: Path
) -> NoisyLabels:
    noisy = _as_labels(noisy, num_classes, "labels")
    given = None if clean_labels is None else _as_labels(clean_labels, num_classes, "clean_labels")
    stored = None if file_clean is None else _as_labels(file_clean, num_classes, "clean labels in the file")
    for name, clean in (("clean_labels", given), ("the file's clean labels", stored)):
        if clean is not None and clean.numel() != noisy.numel():
            raise ValueError(f"path {str(path)!r} holds {noisy.numel()} labels but {name} has {clean.numel()}")
    if given is not None and stored is not None and not torch.equal(given, stored):
        mismatches = int((given != stored).sum())
        raise ValueError(f"clean_labels disagree with the clean labels in {str(path)!r} at {mismatches} positions")
    return _result(noisy, given if given is not None else stored, num_classes)


def load_noisy_labels(path: PathLike, num_classes: int, clean_labels: LabelsLike | None = None) -> NoisyLabels:
    """Read noisy labels from a ``.pt`` file of :func:`save_noisy_labels`, a ``.npy`` array or a ``.csv``.

    A ``.csv`` holds one integer per line or a header with a ``label`` column. Clean labels come
    from ``clean_labels`` or, for ``.pt``, from the file; when both exist they must agree.

    Returns:
        :class:`NoisyLabels` with ``[N]`` int64 tensors.
    """
    num_classes = _check_num_classes(num_classes)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".npy", ".csv"):
        raise ValueError(f"path must end with '.pt', '.npy' or '.csv', got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    file_clean = None
    if suffix == ".pt":
        noisy, file_clean = _read_pt(path, num_classes)
    elif suffix == ".npy":
        noisy = np.load(path, allow_pickle=False)
    else:
        noisy = _read_csv(path)
    return _checked_pair(noisy, file_clean, clean_labels, num_classes, path)


def _check_cifar_n_key(label_key: Any) -> str:
    allowed = sorted(set(CIFAR10N_LABEL_KEYS) | set(CIFAR100N_LABEL_KEYS))
    if label_key not in allowed:
        raise ValueError(f"label_key must be one of {allowed}, got {label_key!r}")
    return label_key


def load_cifar_n_labels(
    path: PathLike, label_key: str, num_classes: int, clean_labels: LabelsLike | None = None
) -> NoisyLabels:
    """Read human noisy labels from the CIFAR-10N / CIFAR-100N ``.pt`` file (Wei et al., ICLR 2022).

    The official files are pickled dicts of numpy arrays, so they are loaded with
    ``torch.load(weights_only=False)``: only open files from a source you trust. The clean labels
    are the file's ``clean_label`` (``clean_coarse_label`` for coarse keys) when present; a given
    ``clean_labels`` must agree with them.

    Args:
        path: the ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt`` file.
        label_key: one of :data:`CIFAR10N_LABEL_KEYS` or :data:`CIFAR100N_LABEL_KEYS`.
        num_classes: 10, 100, or 20 for the coarse CIFAR-100 labels.
        clean_labels: ``[N]`` clean labels in the torchvision training order.
    """
    label_key = _check_cifar_n_key(label_key)
    num_classes = _check_num_classes(num_classes)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"path {str(path)!r} does not exist; the CIFAR-N label files are data/CIFAR-10_human.pt and"
            " data/CIFAR-100_human.pt of https://github.com/UCSC-REAL/cifar-10-100n"
        )
    payload = torch.load(path, map_location="cpu", weights_only=False)  # numpy arrays need the unpickler
    if not isinstance(payload, Mapping) or label_key not in payload:
        keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(f"label_key {label_key!r} is not in {str(path)!r}, which holds {keys}")
    clean_key = "clean_coarse_label" if "coarse" in label_key else "clean_label"
    stored = payload.get(clean_key)
    stored = None if stored is None else _to_array(stored)
    return _checked_pair(_to_array(payload[label_key]), stored, clean_labels, num_classes, path)


def _to_array(values: Any) -> Tensor | np.ndarray:
    return values if isinstance(values, Tensor) else np.asarray(values)


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def _check_noise_type(noise_type: Any, name: str = "noise_type") -> str:
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"{name} must be one of {list(NOISE_TYPES)}, got {noise_type!r}")
    return noise_type


def make_noisy_labels(
    noise_type: str,
    labels: LabelsLike,
    num_classes: int,
    rate: float,
    *,
    seed: int = 0,
    features: LabelsLike | None = None,
    class_map: ClassMapSpec | None = None,
    include_true_class: bool = False,
    exact: bool = False,
    path: PathLike | None = None,
    label_key: str | None = None,
) -> NoisyLabels:
    """Dispatch to the generator or loader named by ``noise_type`` (one of :data:`NOISE_TYPES`).

    ``"asymmetric"`` needs ``class_map``, ``"instance"`` needs ``features``, ``"file"`` needs
    ``path``, ``"cifar_n"`` needs ``path`` and ``label_key``. ``rate`` is validated but unused by
    ``"none"``, ``"file"`` and ``"cifar_n"``.
    """
    noise_type = _check_noise_type(noise_type)
    rate = _check_rate(rate)
    if noise_type == "none":
        return no_noise(labels, num_classes)
    if noise_type == "symmetric":
        return symmetric_noise(labels, num_classes, rate, include_true_class=include_true_class, exact=exact, seed=seed)
    if noise_type == "pairflip":
        return pair_flip_noise(labels, num_classes, rate, exact=exact, seed=seed)
    if noise_type == "asymmetric":
        if class_map is None:
            raise ValueError("class_map must be given for noise_type='asymmetric', got None")
        return asymmetric_noise(labels, num_classes, rate, class_map, exact=exact, seed=seed)
    if noise_type == "instance":
        if features is None:
            raise ValueError("features must be given for noise_type='instance', got None")
        return instance_dependent_noise(features, labels, num_classes, rate, seed=seed)
    if path is None:
        raise ValueError(f"path must be given for noise_type={noise_type!r}, got None")
    if noise_type == "file":
        return load_noisy_labels(path, num_classes, clean_labels=labels)
    if label_key is None:
        raise ValueError("label_key must be given for noise_type='cifar_n', got None")
    return load_cifar_n_labels(path, label_key, num_classes, clean_labels=labels)
