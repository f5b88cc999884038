"""Semi-supervised stages that train a network once its data is divided into labelled and unlabelled samples.

A method that divides its training set (DivideMix's co-divide) hands each step's two parts to a stage:

- :class:`MixMatchStage` (Berthelot et al., NeurIPS 2019, as DivideMix trains with it): two weak views per
  sample, co-refined labelled targets and co-guessed unlabelled ones, everything mixed with a permutation.
- :class:`FixMatchStage` (Sohn et al., NeurIPS 2020): labelled samples trained on a weak view, unlabelled ones
  on a strong view against the pseudo label of a weak view, kept only where it is confident.

Both take the trained network and its peer (the other network of the pair, used in eval mode for guessing),
one :class:`DividedBatch` and the weight of the unlabelled term, and return a :class:`StageResult`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_noisy.losses._targets import check_finite_positive
from lightning_noisy.losses.mixup import sample_mixup_lambda
from lightning_noisy.losses.regularizers import prior_loss
from lightning_noisy.models import evaluating

#: a random view of a batch ``[B, ...] -> [B, ...]``, drawn from the generator when one is given
View = Callable[[Tensor, "torch.Generator | None"], Tensor]

__all__ = [
    "DividedBatch",
    "FixMatchStage",
    "MixMatchStage",
    "SemiSupervisedStage",
    "StageResult",
    "co_guess",
    "co_refine",
    "confident_pseudo_labels",
    "mixmatch_lambda",
    "sharpen",
]


# ---------------------------------------------------------------------------------------------- pure functions
def _check_probs(name: str, p: Tensor) -> None:
    if not isinstance(p, Tensor) or p.ndim != 2 or not p.is_floating_point():
        got = f"shape {tuple(p.shape)}, dtype {p.dtype}" if isinstance(p, Tensor) else repr(p)
        raise ValueError(f"{name} must be a floating tensor [B, C], got {got}")


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """Temperature sharpening of MixMatch: ``p^(1/T) / sum_c p_c^(1/T)`` row-wise.

    Args:
        p: ``[B, C]`` non-negative scores (probabilities).
        temperature: ``T > 0``; ``T < 1`` sharpens, ``T = 1`` only renormalises.

    Returns:
        ``[B, C]`` rows summing to 1, in the dtype of ``p``.
    """
    temperature = check_finite_positive("temperature", temperature)
    _check_probs("p", p)
    powered = p.clamp_min(0) ** (1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def mixmatch_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """``l = max(l, 1 - l)`` with ``l ~ Beta(alpha, alpha)`` (MixMatch / DivideMix): always ``>= 0.5``."""
    lam = sample_mixup_lambda(alpha, generator)
    return max(lam, 1.0 - lam)


def co_refine(labels_onehot: Tensor, probs_mean: Tensor, w: Tensor, temperature: float = 0.5) -> Tensor:
    """Label co-refinement (DivideMix Eq. 3-4): ``sharpen(w y + (1 - w) p, T)``.

    Args:
        labels_onehot: ``[B, C]`` one-hot (noisy) labels of the labelled samples.
        probs_mean: ``[B, C]`` the trained network's softmax (DivideMix: averaged over two augmentations).
        w: ``[B]`` clean probabilities of the samples, from the peer network's division.
        temperature: sharpening temperature ``T``.
    """
    _check_probs("labels_onehot", labels_onehot)
    if probs_mean.shape != labels_onehot.shape:
        raise ValueError(
            f"probs_mean must have the shape of labels_onehot {tuple(labels_onehot.shape)}, got {tuple(probs_mean.shape)}"
        )
    if not isinstance(w, Tensor) or w.shape != labels_onehot.shape[:1]:
        got = tuple(w.shape) if isinstance(w, Tensor) else repr(w)
        raise ValueError(f"w must be a tensor [B] = [{labels_onehot.shape[0]}], got {got}")
    w = w.to(probs_mean.dtype)[:, None]
    return sharpen(w * labels_onehot.to(probs_mean.dtype) + (1.0 - w) * probs_mean, temperature)


def co_guess(p_net: Tensor, p_peer: Tensor, temperature: float = 0.5) -> Tensor:
    """Label co-guessing (DivideMix Sec. 3.3): sharpen the mean softmax of both networks over both augmentations.

    Args:
        p_net: ``[2, B, C]`` softmax of the trained network on the two augmentations.
        p_peer: ``[2, B, C]`` softmax of the peer network on the same two augmentations.
        temperature: sharpening temperature ``T``.

    Returns:
        ``[B, C]`` sharpened guesses.
    """
    if not isinstance(p_net, Tensor) or p_net.ndim != 3 or p_net.shape[0] != 2 or not p_net.is_floating_point():
        got = tuple(p_net.shape) if isinstance(p_net, Tensor) else repr(p_net)
        raise ValueError(f"p_net must be a floating tensor [2, B, C], got {got}")
    if not isinstance(p_peer, Tensor) or p_peer.shape != p_net.shape:
        got = tuple(p_peer.shape) if isinstance(p_peer, Tensor) else repr(p_peer)
        raise ValueError(f"p_peer must have the shape of p_net {tuple(p_net.shape)}, got {got}")
    return sharpen(torch.cat([p_net, p_peer.to(p_net.dtype)]).mean(dim=0), temperature)


def confident_pseudo_labels(p_net: Tensor, p_peer: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch's pseudo labels, co-guessed: the arg max of the two networks' mean softmax on a weak view.

    Args:
        p_net: ``[U, C]`` softmax of the trained network.
        p_peer: ``[U, C]`` softmax of the peer network on the same view.
        threshold: ``tau`` in ``(0, 1]``: a pseudo label is kept where the mean's largest entry is ``>= tau``.

    Returns:
        ``(labels [U], keep [U])``: the arg max classes (long) and which of them are kept (bool).
    """
    _check_probs("p_net", p_net)
    if not isinstance(p_peer, Tensor) or p_peer.shape != p_net.shape:
        got = tuple(p_peer.shape) if isinstance(p_peer, Tensor) else repr(p_peer)
        raise ValueError(f"p_peer must have the shape of p_net {tuple(p_net.shape)}, got {got}")
    _check_threshold(threshold)
    confidence, labels = ((p_net + p_peer.to(p_net.dtype)) / 2).max(dim=1)
    return labels, confidence >= threshold


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


