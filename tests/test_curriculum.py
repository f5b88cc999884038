"""CurriculumNet: density subsets (pure function) and the staged, weighted training callback."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.callbacks.curriculum import CurriculumCallback, default_features, density_curriculum, local_density
from lightning_noisy.data import EpochShuffleSampler
from tests.helpers import NUM_CLASSES, PlainClassifier, SpawnDDPStrategy, toy_dataset, toy_loader, trainer

# -- density_curriculum -----------------------------------------------------------------------------


def _two_density_classes(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: 30 points around a centre (std 0.05) and 10 spread points (std 3); returns x, y, is_dense."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, dense = [], [], []
    for c in range(2):
        centre = torch.full((8,), 10.0 * c)
        xs += [centre + 0.05 * torch.randn(30, 8, generator=g), centre + 3.0 * torch.randn(10, 8, generator=g)]
        ys += [torch.full((40,), c)]
        dense += [torch.ones(30, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)]
    order = torch.randperm(80, generator=g)  # classes interleaved, as in a data set
    return torch.cat(xs)[order], torch.cat(ys)[order], torch.cat(dense)[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_cluster_is_easy_and_spread_points_are_harder(seed: int) -> None:
    x, y, dense = _two_density_classes(seed)
    subsets = density_curriculum(x, y, num_classes=2)
    assert subsets.dtype == torch.long and subsets.shape == (80,)
    assert torch.all(subsets[dense] == 0)
    assert set(subsets.tolist()) == {0, 1, 2}
    # the spread points are semi-hard or hard, except one that happens to fall inside the dense region
    # (closer to the cluster than the cut-off distance d_c, the 60th percentile of the class's distances)
    assert int((subsets[~dense] >= 1).sum()) >= 16
    for c in range(2):
        members = x[y == c].double()
        d_c = torch.quantile(F.pdist(members), 0.6)
        centre = members[dense[y == c]].mean(0)
        easy_spread = (subsets[y == c] == 0) & ~dense[y == c]
        assert torch.all((members[easy_spread] - centre).norm(dim=1) < d_c)


def test_local_density_by_hand() -> None:
    # points on a line at 0, 1, 2, 10: pairwise distances 1,1,2,8,9,10 -> 50th percentile d_c = 5
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    rho, delta = local_density(x, cutoff_percentile=50.0)
    assert rho.tolist() == [2, 2, 2, 0]
    # equal densities are not "higher": the three densest points get their largest distance
    assert delta.tolist() == [10.0, 9.0, 8.0, 8.0]


def test_small_and_empty_classes_go_to_the_easy_subset() -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 2, 2, 2])  # class 1 empty, class 0 smaller than num_subsets
    subsets = density_curriculum(x, y, num_classes=3, num_subsets=3)
    assert subsets[:2].tolist() == [0, 0]
    assert set(subsets[2:].tolist()) <= {0, 1, 2}
    assert density_curriculum(x, y, num_classes=3, num_subsets=1).tolist() == [0] * 5
    same = torch.zeros(6, 2)  # all of one density: one subset
    assert density_curriculum(same, torch.zeros(6, dtype=torch.long), 1).tolist() == [0] * 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_subsets": 0}, r"num_subsets must be an integer >= 1, got 0"),
        ({"cutoff_percentile": 100.0}, r"cutoff_percentile must be a number in \(0, 100\), got 100.0"),
        ({"cutoff_percentile": 0}, r"cutoff_percentile must be a number in \(0, 100\), got 0"),
        ({"features": torch.zeros(6)}, r"features must be a 2-D tensor \[N, D\], got \(6,\)"),
        ({"features": torch.zeros(5, 2)}, r"same number of rows N, got 5 and 6"),
        ({"labels": torch.tensor([0, 1, 2, 3, 0, 1])}, r"labels must be in \[0, 3\), got min 0 and max 3"),
        ({"labels": torch.tensor([0, -1, 0, 0, 0, 0])}, r"got min -1 and max 0"),
        ({"labels": torch.zeros(6)}, r"labels must be a 1-D integer tensor"),
        ({"features": torch.full((6, 2), float("nan"))}, r"features must be finite"),
    ],
)
def test_bad_input_is_rejected(kwargs: dict, message: str) -> None:
    args = {"features": torch.zeros(6, 2), "labels": torch.zeros(6, dtype=torch.long), "num_classes": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        density_curriculum(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage_epochs": [10]}, r"stage_epochs must hold len\(subset_weights\) - 1 = 2 integer epochs, got \[10\]"),
        ({"curriculum_epoch": 4, "stage_epochs": [4, 8]}, r"increasing and after the curriculum starts \(epoch 5\)"),
        ({"stage_epochs": [12, 11]}, r"increasing"),
        ({"subset_weights": [1.0, -0.5]}, r"finite weights >= 0, got \[1.0, -0.5\]"),
        ({"curriculum_epoch": -1}, r"curriculum_epoch must be an integer >= 0, got -1"),
        ({"subsets": torch.tensor([0, 3])}, r"subsets must be in \[0, 3\), got min 0 and max 3"),
        ({"cutoff_percentile": 120}, r"got 120"),
    ],
)
def test_callback_arguments_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurriculumCallback(**kwargs)


# -- the callback -----------------------------------------------------------------------------------


def test_subsets_are_computed_from_the_model_at_the_curriculum_epoch() -> None:
    dataset = toy_dataset(n=24)
    callback = CurriculumCallback(curriculum_epoch=0, stage_epochs=[2, 3])
    model = PlainClassifier()
    trainer(max_epochs=1, callbacks=[callback]).fit(model, toy_loader(dataset, shuffle=True))
    assert callback.ready and model.training
    with torch.no_grad():
        logits = model(torch.stack([dataset[i][0] for i in range(24)]))
        expected = density_curriculum(logits, dataset.noisy_labels, NUM_CLASSES)
    assert torch.equal(callback.subsets.values, expected)
    # before the curriculum starts nothing is weighted; from the next epoch on only subset 0 is active
    assert callback.sample_weights(0) is None
    assert torch.equal(callback.sample_weights(1), (expected == 0).float())
    assert torch.equal(callback.sample_weights(3), torch.tensor([1.0, 0.5, 0.5])[expected])
    assert "curriculum/clean_precision_easy" in model.trainer.callback_metrics
    assert "curriculum/active_fraction" not in model.trainer.callback_metrics  # epoch 0 trained on all data


class RankCheckedCurriculum(CurriculumCallback):
    """Asserts on each rank which rows its feature pass ran and that the subsets equal one process's."""

    def __init__(self, rows_per_rank: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows_per_rank = rows_per_rank

    def _compute_subsets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows: list[int] = []
        self.feature_fn = lambda module, x: (rows.append(int(x.shape[0])), default_features(module, x))[1]
        super()._compute_subsets(trainer, pl_module)
        assert trainer.world_size == 2 and sum(rows) == self.rows_per_rank[trainer.global_rank], rows
        dataset = trainer.train_dataloader.dataset
        with torch.no_grad():  # every sample's features, computed by this rank alone
            pl_module.eval()
            features = pl_module(torch.stack([dataset[i][0] for i in range(len(dataset))]))
            pl_module.train()
        expected = density_curriculum(features, dataset.noisy_labels, NUM_CLASSES)
        assert torch.equal(self.subsets.values, expected)
        gathered = trainer.strategy.all_gather(self.subsets.values)
        assert torch.equal(gathered[0], gathered[1]), "the subsets differ between ranks"
        self.__dict__["checked"] = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.__dict__.get("checked"), "no feature pass ran"


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("feature_batch_size", "rows_per_rank"),
    # 30 samples in batches of 4: rank 0 runs batches 0, 2, 4, 6 and rank 1 batches 1, 3, 5, 7 (the last of 2);
    # one batch of 30: rank 0 runs it and rank 1, which has none, runs it too to learn the feature size
    [(4, (16, 14)), (64, (30, 30))],
)
def test_feature_pass_is_split_between_two_ranks_and_equals_one_process(
    feature_batch_size: int, rows_per_rank: tuple[int, int]
) -> None:
    callback = RankCheckedCurriculum(rows_per_rank, curriculum_epoch=0, stage_epochs=[2, 3],
                                     feature_batch_size=feature_batch_size)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=1, callbacks=[callback]).fit(
        PlainClassifier(), DataLoader(toy_dataset(n=30), batch_size=4, shuffle=True)
    )


