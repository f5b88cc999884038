"""CoDivideCallback and clean_probability: GMM recovery, degenerate input, DDP, resume, bad input, end to end."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import PlainClassifier, SpawnDDPStrategy, SpawnShardedStateStrategy, toy_dataset, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_noisy.callbacks.base import rank_batches, train_eval_loader
from lightning_noisy.callbacks.co_divide import (
    CoDivideCallback,
    clean_probability,
    low_component_posterior,
    normalise_losses,
    per_class_clean_probability,
    per_sample_cross_entropy,
)
from lightning_noisy.callbacks.sharded_division import clean_probability_sharded, normalise_losses_sharded
from lightning_noisy.data.sampler import EpochShuffleSampler
from lightning_noisy.state.layout import RowLayout

# -- the pure functions ------------------------------------------------------------------------------


def _bimodal(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(700, generator=g) * 0.03 + 0.1
    high = torch.randn(300, generator=g) * 0.05 + 0.8
    losses = torch.cat([low, high])[torch.randperm(1000, generator=g)]
    return losses, losses < 0.45  # the modes are > 10 standard deviations apart


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_recovers_the_two_modes(seed: int) -> None:
    losses, is_low = _bimodal(seed)
    assert int(is_low.sum()) == 700
    probability = clean_probability(losses)
    assert probability.dtype == torch.float32 and probability.shape == (1000,)
    assert float((probability[is_low] > 0.5).float().mean()) >= 0.98
    assert float((probability[~is_low] < 0.5).float().mean()) >= 0.98
    torch.testing.assert_close(clean_probability(losses, seed=seed), clean_probability(losses, seed=seed), rtol=0, atol=0)
    # scaling and shifting the losses does not change the division (they are min-max normalised first)
    torch.testing.assert_close(clean_probability(losses * 7 + 3), probability, rtol=0, atol=1e-4)


def test_normalise_losses_maps_to_unit_interval() -> None:
    assert normalise_losses(torch.tensor([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert normalise_losses(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]
    out = normalise_losses(torch.tensor([1.0, float("nan"), 3.0]))
    assert out[0] == 0 and out[2] == 1 and torch.isnan(out[1])


def test_all_equal_losses_warn_and_are_all_clean() -> None:
    with pytest.warns(UserWarning, match="degenerate losses.*1 distinct value"):
        probability = clean_probability(torch.full((10,), 0.7))
    assert probability.tolist() == [1.0] * 10
    with pytest.warns(UserWarning, match="degenerate losses"):
        assert clean_probability(torch.tensor([0.3])).tolist() == [1.0]


def test_non_finite_losses_warn_and_get_probability_zero() -> None:
    losses = torch.tensor([0.5, float("nan"), 0.5, float("inf"), 0.5])
    with pytest.warns(UserWarning, match="2 non-finite loss"):
        probability = clean_probability(losses)
    assert probability.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.warns(UserWarning, match="degenerate"):
        assert clean_probability(torch.tensor([float("nan")] * 3)).tolist() == [0.0] * 3
    # with enough finite losses left, the mixture divides them
    bimodal, is_low = _bimodal(0)
    bimodal[:5] = float("nan")
    with pytest.warns(UserWarning, match="5 non-finite"):
        probability = clean_probability(bimodal)
    assert probability[:5].tolist() == [0.0] * 5
    assert float((probability[5:][is_low[5:]] > 0.5).float().mean()) >= 0.98


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_posterior_equals_scikit_learns(seed: int) -> None:
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    overlapping = np.concatenate([rng.normal(0.2, 0.05, 400), rng.normal(0.5, 0.2, 600)])
    apart = np.concatenate([rng.normal(0.1, 0.03, 700), rng.normal(0.8, 0.05, 300)])  # posteriors down to 1e-90
    for x in (overlapping, apart):
        gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
        gmm.fit(x[:, None])
        expected = gmm.predict_proba(x[:, None])[:, int(np.argmin(gmm.means_[:, 0]))]
        # relative agreement, so that the tiny posteriors in the tails (which rank those samples) agree too
        np.testing.assert_allclose(low_component_posterior(gmm, x), expected, rtol=1e-9, atol=1e-300)


def _overlapping(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    is_low = torch.rand(n, generator=g) < 0.6
    return torch.where(is_low, 0.1 + 0.05 * torch.randn(n, generator=g), 0.6 + 0.15 * torch.randn(n, generator=g))


def test_mixture_is_fit_to_a_seeded_subset_beyond_max_fit_samples() -> None:
    from sklearn.mixture import GaussianMixture

    losses = _overlapping(4000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EM capped at 10 iterations
        full = clean_probability(losses, max_fit_samples=None)
        assert torch.equal(clean_probability(losses, max_fit_samples=4000), full)  # no more losses than the cap
        capped = clean_probability(losses, seed=3, max_fit_samples=300)
        # the documented subset: 300 normalised losses drawn without replacement by default_rng(seed)
        x = normalise_losses(losses).double().numpy()
        subset = x[np.random.default_rng(3).choice(4000, size=300, replace=False)]
        gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=3).fit(subset[:, None])
    expected = gmm.predict_proba(x[:, None])[:, int(np.argmin(gmm.means_[:, 0]))]
    torch.testing.assert_close(capped, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(capped, full, atol=1e-4)
    # a 300-sample fit still divides nearly every sample as the full fit does
    assert float(((capped > 0.5) == (full > 0.5)).float().mean()) >= 0.98


@pytest.mark.parametrize("bad", [1, 0, True, 2.5, "100"])
def test_max_fit_samples_must_be_an_integer_of_at_least_two(bad: Any) -> None:
    with pytest.raises(ValueError, match=f"max_fit_samples must be None or an integer >= 2, got {bad!r}"):
        clean_probability(torch.rand(10), max_fit_samples=bad)
    with pytest.raises(ValueError, match="max_fit_samples must be None"):
        per_class_clean_probability(torch.rand(10), torch.zeros(10, dtype=torch.long), max_fit_samples=bad)
    with pytest.raises(ValueError, match=f"gmm_max_fit_samples must be None or an integer >= 2, got {bad!r}"):
        CoDivideCallback(gmm_max_fit_samples=bad)


def test_per_class_division_keeps_every_class_labelled() -> None:
    # class 2's losses all lie above the others': one mixture calls that class noisy, one per class does not
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(900) % 3
    is_low = torch.rand(900, generator=g) < 0.6
    losses = torch.where(is_low, 0.1, 0.6) + 0.05 * torch.rand(900, generator=g) + 2.0 * (labels == 2)
    assert not bool((clean_probability(losses)[labels == 2] > 0.5).any())
    probability = per_class_clean_probability(losses, labels)
    assert torch.equal(probability > 0.5, is_low)
    for c in range(3):  # each class's probabilities are that class's own mixture
        members = labels == c
        torch.testing.assert_close(probability[members], clean_probability(losses[members]), rtol=0, atol=0)


def test_per_class_division_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of the losses' shape \(4,\), got shape \(3,\)"):
        per_class_clean_probability(torch.rand(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an integer tensor.*dtype torch.float32"):
        per_class_clean_probability(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"losses must be a 1-D tensor \[N\], got \(2, 2\)"):
        per_class_clean_probability(torch.rand(2, 2), torch.zeros(4, dtype=torch.long))


# -- the loss pass ---------------------------------------------------------------------------------


class CountingDataset(torch.utils.data.Dataset):
    """``toy_dataset`` that records which samples were read."""

    def __init__(self, n: int) -> None:
        self.inner, self.read = toy_dataset(n=n), []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        self.read.append(int(i))
        return self.inner[i]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_batches_load_only_the_ranks_share(world_size: int) -> None:
    reference = [batch[2].tolist() for batch in DataLoader(toy_dataset(n=22), batch_size=4)]
    seen: dict[int, list[int]] = {}
    for rank in range(world_size):
        dataset = CountingDataset(22)
        for batch_idx, batch in rank_batches(DataLoader(dataset, batch_size=4), rank, world_size):
            assert batch_idx % world_size == rank and batch_idx not in seen
            seen[batch_idx] = batch[2].tolist()
        assert sorted(dataset.read) == sorted(i for b, idx in seen.items() if b % world_size == rank for i in idx)
    assert [seen[b] for b in sorted(seen)] == reference


def test_rank_batches_skip_the_others_of_an_iterable_dataset() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(toy_dataset(n=10)[i] for i in range(10))

    batches = list(rank_batches(DataLoader(Stream(), batch_size=3), 1, 2))
    assert [(b, batch[2].tolist()) for b, batch in batches] == [(1, [3, 4, 5]), (3, [9])]


@pytest.mark.parametrize("scored_rows", [1, 10, 8192])
def test_loss_pass_equals_the_cross_entropy_of_each_sample(monkeypatch: pytest.MonkeyPatch, scored_rows: int) -> None:
    # batches of 7 are scored one by one, two at a time (14 rows, then the 2 left) or all 30 at once
    monkeypatch.setattr("lightning_noisy.callbacks.co_divide._SCORED_ROWS", scored_rows)
    dataset = toy_dataset(n=30, noisy_every=3)
    net = torch.nn.Linear(dataset[0][0].numel(), 3)
    x = torch.stack([dataset[i][0] for i in range(30)])
    expected = F.cross_entropy(net(x), dataset.noisy_labels, reduction="none").detach()
    loader = DataLoader(dataset, batch_size=7, sampler=EpochShuffleSampler(dataset, seed=0))
    torch.testing.assert_close(per_sample_cross_entropy(net, loader, 30), expected, rtol=0, atol=1e-6)


def test_loss_pass_rejects_missing_repeated_and_malformed_samples() -> None:
    dataset = toy_dataset(n=10)
    net = torch.nn.Linear(dataset[0][0].numel(), 3)
    subset = torch.utils.data.Subset(dataset, list(range(8)))
    with pytest.raises(RuntimeError, match="covered 8 distinct indices in 8 records, expected each of the 10"):
        per_sample_cross_entropy(net, DataLoader(subset, batch_size=4), 10)
    twice = torch.utils.data.ConcatDataset([dataset, subset])
    with pytest.raises(RuntimeError, match="covered 10 distinct indices in 18 records"):
        per_sample_cross_entropy(net, DataLoader(twice, batch_size=4), 10)
    pairs = [(dataset[i][0], dataset[i][1]) for i in range(10)]
    with pytest.raises(ValueError, match=r"needs batches \[input, label, index\]"):
        per_sample_cross_entropy(net, DataLoader(pairs, batch_size=4), 10)


# -- the callback --------------------------------------------------------------------------------------


def _per_sample_losses(callback: CoDivideCallback, trainer_: pl.Trainer, module: pl.LightningModule) -> torch.Tensor:
    """All N losses computed by this process alone, over the same loader the callback uses."""
    losses = torch.empty(callback.training_labels.num_samples)
    module.eval()
    with torch.no_grad():
        for x, y, index in train_eval_loader(trainer_, "test"):
            losses[index] = F.cross_entropy(module(x), y, reduction="none")
    module.train()
    return losses


class RankChecker(CoDivideCallback):
    """Asserts on each rank that the split equals the one-process GMM of the full set and is the same on both ranks."""

    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_epoch_boundary(trainer, pl_module)
        assert trainer.world_size == 2
        mine = _per_sample_losses(self, trainer, pl_module)
        torch.testing.assert_close(self.last_losses, mine, rtol=0, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = clean_probability(mine)
        torch.testing.assert_close(self.probability, expected, rtol=0, atol=1e-5)
        gathered = trainer.strategy.all_gather(torch.cat([self.probability, self.last_losses]))
        assert torch.equal(gathered[0], gathered[1]), "the division differs between ranks"
        self.__dict__["checked"] = self.__dict__.get("checked", 0) + 1
        assert self.checked == trainer.current_epoch + 1


@pytest.mark.ddp
def test_division_identical_on_two_ranks_and_equal_to_one_process() -> None:
    dataset = toy_dataset(n=30, noisy_every=3)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=2, callbacks=[RankChecker(start_epoch=0, batch_size=4, shard_state=False)]).fit(
        PlainClassifier(), DataLoader(dataset, batch_size=4, shuffle=True)
    )


# -- sharded: each rank holds its block; the same division bit for bit -----------------------------------


def _sharded_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """(name, losses [N], labels [N], options): plain, subsets, non-finite, per class with degenerate classes."""
    losses, _ = _bimodal(3)
    losses = losses[:157].clone()
    labels = torch.arange(157) % 4
    with_bad = losses.clone()
    with_bad[[5, 60, 61, 150]] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    degenerate = losses.clone()
    degenerate[labels == 2] = 0.25  # one class of equal losses
    degenerate[labels == 3] = float("nan")  # one class without a finite loss
    return [
        ("one mixture", losses, labels, {}),
        ("subset of 40", with_bad, labels, {"max_fit_samples": 40, "seed": 5}),
        ("per class", degenerate, labels, {"per_class": True, "max_fit_samples": 20}),
        ("per class, all fit", with_bad, labels, {"per_class": True, "max_fit_samples": None}),
    ]


def _check_sharded_division(rank: int, world_size: int) -> None:
    for name, losses, labels, options in _sharded_cases():
        options = dict(options)
        per_class = options.pop("per_class", False)
        layout = RowLayout(losses.shape[0], world_size, rank)
        block = slice(layout.start, layout.stop)
        with warnings.catch_warnings(record=True) as expected_warnings:
            warnings.simplefilter("always")
            normalised = normalise_losses(losses)
            if per_class:
                expected = per_class_clean_probability(normalised, labels, **options)
            else:
                expected = clean_probability(normalised, **options)
        with warnings.catch_warnings(record=True) as got_warnings:
            warnings.simplefilter("always")
            mine = normalise_losses_sharded(losses[block])
            got = clean_probability_sharded(mine, labels[block] if per_class else None, 4 if per_class else 1, **options)
        torch.testing.assert_close(mine, normalised[block], rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN kept
        assert torch.equal(got, expected[block]), f"{name}: probabilities, rank {rank}"
        assert [str(w.message) for w in got_warnings] == [str(w.message) for w in expected_warnings], name
    assert any(torch.isfinite(c[1]).all() for c in _sharded_cases())  # the cases are not all degenerate


@pytest.mark.ddp
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_division_equals_the_one_process_division(world_size: int) -> None:
    run_distributed(_check_sharded_division, world_size=world_size)


def test_sharded_division_in_one_process_is_the_one_process_division() -> None:
    for name, losses, labels, options in _sharded_cases():
        options = dict(options)
        per_class = options.pop("per_class", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = (per_class_clean_probability(losses, labels, **options) if per_class
                        else clean_probability(losses, **options))
            got = clean_probability_sharded(losses, labels if per_class else None, 4 if per_class else 1, **options)
        assert torch.equal(got, expected), name
    with pytest.raises(ValueError, match=r"groups must be in \[0, 2\), got min 0 and max 3"):
        clean_probability_sharded(losses, labels, 2)


class DivisionToFile(CoDivideCallback):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probability, held = self.probability, self.local_probability()[1].shape[0]  # a collective when sharded
        history = self._history.state_dict()["data"] if trainer.world_size == 1 or not self._sharded else None
        if trainer.is_global_zero:
            torch.save({"probability": probability, "held": held, "history": history,
                        "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_sharded_and_replicated_callbacks_divide_the_same(tmp_path: Path) -> None:
    runs = {}
    for shard_state in (None, False):
        pl.seed_everything(2, verbose=False)
        out = tmp_path / f"{shard_state}.pt"
        callback = DivisionToFile(out, start_epoch=1, num_average=2, per_class=True, shard_state=shard_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[callback]).fit(
                PlainClassifier(lr=0.5), DataLoader(toy_dataset(n=31, noisy_every=3), batch_size=4, shuffle=True)
            )
        runs[shard_state] = torch.load(out)
    assert runs[None]["held"] == 16 and runs[False]["held"] == 31
    assert torch.equal(runs[None]["probability"], runs[False]["probability"])
    assert 0 < int((runs[None]["probability"] > 0.5).sum()) < 31
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


def _resumable(tmp_path: Path, max_epochs: int, ckpt: Path | None = None) -> tuple[CoDivideCallback, PlainClassifier]:
    pl.seed_everything(7, verbose=False)
    dataset = toy_dataset(n=30, noisy_every=3)
    loader = DataLoader(dataset, batch_size=8, sampler=EpochShuffleSampler(dataset, seed=1))
    callback, model = CoDivideCallback(start_epoch=1, num_average=2), PlainClassifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path).fit(
            model, loader, ckpt_path=None if ckpt is None else str(ckpt)
        )
    return callback, model


def test_resume_from_epoch_boundary_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, _ = _resumable(tmp_path / "full", max_epochs=4)
    _, first_model = _resumable(tmp_path / "first", max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    first_model.trainer.save_checkpoint(ckpt)
    resumed, _ = _resumable(tmp_path / "resumed", max_epochs=4, ckpt=ckpt)
    assert torch.equal(resumed._history.entries, full._history.entries)
    assert torch.equal(resumed._history.visits, full._history.visits) and resumed._history.visits.tolist() == [3] * 30
    assert torch.equal(resumed.probability, full.probability)
    assert torch.equal(resumed.clean_mask, full.clean_mask)


def test_end_to_end_fit_divides_and_logs(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = CoDivideCallback(start_epoch=1)
    with pytest.raises(RuntimeError, match="no division yet"):
        callback.probability  # noqa: B018
    model = PlainClassifier(lr=0.5)
    logger = TensorBoardLogger(tmp_path, name="codivide")
    trainer(max_epochs=3, callbacks=[callback], logger=logger).fit(
        model, DataLoader(toy_dataset(n=48, noisy_every=4), batch_size=8, shuffle=True)
    )
    assert callback.probability.shape == (48,) and callback.probability.dtype == torch.float32
    assert bool(((callback.probability >= 0) & (callback.probability <= 1)).all())
    labelled, unlabelled = callback.labelled_index(), callback.unlabelled_index()
    assert sorted(torch.cat([labelled, unlabelled]).tolist()) == list(range(48))
    assert torch.equal(callback.clean_mask, callback.probability > 0.5)
    logged = model.trainer.callback_metrics
    for name in ("codivide/labelled_fraction", "noisy/codivide_auroc", "noisy/codivide_precision",
                 "noisy/codivide_recall"):
        assert name in logged, name
    assert float(logged["codivide/labelled_fraction"]) == pytest.approx(len(labelled) / 48)
    assert float(logged["noisy/codivide_auroc"]) > 0.7  # mislabelled samples have the higher losses
    assert callback.last_pass_seconds > 0 and callback.last_gmm_seconds > 0
    assert any(p.name.startswith("events") for p in Path(logger.log_dir).iterdir())
    assert model.training  # train mode restored
    assert "training_step" not in model.__dict__


def test_divide_can_be_called_by_a_module_with_another_model_fn() -> None:
    class TwoCalls(CoDivideCallback):
        def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            first = self.divide(trainer, pl_module).clone()
            second = self.divide(trainer, pl_module, model_fn=lambda m, x: -m(x)).clone()
            self.__dict__["results"] = (first, second, self.last_losses.clone())

    callback = TwoCalls()
    model = PlainClassifier()
    trainer(max_epochs=1, callbacks=[callback]).fit(model, DataLoader(toy_dataset(n=24), batch_size=8))
    first, second, losses = callback.results
    assert not torch.equal(first, second)
    x = torch.stack([toy_dataset(n=24)[i][0] for i in range(24)])
    y = toy_dataset(n=24).noisy_labels
    torch.testing.assert_close(losses, F.cross_entropy(-model.net(x), y, reduction="none"), rtol=0, atol=1e-6)


def test_per_class_callback_fits_one_mixture_per_noisy_class() -> None:
    pl.seed_everything(0, verbose=False)
    dataset = toy_dataset(n=60, noisy_every=4)
    callback = CoDivideCallback(start_epoch=1, per_class=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[callback]).fit(PlainClassifier(lr=0.5), DataLoader(dataset, batch_size=8))
        expected = per_class_clean_probability(normalise_losses(callback.last_losses), dataset.noisy_labels)
        global_mixture = clean_probability(normalise_losses(callback.last_losses))
    torch.testing.assert_close(callback.probability, expected, rtol=0, atol=0)
    assert not torch.equal(callback.probability, global_mixture)


def test_empty_unlabelled_set_warns_once_and_goes_on() -> None:
    class AllEqual(CoDivideCallback):
        def compute_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model_fn: Any = None) -> torch.Tensor:
            return torch.full((self.training_labels.num_samples,), 0.3)

class BatchIterable:
    """An iterable of ready batches: no ``dataset`` attribute (a list would be read as several loaders)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchListData(pl.LightningDataModule):
    """Exposes the training labels, but trains from a plain list of ``[x, y, index]`` batches."""

    def __init__(self) -> None:
        super().__init__()
        self.dataset = toy_dataset(n=12, noisy_every=3)
        self.noisy_labels, self.clean_labels = self.dataset.noisy_labels, self.dataset.clean_labels
        self.num_classes = self.dataset.num_classes

    def train_dataloader(self) -> BatchIterable:
        return BatchIterable(list(DataLoader(self.dataset, batch_size=4)))


