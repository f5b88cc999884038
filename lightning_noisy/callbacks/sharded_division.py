"""DivideMix's loss mixture when each rank holds only its block of the losses: the same probabilities, bit for bit.

:func:`~lightning_noisy.callbacks.co_divide.clean_probability` (one mixture) and
:func:`~lightning_noisy.callbacks.co_divide.per_class_clean_probability` (one per noisy class) need three
things of the whole loss vector: each group's range of finite losses (the min-max normalisation), the
losses the mixture is fit to (all of a group's finite losses, or a seeded subset of ``max_fit_samples``)
and the fitted mixture. Here the ranges are all-reduced, the fitting losses (at most ``max_fit_samples``
per group) are gathered on rank 0 in the order the one-process functions use, rank 0 fits the mixtures
and broadcasts their parameters, and each rank computes the posterior of its own losses.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import expit
from torch import Tensor

from lightning_noisy.state.gather import all_gather_uneven, is_distributed


def mixture_posterior(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Posterior of the lower-mean component of 1-D, 2-component mixtures at ``x [M]``.

    Args:
        params: float64 parameters of one mixture ``[6]``, or of each value's ``[M, 6]``: the two
            components' weights, means and inverse standard deviations (scikit-learn's ``weights_``,
            ``means_[:, 0]`` and ``precisions_cholesky_``, see :func:`mixture_params`).
        x: ``[M]`` float64 values.

    Returns:
        ``[M]`` float64 ``sigmoid(log w_low N(x | low) - log w_high N(x | high))``, computed in closed form.
    """
    params = np.atleast_2d(params)
    weights, means, precision_sqrt = params[:, 0:2], params[:, 2:4], params[:, 4:6]
    low = np.argmin(means, axis=1)
    rows = np.arange(params.shape[0])  # one row per value, or one for all

    def log_density(k: np.ndarray) -> np.ndarray:  # log w_k + log N(x | mean_k, std_k), up to -log(2 pi) / 2
        z = (x - means[rows, k]) * precision_sqrt[rows, k]
        return np.log(weights[rows, k]) + np.log(precision_sqrt[rows, k]) - 0.5 * z * z

    return expit(log_density(low) - log_density(1 - low))


def mixture_params(gmm: object) -> np.ndarray:
    """``[6]`` float64 parameters of a fitted 1-D, 2-component ``GaussianMixture`` (see :func:`mixture_posterior`)."""
    return np.concatenate([gmm.weights_, gmm.means_[:, 0], gmm.precisions_cholesky_.reshape(2)])  # type: ignore[attr-defined]


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType, device: torch.device) -> Tensor:
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    return moved.cpu()


def warn_degenerate_losses(total: int, non_finite: int, finite_values: int, distinct: int, stacklevel: int = 3) -> None:
    """Say what the division does with ``total`` losses of which ``non_finite`` are not finite and the
    ``finite_values`` others have ``distinct`` (0, 1, or 2 for "two or more") distinct values; silent when
    nothing is degenerate."""
    problems = []
    if non_finite:
        problems.append(f"{non_finite} non-finite loss(es) get probability 0")
    if distinct < 2:
        problems.append(f"the {finite_values} finite loss(es) have {distinct} distinct value(s), so all get probability 1")
    elif problems:
        problems.append("the mixture is fit to the finite losses")
    if problems:
        warnings.warn(f"clean_probability: degenerate losses (N={total}): " + "; ".join(problems), UserWarning,
                      stacklevel=stacklevel)