# ---------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class DividedBatch:
    """One step's samples of one network, divided by its peer.

    Attributes:
        inputs: ``[L, ...]`` labelled inputs.
        labels: ``[L]`` their given (noisy) labels.
        clean_probability: ``[L]`` the peer division's clean probability of each (DivideMix's ``w``).
        unlabelled: ``[U, ...]`` unlabelled inputs (``U`` may be 0).
        unlabelled_clean: ``[U]`` the true labels of the unlabelled samples when the data knows them: only
            to measure pseudo labels, never to train.
    """

    inputs: Tensor
    labels: Tensor
    clean_probability: Tensor
    unlabelled: Tensor
    unlabelled_clean: Tensor | None = None


@dataclass
class StageResult:
    """A stage's loss and the counts it reports (sums over the step's samples, on the loss's device).

    ``counts`` of :class:`FixMatchStage`: ``unlabelled`` (samples), ``kept`` (confident pseudo labels) and,
    with ``unlabelled_clean``, ``kept_correct`` (kept pseudo labels equal to the true label).
    """

    loss: Tensor
    counts: dict[str, Tensor] = field(default_factory=dict)


class SemiSupervisedStage(ABC):
    """Trains one network on a :class:`DividedBatch`; :class:`MixMatchStage` and :class:`FixMatchStage` are
    interchangeable."""

    #: the ``counts`` keys this stage reports at every step (the same at every step and on every rank)
    count_keys: tuple[str, ...] = ()

    @abstractmethod
    def loss(
        self, net: nn.Module, peer: nn.Module, batch: DividedBatch, unlabelled_weight: float,
        generator: torch.Generator | None,
    ) -> StageResult:
        """The loss of ``net`` on ``batch`` (with its gradient), the unlabelled term weighted by ``unlabelled_weight``."""

    def epoch_metrics(self, totals: dict[str, float], clean_known: bool) -> dict[str, float]:
        """What to log for an epoch, from its :attr:`count_keys` summed over the steps and ranks (none here).

        ``clean_known``: whether the counts of true labels (``unlabelled_clean``) were available.
        """
        return {}