def test_a_loader_without_a_dataset_is_named_in_the_error() -> None:
    # the batches train, but the loss pass has no dataset to go over in order
    callback = CoDivideCallback(start_epoch=0)
    with pytest.raises(ValueError, match="CoDivideCallback needs the training dataset: fit with a DataLoader"):
        trainer(max_epochs=1, callbacks=[callback]).fit(PlainClassifier(), datamodule=BatchListData())
    assert callback.last_losses is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p_threshold": 0.0}, r"p_threshold must be a number in \(0, 1\), got 0.0"),
        ({"p_threshold": 1.2}, r"p_threshold must be a number in \(0, 1\), got 1.2"),
        ({"num_average": 0}, "num_average must be an integer >= 1, got 0"),
        ({"start_epoch": -1}, "start_epoch must be an integer >= 0, got -1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"per_class": 1}, "per_class must be a bool, got 1"),
        ({"storage_topk": 2}, "storage_topk must be None: CoDivideCallback keeps one value per sample, got 2"),
        ({"storage_dtype": "float64"}, "storage_dtype must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoDivideCallback(**kwargs)


# -- refine_targets: an unmodified module trains on the division ------------------------------------------------


class TargetsAgainstDivision(PlainClassifier):
    """Checks in each step that its targets are ``w * onehot(y) + (1 - w) / C`` of the division at the epoch's start."""

    def __init__(self, callback: CoDivideCallback) -> None:
        super().__init__(lr=0.5)
        self.callback = callback
        self.division: torch.Tensor | None = None
        self.checked_steps = 0

    def on_train_epoch_start(self) -> None:
        self.division = self.callback.probability.clone() if self.callback.ready else None  # a collective: every rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_noisy.state import BatchContract

        index, y = BatchContract.current_index(self), batch[1]
        noisy = self.callback.training_labels.noisy[index.cpu()]
        if self.division is None:  # before the first division the labels are the given ones
            assert torch.equal(y, noisy)
        else:
            w = self.division[index.cpu()].unsqueeze(1)
            expected = w * F.one_hot(noisy, 3).float() + (1 - w) / 3
            torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)
            torch.testing.assert_close(y.sum(1), torch.ones(len(y)))  # still distributions
            self.checked_steps += 1
        return super().training_step(batch, batch_idx)


def test_refine_targets_trains_an_unmodified_module_on_the_division() -> None:
    pl.seed_everything(0, verbose=False)
    callback = CoDivideCallback(start_epoch=0, refine_targets=True)
    model = TargetsAgainstDivision(callback)
    trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(toy_dataset(n=48, noisy_every=4), batch_size=8,
                                                                      shuffle=True))
    assert model.checked_steps == 2 * 6  # epochs 1 and 2, six batches each
    labels = callback.training_labels
    assert torch.equal(callback.probability > 0.5, labels.noisy == labels.clean)  # a real division: weights 0 and 1
    # without refine_targets the module sees its given labels throughout
    plain = CoDivideCallback(start_epoch=0)
    model = PlainClassifier(lr=0.5)
    trainer(max_epochs=2, callbacks=[plain]).fit(model, DataLoader(toy_dataset(n=48, noisy_every=4), batch_size=8))
    assert all(not t.is_floating_point() for t in model.received_targets)


class TargetsAgainstShardedDivision(TargetsAgainstDivision):
    """On each rank: the checks above, on a sharded division, in every step of epochs 1 and 2."""

    def on_fit_end(self) -> None:
        assert self.callback._sharded and self.checked_steps == 2 * 4  # 30 samples: 15 a rank, 4 batches of 4


@pytest.mark.ddp
def test_refine_targets_with_sharded_state_on_two_ranks() -> None:
    callback = CoDivideCallback(start_epoch=0, refine_targets=True, fetch_window=2)
    trainer(devices=2, strategy=SpawnShardedStateStrategy(), max_epochs=3, callbacks=[callback]).fit(
        TargetsAgainstShardedDivision(callback), DataLoader(toy_dataset(n=30, noisy_every=3), batch_size=4, shuffle=True))


@pytest.mark.parametrize(("name", "bad"), [("refine_targets", 1), ("refine_targets", "yes"), ("fetch_window", 0),
                                           ("fetch_window", True)])
def test_refine_targets_arguments_are_checked(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be"):
        CoDivideCallback(**{name: bad})