def test_inactive_samples_do_not_contribute_to_the_gradient() -> None:
    dataset = toy_dataset(n=24)
    subsets = torch.arange(24) % 3 == 0
    subsets = torch.where(subsets, 2, (torch.arange(24) % 2)).long()  # all three subsets present
    callback = CurriculumCallback(subsets=subsets, stage_epochs=[0, 5])  # subsets 0, 1 active; 2 not yet
    model = PlainClassifier(lr=0.5)
    reference = copy.deepcopy(model.net)
    trainer(max_steps=1, callbacks=[callback]).fit(model, toy_loader(dataset, batch_size=24))

    x = torch.stack([dataset[i][0] for i in range(24)])
    weights = torch.tensor([1.0, 0.5, 0.0])[subsets]
    loss = (weights * F.cross_entropy(reference(x), dataset.noisy_labels, reduction="none")).mean()
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    for a, b in zip(reference.parameters(), model.net.parameters()):
        torch.testing.assert_close(a, b)
    assert model.trainer.callback_metrics["curriculum/active_fraction"] == pytest.approx(16 / 24)
    assert "training_step" not in vars(model)  # the module is left as it was


def test_module_that_does_not_call_itself_is_told_how_to_fix_it() -> None:
    class DictClassifier(PlainClassifier):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    callback = CurriculumCallback(subsets=torch.zeros(24, dtype=torch.long), stage_epochs=[1, 2])
    with pytest.raises(RuntimeError, match=r"self\(x\)"):
        trainer(max_steps=1, callbacks=[callback]).fit(DictClassifier(), toy_loader(toy_dataset(n=24)))