def clean_probability_sharded(
    losses: Tensor,
    groups: Tensor | None = None,
    num_groups: int = 1,
    *,
    max_iter: int = 10,
    tol: float = 1e-2,
    reg_covar: float = 5e-4,
    seed: int = 0,
    max_fit_samples: int | None = 100_000,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The rows of this rank's block of :func:`clean_probability` (or, with ``groups``, of
    :func:`per_class_clean_probability`) of losses that the ranks hold in contiguous blocks, in rank order.

    A collective: call on every rank. Without a process group it is the one-process function.

    Args:
        losses: ``[R]`` this rank's losses (its block of the ``[N]`` vector).
        groups: ``[R]`` the noisy labels of those samples in ``[0, num_groups)`` (one mixture per label),
            or ``None`` for one mixture.
        num_groups: the number of labels.
        max_iter, tol, reg_covar, seed, max_fit_samples: as :func:`clean_probability`.
        device: device of the collectives (CPU for gloo, CUDA for NCCL).

    Returns:
        ``[R]`` float32 probabilities, equal bit for bit to this block's rows of the one-process result;
        the same warnings as the one-process function, on every rank.
    """
    from sklearn.mixture import GaussianMixture

    device = torch.device(device)
    x = losses.detach().to(device="cpu", dtype=torch.float64)
    g = torch.zeros(x.shape[0], dtype=torch.long) if groups is None else groups.detach().cpu().to(torch.long)
    if groups is not None and bool(g.numel()) and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise ValueError(f"groups must be in [0, {num_groups}), got min {int(g.min())} and max {int(g.max())}")
    finite = torch.isfinite(x)
    sharded = is_distributed()
    # per group: how many losses, how many finite (on each rank: the offsets), their float64 range
    counts = torch.stack([torch.bincount(g, minlength=num_groups), torch.bincount(g[finite], minlength=num_groups)])
    per_rank = torch.stack(all_gather_uneven(counts.to(device)[None])).cpu()[:, 0] if sharded else counts[None]
    total, finite_count = per_rank.sum(0)
    offsets = per_rank[:, 1].cumsum(0) - per_rank[:, 1]  # [W, G]: finite losses of each group on lower ranks
    rank = dist.get_rank() if sharded else 0
    low64 = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, g[finite], x[finite], "amin", include_self=True)
    high64 = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, g[finite], x[finite], "amax", include_self=True)
    if sharded:
        low64, high64 = _all_reduce(low64, dist.ReduceOp.MIN, device), _all_reduce(high64, dist.ReduceOp.MAX, device)
    # the normalisation is float32 as in normalise_losses; rounding is monotonic, so float32(min) = min(float32)
    low, high = low64.to(torch.float32), high64.to(torch.float32)
    span = high - low
    values32 = x.to(torch.float32)
    normalised = torch.where(span[g] > 0, (values32 - low[g]) / span[g], torch.zeros_like(values32))
    data = normalised.to(torch.float64).numpy()
    # the fitting losses: every finite one of a group, or a seeded subset, in the one-process order
    present = [int(c) for c in torch.nonzero(total).flatten()]
    distinct = {c: 0 if int(finite_count[c]) == 0 else 1 if bool(low64[c] == high64[c]) else 2 for c in present}
    slots, groups_of, picked = [], [], []
    for c in present:
        if distinct[c] < 2:
            continue
        mine = torch.nonzero(finite & (g == c)).flatten()  # this rank's finite losses of group c, in order
        position = torch.arange(mine.numel()) + int(offsets[rank, c])  # their places among the group's finite
        n_finite = int(finite_count[c])
        if max_fit_samples is not None and n_finite > max_fit_samples:
            chosen = torch.from_numpy(np.random.default_rng(seed).choice(n_finite, size=max_fit_samples, replace=False))
            inside = (chosen >= int(offsets[rank, c])) & (chosen < int(offsets[rank, c]) + mine.numel())
            slot = torch.nonzero(inside).flatten()
            local = mine[chosen[slot] - int(offsets[rank, c])]
        else:
            slot, local = position, mine
        slots.append(slot)
        groups_of.append(torch.full_like(slot, c))
        picked.append(torch.from_numpy(data[local.numpy()]))
    fit = torch.stack([torch.cat(slots).double(), torch.cat(groups_of).double(), torch.cat(picked)], 1) if slots else (
        torch.zeros((0, 3), dtype=torch.float64))
    fit = torch.cat(all_gather_uneven(fit.to(device))).cpu() if sharded else fit
    params = torch.zeros((num_groups, 6), dtype=torch.float64)
    if rank == 0:
        for c in present:
            if distinct[c] < 2:
                continue
            rows = fit[fit[:, 1] == c]
            fit_data = torch.empty(rows.shape[0], dtype=torch.float64)
            fit_data[rows[:, 0].long()] = rows[:, 2]
            gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*did not converge.*")  # DivideMix caps EM at 10 steps
                gmm.fit(fit_data.numpy().reshape(-1, 1))
            params[c] = torch.from_numpy(mixture_params(gmm))
    if sharded:
        params = params.to(device)
        dist.broadcast(params, src=0)
        params = params.cpu()
    for c in present:
        warn_degenerate_losses(int(total[c]), int(total[c] - finite_count[c]), int(finite_count[c]), distinct[c])
    probability = torch.zeros(x.shape[0], dtype=torch.float32)
    degenerate = torch.tensor([c in distinct and distinct[c] < 2 for c in range(num_groups)], dtype=torch.bool)
    probability[finite & degenerate[g]] = 1.0
    fitted = finite & ~degenerate[g]
    if bool(fitted.any()):
        where = torch.nonzero(fitted).flatten().numpy()
        posterior = mixture_posterior(params[g[fitted]].numpy(), data[where])
        probability[fitted] = torch.from_numpy(posterior.astype(np.float32))
    return probability


def normalise_losses_sharded(losses: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """This rank's block of :func:`~lightning_noisy.callbacks.co_divide.normalise_losses` of blocked losses, bit for bit.

    The range is that of the finite losses of every rank (all-reduced: a collective). ``[R]`` float32.
    """
    device = torch.device(device)
    x = losses.detach().to(device="cpu", dtype=torch.float32)
    finite = torch.isfinite(x)
    inf = torch.tensor(float("inf"))
    low = x[finite].min() if bool(finite.any()) else inf
    high = x[finite].max() if bool(finite.any()) else -inf
    if is_distributed():
        low, high = _all_reduce(low, dist.ReduceOp.MIN, device), _all_reduce(high, dist.ReduceOp.MAX, device)
    if not bool(torch.isfinite(low)):  # no rank has a finite loss
        return x.clone()
    span = high - low
    if float(span) <= 0:
        return torch.where(finite, torch.zeros_like(x), x)
    return (x - low) / span