class MixMatchStage(SemiSupervisedStage):
    """MixMatch as DivideMix trains with it (Li et al. 2020, Sec. 3.3 and the reference code).

    Each sample gets two weak views. Labelled targets are co-refined (:func:`co_refine` with the network's
    mean softmax over both views and ``w`` the clean probability), unlabelled ones co-guessed (:func:`co_guess`:
    the network's and the peer's softmax, the peer in eval mode). All views and targets are mixed with a random
    permutation of themselves (``l = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)``). The loss is the soft
    cross-entropy on the labelled part, plus ``unlabelled_weight`` times the mean squared error between softmax
    and targets on the unlabelled part, plus the uniform-prior penalty on the whole mixed batch; an empty
    unlabelled set drops its term.

    Args:
        weak: the weak view.
        num_classes: ``C``.
        temperature: sharpening temperature ``T`` (paper: 0.5).
        alpha: the mixup Beta parameter (paper: 4 on CIFAR).
    """

    def __init__(self, weak: View, num_classes: int, temperature: float = 0.5, alpha: float = 4.0) -> None:
        self.weak, self.num_classes = weak, num_classes
        self.temperature = check_finite_positive("temperature", temperature)
        self.alpha = check_finite_positive("alpha", alpha)

    def loss(
        self, net: nn.Module, peer: nn.Module, batch: DividedBatch, unlabelled_weight: float,
        generator: torch.Generator | None,
    ) -> StageResult:
        x, x_u = batch.inputs, batch.unlabelled
        x1, x2 = self.weak(x, generator), self.weak(x, generator)
        u1, u2 = self.weak(x_u, generator), self.weak(x_u, generator)
        with torch.no_grad():
            p = (torch.softmax(net(x1).float(), 1) + torch.softmax(net(x2).float(), 1)) / 2
            onehot = F.one_hot(batch.labels, self.num_classes).float()
            targets_x = co_refine(onehot, p, batch.clean_probability.float(), self.temperature)
            if x_u.shape[0] > 0:
                own = torch.stack([torch.softmax(net(u1).float(), 1), torch.softmax(net(u2).float(), 1)])
                with evaluating(peer):
                    guesses = torch.stack([torch.softmax(peer(u1).float(), 1), torch.softmax(peer(u2).float(), 1)])
                targets_u = co_guess(own, guesses, self.temperature)
            else:
                targets_u = targets_x[:0]
        n_x, n_u = int(x.shape[0]), int(x_u.shape[0])
        inputs = torch.cat([x1, x2, u1, u2])
        targets = torch.cat([targets_x, targets_x, targets_u, targets_u])
        lam = mixmatch_lambda(self.alpha, generator)
        device = generator.device if generator is not None else inputs.device
        perm = torch.randperm(inputs.shape[0], generator=generator, device=device).to(inputs.device)
        mixed_input = lam * inputs + (1 - lam) * inputs[perm]
        mixed_target = lam * targets + (1 - lam) * targets[perm]
        logits = net(mixed_input).float()
        loss = prior_loss(logits)
        if n_x > 0:
            loss = loss - (torch.log_softmax(logits[: 2 * n_x], 1) * mixed_target[: 2 * n_x]).sum(1).mean()
        if n_u > 0:
            loss = loss + unlabelled_weight * ((torch.softmax(logits[2 * n_x:], 1) - mixed_target[2 * n_x:]) ** 2).mean()
        return StageResult(loss)