def _resumable_run(tmp_path: Path, max_epochs: int, ckpt: Path | None = None) -> tuple[CurriculumCallback, PlainClassifier]:
    pl.seed_everything(7, verbose=False)
    dataset = toy_dataset(n=30, noisy_every=3)
    loader = DataLoader(dataset, batch_size=8, sampler=EpochShuffleSampler(dataset, seed=1))
    callback = CurriculumCallback(curriculum_epoch=1, stage_epochs=[3, 4])
    model = PlainClassifier(lr=0.5)
    trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path).fit(
        model, loader, ckpt_path=None if ckpt is None else str(ckpt)
    )
    return callback, model


def test_resume_from_epoch_boundary_matches_uninterrupted_run(tmp_path: Path) -> None:
    full_callback, full_model = _resumable_run(tmp_path / "full", max_epochs=4)
    first_callback, first_model = _resumable_run(tmp_path / "first", max_epochs=2)
    assert torch.equal(first_callback.subsets.values, full_callback.subsets.values)
    ckpt = tmp_path / "epoch2.ckpt"
    first_model.trainer.save_checkpoint(ckpt)
    resumed_callback, resumed_model = _resumable_run(tmp_path / "resumed", max_epochs=4, ckpt=ckpt)
    assert resumed_callback.ready
    assert torch.equal(resumed_callback.subsets.values, full_callback.subsets.values)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_state_dict_round_trip() -> None:
    dataset = toy_dataset(n=24)
    callback = CurriculumCallback(curriculum_epoch=0, stage_epochs=[1, 2])
    trainer(max_epochs=1, callbacks=[callback]).fit(PlainClassifier(), toy_loader(dataset))
    state = callback.state_dict()
    restored = CurriculumCallback(curriculum_epoch=0, stage_epochs=[1, 2])
    restored.load_state_dict(state)
    restored.allocate(None, None, callback.training_labels)  # type: ignore[arg-type]
    restored.load_sample_state_dict(restored._loaded_state)  # type: ignore[arg-type]
    assert restored.ready and torch.equal(restored.subsets.values, callback.subsets.values)
    assert torch.equal(restored.sample_weights(2), callback.sample_weights(2))
