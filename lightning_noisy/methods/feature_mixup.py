"""Attention feature mixup: mix penultimate features of sample pairs with learnt attention weights.

After Attentive Feature Mixup (AFM; Peng, Wang, Zeng, Li, Yang, Qiao, "Suppressing Mislabeled Data via
Grouping and Self-Attention", ECCV 2020): pairs are formed within groups of the same (noisy) label and
across groups, and the classifier is trained on the mixtures. The paper's method section was not available
to us; the attention network, the mixed targets and the loss weights follow the authors' released code
(github.com/kaiwang960112/AFM, ``afm.py`` and ``train.py``). The grouping by label follows the paper's
description (the released code pairs the two halves of a shuffled batch instead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_noisy.callbacks.base import log_epoch
from lightning_noisy.losses._targets import check_finite_non_negative
from lightning_noisy.methods.classifier import NoisyClassifier, split_batch

__all__ = ["FeatureMixup", "PairAttention", "group_pairs", "mix_features", "mixed_targets", "soft_cross_entropy"]


def group_pairs(labels: Tensor, pairs_per_group: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random pairs of batch positions: within groups of one label, and the same number across groups.

    For every label that ``g >= 2`` samples of the batch carry, ``pairs_per_group`` pairs ``(i, j)``, ``i != j``,
    are drawn from that group (with replacement across pairs). Then as many cross-group pairs are drawn: ``i``
    uniformly from the batch, ``j`` uniformly among the samples whose label differs from ``y_i`` (none when
    the batch holds a single label).

    Args:
        labels: ``[B]`` int64 (noisy) labels.
        pairs_per_group: pairs drawn per group of size ``>= 2`` (``>= 1``).
        generator: CPU ``torch.Generator`` for reproducible pairs; torch's global RNG when ``None``.

    Returns:
        ``(within [P, 2], cross [Q, 2])``: int64 positions on ``labels``' device, ``Q <= P``.
    """
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be integer [B], got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(pairs_per_group, bool) or not isinstance(pairs_per_group, int) or pairs_per_group < 1:
        raise ValueError(f"pairs_per_group must be an integer >= 1, got {pairs_per_group!r}")
    cpu = labels.detach().cpu()
    within: list[list[int]] = []
    for c in torch.unique(cpu).tolist():
        members = (cpu == c).nonzero().flatten()
        if members.numel() < 2:
            continue
        for _ in range(pairs_per_group):
            first, second = torch.randperm(members.numel(), generator=generator)[:2].tolist()
            within.append([int(members[first]), int(members[second])])
    cross: list[list[int]] = []
    if torch.unique(cpu).numel() > 1:
        for _ in range(len(within)):
            i = int(torch.randint(cpu.numel(), (1,), generator=generator))
            others = (cpu != cpu[i]).nonzero().flatten()
            j = int(others[int(torch.randint(others.numel(), (1,), generator=generator))])
            cross.append([i, j])
    as_tensor = lambda pairs: torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).to(labels.device)
    return as_tensor(within), as_tensor(cross)


def mix_features(f_i: Tensor, f_j: Tensor, w: Tensor) -> Tensor:
    """``w[:, 0] f_i + w[:, 1] f_j`` for ``f_i, f_j [P, D]`` and weights ``w [P, 2]``."""
    if f_i.shape != f_j.shape or f_i.ndim != 2 or w.shape != (f_i.shape[0], 2):
        raise ValueError(f"expected f_i, f_j [P, D] and w [P, 2], got {tuple(f_i.shape)}, {tuple(f_j.shape)}, "
                         f"{tuple(w.shape)}")
    return w[:, :1] * f_i + w[:, 1:] * f_j