class FixMatchStage(SemiSupervisedStage):
    """FixMatch (Sohn et al., NeurIPS 2020) as the semi-supervised stage after a division.

    Labelled samples are trained on one weak view with co-refined targets (:func:`co_refine`, from the
    network's own softmax on that view, without gradient). Each unlabelled sample gets a pseudo label from a
    weak view, *co-guessed*: the arg max of the mean softmax of the network and its peer (eval mode), as
    DivideMix co-guesses, so the two networks must agree for a label to be confident
    (:func:`confident_pseudo_labels`). It is kept only where that mean's largest entry is at least
    ``threshold``; the network is trained with cross-entropy on a *strong* view of the sample towards it. The
    loss is the labelled soft cross-entropy, plus ``unlabelled_weight`` times the unlabelled cross-entropy
    averaged over all unlabelled samples (dropped ones count 0, as in FixMatch), plus the uniform-prior penalty
    on all the step's logits (as DivideMix adds it). The labelled weak view and the unlabelled strong view go
    through the network in one forward pass, as FixMatch concatenates them.

    Args:
        weak: the weak view.
        strong: the strong view (FixMatch: RandAugment plus Cutout for images).
        num_classes: ``C``.
        temperature: sharpening temperature of the co-refined labelled targets (DivideMix: 0.5).
        threshold: ``tau``, the confidence a pseudo label needs (FixMatch: 0.95).
    """

    count_keys = ("unlabelled", "kept", "kept_correct")

    def __init__(
        self, weak: View, strong: View, num_classes: int, temperature: float = 0.5, threshold: float = 0.95,
    ) -> None:
        self.weak, self.strong, self.num_classes = weak, strong, num_classes
        self.temperature = check_finite_positive("temperature", temperature)
        self.threshold = _check_threshold(threshold)

    def loss(
        self, net: nn.Module, peer: nn.Module, batch: DividedBatch, unlabelled_weight: float,
        generator: torch.Generator | None,
    ) -> StageResult:
        x, x_u = batch.inputs, batch.unlabelled
        n_x, n_u = int(x.shape[0]), int(x_u.shape[0])
        x_weak = self.weak(x, generator)
        counts = {key: torch.zeros((), device=x.device) for key in self.count_keys}
        if n_u > 0:
            u_weak, u_strong = self.weak(x_u, generator), self.strong(x_u, generator)
            with torch.no_grad():
                own = torch.softmax(net(u_weak).float(), 1)
                with evaluating(peer):
                    guessed = torch.softmax(peer(u_weak).float(), 1)
            pseudo, keep = confident_pseudo_labels(own, guessed, self.threshold)
            counts["unlabelled"] = torch.tensor(float(n_u), device=x.device)
            counts["kept"] = keep.sum().float()
            if batch.unlabelled_clean is not None:
                counts["kept_correct"] = (keep & (pseudo == batch.unlabelled_clean.to(pseudo.device))).sum().float()
            logits = net(torch.cat([x_weak, u_strong])).float()
        else:
            logits = net(x_weak).float()
        with torch.no_grad():
            onehot = F.one_hot(batch.labels, self.num_classes).float()
            targets_x = co_refine(onehot, torch.softmax(logits[:n_x].detach(), 1), batch.clean_probability.float(),
                                  self.temperature)
        loss = prior_loss(logits)
        if n_x > 0:
            loss = loss - (torch.log_softmax(logits[:n_x], 1) * targets_x).sum(1).mean()
        if n_u > 0:
            unlabelled = F.cross_entropy(logits[n_x:], pseudo, reduction="none")
            loss = loss + unlabelled_weight * (unlabelled * keep).mean()
        return StageResult(loss, counts)

    def epoch_metrics(self, totals: dict[str, float], clean_known: bool) -> dict[str, float]:
        """``noisy/fixmatch_mask_rate`` (kept share of the unlabelled draws) and, with clean labels,
        ``noisy/pseudo_label_acc`` (share of the kept pseudo labels that are right), where they are defined."""
        metrics = {}
        if totals["unlabelled"] > 0:
            metrics["noisy/fixmatch_mask_rate"] = totals["kept"] / totals["unlabelled"]
        if clean_known and totals["kept"] > 0:
            metrics["noisy/pseudo_label_acc"] = totals["kept_correct"] / totals["kept"]
        return metrics
