"""LabelCorrectionCallback: update rules, the K-epoch pipeline, DDP, resume parity and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    NUM_CLASSES,
    TABLE,
    N,
    PlainClassifier,
    ScriptedClassifier,
    SpawnDDPStrategy,
    scripted_data,
    toy_dataset,
    trainer,
)
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import LabelCorrectionCallback
from lightning_noisy.data.sampler import EpochShuffleSampler
from lightning_noisy.state.label_rules import hard_labels, soft_labels, top_k_hard_labels, update_labels

# -- the update rules, by hand -------------------------------------------------------------------


def test_soft_rule_is_the_prediction_and_hard_rule_its_argmax() -> None:
    predictions = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert torch.equal(soft_labels(predictions), predictions)
    assert torch.equal(hard_labels(predictions), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_top_k_changes_exactly_the_k_most_disagreeing_labels() -> None:
    labels = F.one_hot(torch.tensor([0, 0, 1, 2, 2]), 3).float()
    predictions = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # agrees
            [0.1, 0.8, 0.1],  # disagrees: gap 0.8 - 0.1 = 0.7
            [0.5, 0.3, 0.2],  # disagrees: gap 0.5 - 0.3 = 0.2
            [0.3, 0.6, 0.1],  # disagrees: gap 0.6 - 0.1 = 0.5
            [0.1, 0.1, 0.8],  # agrees
        ]
    )
    new = top_k_hard_labels(labels, predictions, k=2)
    assert new.argmax(1).tolist() == [0, 1, 1, 1, 2]  # samples 1 (gap .7) and 3 (gap .5) change, 2 does not
    assert int((new.argmax(1) != labels.argmax(1)).sum()) == 2
    # with k larger than the disagreements, only the 3 disagreeing labels change
    assert update_labels(labels, predictions, "hard_topk", top_k=10).argmax(1).tolist() == [0, 1, 0, 1, 2]




def test_soft_labels_are_the_mean_softmax_of_the_last_k_epochs() -> None:
    callback = LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=1)
    model = ScriptedClassifier()
    trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(scripted_data(), batch_size=4, shuffle=True))
    # labels after epoch 2 (0-based): mean of epochs 1 and 2; after epoch 1 they were mean of 0 and 1
    torch.testing.assert_close(callback.labels, (TABLE[1] + TABLE[2]) / 2)
    assert callback.num_updates == 2
    # epoch 2 trained on the labels made at the end of epoch 1
    received = torch.cat(model.received_targets[-3:])  # epoch 2's three batches, shuffled
    ids = torch.cat([x[:, 0].long() for x in model.inputs[-3:]])
    torch.testing.assert_close(received, ((TABLE[0] + TABLE[1]) / 2)[ids])


def test_hard_labels_follow_the_average_argmax_and_frozen_labels_do_not_move() -> None:
    hard = LabelCorrectionCallback(update="hard", num_average_epochs=3, start_epoch=0, key="hard")
    frozen = LabelCorrectionCallback(update="hard", num_average_epochs=3, frozen=True, key="frozen")
    trainer(max_epochs=3, callbacks=[hard, frozen]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=5))
    assert torch.equal(hard.hard_labels, TABLE[:3].mean(0).argmax(1))
    assert torch.equal(frozen.hard_labels, torch.arange(N) % NUM_CLASSES) and frozen.num_updates == 0


def test_running_history_averages_the_paper_window_first_then_moves_by_one_over_k() -> None:
    callback = LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=2, history="running")
    trainer(max_epochs=4, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=5))
    first = (TABLE[1] + TABLE[2]) / 2  # recorded from epoch start - K + 1 = 1: the exact K-epoch mean at epoch 2
    torch.testing.assert_close(callback.labels, first + (TABLE[3] - first) / 2)
    assert callback.num_updates == 2 and callback.state_bytes == N * NUM_CLASSES * 4 * 2 + N * 8 * 2


def test_no_update_before_start_or_after_stop_epoch() -> None:
    callback = LabelCorrectionCallback(update="soft", num_average_epochs=1, start_epoch=1, stop_epoch=2)
    trainer(max_epochs=4, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=5))
    assert callback.num_updates == 1  # only at the end of epoch 1
    torch.testing.assert_close(callback.labels, TABLE[1])


# -- DDP: identical label store on both ranks, every index once per epoch --------------------------


class StoreChecker(LabelCorrectionCallback):
    def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_epoch_boundary(trainer, pl_module)
        gathered = trainer.strategy.all_gather(self.labels)
        assert torch.equal(gathered[0], gathered[1]), "label stores differ between ranks"
        epochs = trainer.current_epoch + 1
        index, _ = self.local_labels()
        sharded = self.state_options.shard_state is not False  # 11 rows in blocks of 6 and 5, or all 11
        assert index.tolist() == (list(range(6)) if trainer.global_rank == 0 else list(range(6, 11))) if sharded else list(range(11))
        assert torch.equal(self._history.visits, torch.full((index.shape[0],), epochs)), self._history.visits
        ids = torch.arange(N + 1) % N  # sample 10 predicts like sample 0
        torch.testing.assert_close(self.labels, TABLE[:epochs, ids].mean(0))


@pytest.mark.ddp
@pytest.mark.parametrize("shard_state", [None, False])
def test_label_store_identical_on_two_ranks_and_covers_every_index_once(shard_state: bool | None) -> None:
    callback = StoreChecker(update="soft", num_average_epochs=3, start_epoch=0, shard_state=shard_state)
    # 11 samples on 2 ranks: DistributedSampler pads with a duplicate index
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[callback]).fit(
        ScriptedClassifier(), DataLoader(scripted_data(N + 1), batch_size=3, shuffle=True)
    )


# -- resume parity ----------------------------------------------------------------------------------


def _resumable_run(tmp_path: Path, max_epochs: int, ckpt: Path | None = None) -> tuple[LabelCorrectionCallback, PlainClassifier]:
    pl.seed_everything(7, verbose=False)
    dataset = toy_dataset(n=30, noisy_every=3)
    loader = DataLoader(dataset, batch_size=8, sampler=EpochShuffleSampler(dataset, seed=1))
    callback = LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=1, prior_weight=0.5,
                                       entropy_weight=0.2)
    model = PlainClassifier(lr=0.5)
    trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path).fit(
        model, loader, ckpt_path=None if ckpt is None else str(ckpt)
    )
    return callback, model


def test_resume_from_epoch_boundary_matches_uninterrupted_run(tmp_path: Path) -> None:
    full_callback, full_model = _resumable_run(tmp_path / "full", max_epochs=4)
    first_callback, first_model = _resumable_run(tmp_path / "first", max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    first_model.trainer.save_checkpoint(ckpt)
    resumed_callback, resumed_model = _resumable_run(tmp_path / "resumed", max_epochs=4, ckpt=ckpt)
    assert resumed_callback.num_updates == full_callback.num_updates == 3
    assert torch.equal(resumed_callback.labels, full_callback.labels)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_of_another_data_set_is_rejected(tmp_path: Path) -> None:
    callback, model = _resumable_run(tmp_path / "a", max_epochs=1)
    ckpt = tmp_path / "a.ckpt"
    model.trainer.save_checkpoint(ckpt)
    other = DataLoader(toy_dataset(n=12), batch_size=4)
    with pytest.raises(ValueError, match="num_samples=30 .* into a buffer with num_samples=12"):
        trainer(max_epochs=2, callbacks=[LabelCorrectionCallback(start_epoch=0)]).fit(
            PlainClassifier(), other, ckpt_path=str(ckpt))


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_average_epochs": 0}, "num_average_epochs must be >= 1, got 0"),
        ({"start_epoch": 5, "stop_epoch": 3}, "stop_epoch must be an integer after start_epoch=5, got 3"),
        ({"start_epoch": "soon"}, "start_epoch must be an integer >= 0 or 'auto', got 'soon'"),
        ({"start_epoch": -1}, "start_epoch must be an integer >= 0 or 'auto', got -1"),
        ({"stop_epoch": 0}, "stop_epoch must be an integer after start_epoch='auto', got 0"),
        ({"collapse_entropy": 1.5}, r"collapse_entropy must be in \(0, 1\] \(a share of ln C\) or None, got 1.5"),
        ({"max_skipped_epochs": 0}, "max_skipped_epochs must be an integer >= 1, got 0"),
        ({"onset_patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"prior_weight": -0.1}, "prior_weight must be >= 0, got -0.1"),
        ({"entropy_weight": -1.0}, "entropy_weight must be >= 0, got -1.0"),
        ({"update": "median"}, "update must be one of .* got 'median'"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"history": "window"}, "history must be 'ring' or 'running', got 'window'"),
        ({"fetch_window": 0}, "fetch_window must be an integer >= 1, got 0"),
        ({"prior": [0.5, 0.6]}, "prior must be a list of non-negative class probabilities summing to 1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelCorrectionCallback(**kwargs)


def test_module_without_logits_is_rejected_on_the_first_batch() -> None:
    with pytest.raises(RuntimeError, match="could not find the logits"):
        trainer(callbacks=[LabelCorrectionCallback()]).fit(
            PlainClassifier(call_self=False), DataLoader(toy_dataset(n=8), batch_size=4)
        )


def test_prior_and_entropy_terms_reach_the_gradient_of_an_unmodified_module() -> None:
    from lightning_noisy.losses import entropy_loss, prior_loss

    dataset = toy_dataset(n=8)
    torch.manual_seed(0)
    model = PlainClassifier(lr=1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LabelCorrectionCallback(prior_weight=1.2, entropy_weight=0.8)
    trainer(callbacks=[callback]).fit(model, DataLoader(dataset, batch_size=8))
    reference = PlainClassifier()
    reference.load_state_dict(start)
    x = torch.stack([dataset[i][0] for i in range(8)])
    logits = reference.net(x)
    # one SGD step (lr 1) on the paper's L = L_c + alpha L_p + beta L_e, by hand
    loss = F.cross_entropy(logits, dataset.noisy_labels) + 1.2 * prior_loss(logits) + 0.8 * entropy_loss(logits)
    loss.backward()
    for name, param in reference.net.named_parameters():
        torch.testing.assert_close(model.net.get_parameter(name), param.detach() - param.grad)


def test_saved_labels_feed_step_two_through_a_file(tmp_path: Path) -> None:
    from lightning_noisy.data import MNIST1DDataModule, load_noisy_labels

    callback = LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=0)
    trainer(max_epochs=2, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=5))
    path = callback.save_labels(tmp_path / "corrected.pt")
    loaded = load_noisy_labels(path, NUM_CLASSES)
    assert torch.equal(loaded.labels, callback.hard_labels)
    assert torch.equal(loaded.clean_labels, torch.arange(N) % NUM_CLASSES)
    assert torch.equal(torch.load(path)["soft_labels"], callback.labels)
    # a DataModule of another class count refuses them rather than misreading them
    data = MNIST1DDataModule(num_samples=N * 10, train_split=0.1, noise_type="file", noise_file=str(path))
    with pytest.raises(ValueError, match="num_classes=10 disagrees with the 3 classes stored"):
        data.setup("fit")


@pytest.mark.parametrize(("storage", "tolerance"), [({"storage_dtype": "bfloat16"}, 2.0**-8), ({"storage_topk": 2}, None)])
def test_compact_storage_serves_distributions_close_to_float32(storage: dict[str, Any], tolerance: float | None) -> None:
    """bfloat16 rows are within its rounding of the float32 labels; top-2 rows keep the two largest, renormalised."""
    runs = {}
    for name, options in (("dense", {}), ("compact", storage)):
        model = ScriptedClassifier()
        callback = LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=1, **options)
        trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(scripted_data(), batch_size=5))
        runs[name] = (callback.labels, torch.cat(model.received_targets[-2:]))
    dense, compact = runs["dense"][0], runs["compact"][0]
    torch.testing.assert_close(compact.sum(1), torch.ones(N))  # served as distributions
    torch.testing.assert_close(runs["compact"][1].sum(1), torch.ones(N))
    if tolerance is not None:  # rounding to bfloat16, then renormalising: a few units of 2^-8 at most
        assert bool(((compact - dense).abs() <= 4 * tolerance * dense + 1e-6).all())
    else:  # each epoch's prediction is kept as its top 2, their K = 2 mean's top 2 is the label
        def top2(rows: torch.Tensor) -> torch.Tensor:
            best = rows.topk(2, dim=1)
            return torch.zeros_like(rows).scatter_(1, best.indices, best.values / best.values.sum(1, keepdim=True))

        torch.testing.assert_close(compact, top2((top2(TABLE[1]) + top2(TABLE[2])) / 2))