def mixed_targets(y_i: Tensor, y_j: Tensor, num_classes: int) -> Tensor:
    """Soft labels ``(onehot(y_i) + onehot(y_j)) / 2`` ``[P, C]`` float32 (``= onehot(y)`` within a group).

    The targets do not depend on the attention weights, as in the released AFM code (which scores the
    mixture against each label with weight 1/2): with attention-weighted targets the weights would get a
    gradient towards whichever label the classifier already prefers and saturate at (1, 0) or (0, 1),
    which undoes the mixing.
    """
    if y_i.shape != y_j.shape or y_i.ndim != 1:
        raise ValueError(f"expected y_i, y_j [P], got {tuple(y_i.shape)}, {tuple(y_j.shape)}")
    return (F.one_hot(y_i, num_classes) + F.one_hot(y_j, num_classes)).float() / 2


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of ``-sum_c t_c log softmax(logits)_c`` over the rows."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class PairAttention(nn.Module):
    """Attention over a pair, as in the released AFM code: ``a = sigmoid(v . (relu(A f_i) + relu(B f_j)))``.

    ``A`` and ``B`` are ``D -> H`` linear layers (``H = max(1, 3 D / 16)``, the code's 384 for ResNet-50's
    2,048 features) and ``v`` an ``H -> 1`` one; the pair's weights are ``(a, 1 - a)``.
    """

    def __init__(self, feature_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        feature_dim = int(feature_dim)
        hidden = max(1, 3 * feature_dim // 16) if hidden_dim is None else int(hidden_dim)
        if feature_dim < 1 or hidden < 1:
            raise ValueError(f"feature_dim and hidden_dim must be >= 1, got {feature_dim} and {hidden}")
        self.embed_i = nn.Linear(feature_dim, hidden)
        self.embed_j = nn.Linear(feature_dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, f_i: Tensor, f_j: Tensor) -> Tensor:
        """``[P, D], [P, D] -> [P, 2]`` weights ``(w_i, w_j)``, each in ``(0, 1)``, summing to 1."""
        a = torch.sigmoid(self.score(F.relu(self.embed_i(f_i)) + F.relu(self.embed_j(f_j))))
        return torch.cat([a, 1 - a], dim=1)


class FeatureMixup(NoisyClassifier):
    """Attention feature mixup (AFM; Peng et al., ECCV 2020), on a backbone with ``features`` and ``classifier``.

    Each training batch is grouped by its (noisy) label (:func:`group_pairs`). Within a group, pairs
    ``(i, j)`` are mixed in feature space, ``f = w_i f_i + w_j f_j`` with ``(w_i, w_j)`` from
    :class:`PairAttention`, and keep the group's label: the attention learns to lower the weight of the
    samples whose features do not fit their label (the mislabelled ones). Across groups, pairs are mixed the
    same way with the label ``(onehot(y_i) + onehot(y_j)) / 2`` (:func:`mixed_targets`). The loss is
    ``L = lambda_ce L_ce(classifier(f_b), y_b) + lambda_mix L_mix``, ``L_mix`` the (soft) cross-entropy of
    ``classifier`` on all mixed features; the released code weighs them 0.5 and 1.5. Gradients reach the
    backbone, the classifier and, through the mixed features, the attention. Inference is the plain network.

    Pairs are drawn with a CPU ``torch.Generator`` seeded from ``(seed, global_step)``: the same pairs in a
    rerun, and the same positions on every DDP rank. A batch without a group of two gives ``L_mix = 0`` (its
    attention gets zero gradients, so DDP ranks with and without pairs reduce the same parameters).

    Logged: ``train/loss``, ``train/loss_ce``, ``train/loss_mix``, ``train/attention_within`` (mean weight
    of the pairs' first sample within groups); ``test/acc`` and ``test/acc_best`` as :class:`NoisyClassifier`.

    Args:
        lambda_ce: weight of the loss on the plain features, ``>= 0`` (released code: 0.5).
        lambda_mix: weight of the mixed-feature loss, ``>= 0`` (released code: 1.5).
        pairs_per_group: random within-group pairs per label group of the batch, and as many cross-group
            pairs in total (keeps the cost bounded; ``>= 1``).
        seed: seed of the pair sampling.
        **kwargs: the :class:`NoisyClassifier` arguments (``mixup_alpha`` must stay 0).
    """

    def __init__(
        self, lambda_ce: float = 0.5, lambda_mix: float = 1.5, pairs_per_group: int = 4, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_finite_non_negative("lambda_ce", lambda_ce)
        check_finite_non_negative("lambda_mix", lambda_mix)
        if isinstance(pairs_per_group, bool) or not isinstance(pairs_per_group, int) or pairs_per_group < 1:
            raise ValueError(f"pairs_per_group must be an integer >= 1, got {pairs_per_group!r}")
        if self.hparams.mixup_alpha > 0:
            raise ValueError("FeatureMixup does not support mixup_alpha > 0 (it mixes features itself)")
        for name in ("features", "classifier", "feature_dim"):
            if not hasattr(self.backbone, name):
                raise ValueError(f"FeatureMixup needs a backbone with `{name}`; {type(self.backbone).__name__} has none")
        self.attention = PairAttention(int(self.backbone.feature_dim))

    def pair_generator(self, step: int) -> torch.Generator:
        """The CPU generator of training step ``step``."""
        return torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + int(step))

    def feature_mixup_loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The two AFM losses on a batch ``x [B, ...]`` with hard labels ``y [B]``.

        Returns:
            ``{"loss", "loss_ce", "loss_mix", "logits", "weights_within"}``.
        """
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"FeatureMixup needs hard integer labels [B], got {y.dtype} {tuple(y.shape)}")
        features = self.backbone.features(x)
        logits = self.backbone.classifier(features)
        loss_ce = self.compute_loss(logits, y)
        within, cross = group_pairs(y, int(self.hparams.pairs_per_group), generator)
        pairs = torch.cat([within, cross])
        if pairs.shape[0] == 0:
            # no pair: L_mix = 0, but the attention still enters the graph (with zero gradients), so that under
            # DDP this rank reduces the same parameters as a rank whose batch has pairs
            weights = self.attention(features[:0], features[:0])
            loss_mix = (logits.sum() + weights.sum()) * 0.0
        else:
            f_i, f_j = features[pairs[:, 0]], features[pairs[:, 1]]
            weights = self.attention(f_i, f_j)
            mixed = mix_features(f_i, f_j, weights)
            targets = mixed_targets(y[pairs[:, 0]], y[pairs[:, 1]], self.num_classes)
            loss_mix = soft_cross_entropy(self.backbone.classifier(mixed), targets)
        loss = float(self.hparams.lambda_ce) * loss_ce + float(self.hparams.lambda_mix) * loss_mix
        return {"loss": loss, "loss_ce": loss_ce, "loss_mix": loss_mix, "logits": logits,
                "weights_within": weights[: within.shape[0]]}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        out = self.feature_mixup_loss(x, y, self.pair_generator(self.global_step))
        batch_size = int(x.shape[0])
        log_epoch(self, "train/loss", out["loss"], batch_size=batch_size, prog_bar=True)
        log_epoch(self, "train/loss_ce", out["loss_ce"], batch_size=batch_size)
        log_epoch(self, "train/loss_mix", out["loss_mix"], batch_size=batch_size)
        # logged every step, so every rank reduces the same names; a batch without within-group pairs weighs 0
        within = out["weights_within"][:, 0].detach()
        log_epoch(self, "train/attention_within", within.mean() if within.numel() else within.new_zeros(()),
                  batch_size=batch_size if within.numel() else 0)
        return {"loss": out["loss"], "logits": out["logits"]}
