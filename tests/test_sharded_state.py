"""Sharded per-sample state: layouts, compact storage, all-to-all movement, and sharded == replicated fits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import NUM_CLASSES, PlainClassifier, SpawnDDPStrategy, SpawnShardedStateStrategy, toy_dataset, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from lightning_noisy.callbacks import AUMCallback, LabelCorrectionCallback, NoisyLabelMonitor
from lightning_noisy.data import EpochShuffleSampler, ResumableDataLoader
from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, SampleRunningMean
from lightning_noisy.state.records import reduce_parts
from lightning_noisy.state import checkpoint as row_checkpoint
from lightning_noisy.state.checkpoint import LocalRows, is_placeholder, read_local_rows, split_local_rows
from lightning_noisy.state.exchange import fetch_rows, gather_to_rank_zero
from lightning_noisy.state.fetch import RowFetcher
from lightning_noisy.state.label_rules import disagreement, most_disagreeing, top_k_hard_labels
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.sharded import gather_rows, state_on_rank_zero
from lightning_noisy.state.storage import RowCodec, RowStore, StateOptions, dense_rows, top_k_rows

# -- layout ------------------------------------------------------------------------------------------


def test_layout_blocks_follow_tensor_split_and_owner_finds_them() -> None:
    layouts = [RowLayout(10, 3, r) for r in range(3)]
    assert [(lay.start, lay.stop) for lay in layouts] == [(0, 4), (4, 7), (7, 10)]
    assert [lay.num_rows for lay in layouts] == [len(p) for p in torch.tensor_split(torch.arange(10), 3)]
    assert layouts[2].block_sizes == [4, 3, 3]
    assert layouts[0].offsets.tolist() == [0, 4, 7, 10]
    assert layouts[1].owner(torch.tensor([0, 3, 4, 6, 7, 9])).tolist() == [0, 0, 1, 1, 2, 2]
    assert RowLayout(2, 4, 3).num_rows == 0 and RowLayout(2, 4, 1).block(1) == (1, 2)  # more ranks than rows
    assert not RowLayout(5).is_sharded and RowLayout(5, 2, 0).is_sharded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"num_samples": 4, "world_size": True}, "world_size must be an integer >= 1, got True"),
        ({"num_samples": 4, "world_size": 2, "rank": 2}, r"rank must be an integer in \[0, 2\), got 2"),
    ],
)
def test_layout_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RowLayout(**kwargs)


# -- compact storage ---------------------------------------------------------------------------------


def test_top_k_row_keeps_the_k_largest_renormalised_by_hand() -> None:
    row = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    top, classes = top_k_rows(row, 2)
    assert classes.tolist() == [[1, 3]]
    torch.testing.assert_close(top, torch.tensor([[0.625, 0.375]]))  # 0.5 / 0.8 and 0.3 / 0.8
    torch.testing.assert_close(dense_rows(top, classes, 4), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    store = RowStore(1, (4,), torch.float32, topk=2, fill=row)
    torch.testing.assert_close(store.read(), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    assert store.parts()["classes"].dtype == torch.int16 and store.nbytes == 2 * 4 + 2 * 2 == store.codec.row_bytes()


def test_top_k_storage_is_exact_for_one_hot_rows() -> None:
    labels = torch.tensor([2, 0, 1, 2])
    store = RowStore(4, (3,), torch.bfloat16, topk=1, fill=lambda rows: F.one_hot(labels[rows], 3))
    assert torch.equal(store.read(), F.one_hot(labels, 3).float())


@pytest.mark.parametrize(("dtype", "bits"), [(torch.bfloat16, 8), (torch.float16, 11), (torch.float32, 24)])
def test_low_precision_rows_are_within_their_dtype_rounding(dtype: torch.dtype, bits: int) -> None:
    values = torch.softmax(torch.randn(500, 7, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    stored = RowStore(500, (7,), dtype, fill=values).read()
    # round to nearest: at most half a unit in the last place, 2^-bits of the value; below the smallest normal
    # number the spacing is fixed (float16's subnormals), half of it is smallest_normal * 2^-bits
    bound = values.abs() * 2.0**-bits + torch.finfo(dtype).smallest_normal * 2.0**-bits
    assert bool(((stored - values).abs() <= bound).all())
    assert stored.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"storage_topk": 0}, "storage_topk must be None .* or an integer >= 1, got 0"),
        ({"storage_topk": True}, "storage_topk must be None .* got True"),
        ({"storage_topk": 2.5}, "storage_topk must be None .* got 2.5"),
        ({"storage_dtype": "float64"}, r"storage_dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'"),
        ({"shard_state": "yes"}, "shard_state must be True, False or None .* got 'yes'"),
    ],
)
def test_state_options_reject_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StateOptions(**kwargs)
    with pytest.raises(ValueError, match=message):
        LabelCorrectionCallback(**kwargs)


def test_top_k_as_large_as_the_classes_is_refused_before_training_changes_anything() -> None:
    callback = LabelCorrectionCallback(storage_topk=NUM_CLASSES)
    model = PlainClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="storage_topk must be smaller than the number of classes C=3 .* got 3"):
        trainer(callbacks=[callback]).fit(model, DataLoader(toy_dataset(n=8), batch_size=4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert StateOptions().sharded(2) and not StateOptions().sharded(1) and not StateOptions(False).sharded(4)


def test_top_k_records_reduce_only_their_duplicates_by_hand() -> None:
    codec = RowCodec((4,), torch.float32, topk=2)
    recorder = SampleRecorder((4,), topk=2)
    recorder.add(torch.tensor([5, 2]), torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.0, 0.2, 0.1]]))
    recorder.add(torch.tensor([5]), torch.tensor([[0.0, 0.2, 0.0, 0.8]]))
    index, parts, counts = recorder.gather_parts(reduction="mean")
    assert index.tolist() == [2, 5] and counts.tolist() == [2 - 1, 2]
    # sample 2 once: its top-2 (0.7, 0.2) renormalised, as recorded; sample 5 twice: the mean of its two
    # top-2 records (0.6, 0.2)/0.8 and (0.8, 0.2)/1.0 is [0, 0.475, 0.125, 0.4], whose top-2 renormalised is
    # 0.475 / 0.875 and 0.4 / 0.875
    torch.testing.assert_close(codec.decode(parts), torch.tensor(
        [[0.7 / 0.9, 0.0, 0.2 / 0.9, 0.0], [0.0, 0.475 / 0.875, 0.0, 0.4 / 0.875]]))
    assert reduce_parts(torch.tensor([1]), codec.encode(torch.tensor([[0.5, 0.25, 0.25, 0.0]])), codec)[0].tolist() == [1]


def test_running_mean_is_exact_for_the_first_window_then_moves_by_one_over_window() -> None:
    running = SampleRunningMean(3, window=2, value_shape=(1,))
    running.append(torch.tensor([0, 1]), torch.tensor([[1.0], [10.0]]))
    running.append(torch.tensor([0]), torch.tensor([[3.0]]))
    assert running.mean().squeeze(1).tolist() == [2.0, 10.0, 0.0]  # exact means of the first values
    running.append(torch.tensor([0, 1]), torch.tensor([[6.0], [20.0]]))
    assert running.mean().squeeze(1).tolist() == [2.0 + (6.0 - 2.0) / 2, 15.0, 0.0]
    assert running.visits.tolist() == [3, 2, 0] and running.nbytes == 3 * 4 + 3 * 8
    ring = SampleHistory(3, window=2, value_shape=(1,))
    with pytest.raises(ValueError, match="cannot load a running mean .* into a ring"):
        ring.load_state_dict(running.state_dict())
    restored = SampleRunningMean(3, window=2, value_shape=(1,), layout=RowLayout(3, 2, 0))  # rows [0, 2)
    restored.load_state_dict(running.state_dict())
    assert restored.mean().squeeze(1).tolist() == [4.0, 15.0] and restored.visits.tolist() == [3, 2]


# -- blocks and resharding from a checkpoint state ------------------------------------------------


def _table(n: int = 10, c: int = 3) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(1)), dim=1)


def test_a_block_refuses_other_rows_and_loads_its_rows_from_a_whole_table() -> None:
    whole = SampleBuffer(10, (3,), fill=_table())
    whole.write(torch.tensor([2, 5]), torch.zeros(2, 3))
    block = SampleBuffer(10, (3,), layout=RowLayout(10, 3, 1), fill=0.5)  # rows [4, 7)
    with pytest.raises(ValueError, match=r"must be in this rank's rows \[4, 7\), got min 3 and max 4"):
        block.write(torch.tensor([3, 4]), torch.zeros(2, 3))
    block.load_state_dict(whole.state_dict())
    assert torch.equal(block.values, whole.values[4:7]) and block.visits.tolist() == [0, 1, 0]
    assert torch.equal(block.read(torch.tensor([6, 4])), whole.values[[6, 4]])
    # a block's own state covers only its rows: another block cannot load it, and nothing changes
    other = SampleBuffer(10, (3,), layout=RowLayout(10, 3, 2), fill=0.25)
    with pytest.raises(ValueError, match=r"holds rows \[4, 7\), which do not cover this rank's rows \[7, 10\)"):
        other.load_state_dict(block.state_dict())
    assert bool((other.values == 0.25).all())


def test_history_block_loads_from_a_whole_ring_and_storage_must_match() -> None:
    whole = SampleHistory(6, window=2, value_shape=(3,))
    for epoch in range(3):
        whole.append(torch.arange(6), _table(6) * (epoch + 1))
    block = SampleHistory(6, window=2, value_shape=(3,), layout=RowLayout(6, 2, 1))
    block.load_state_dict(whole.state_dict())
    assert torch.equal(block.mean(), whole.mean()[3:]) and block.visits.tolist() == [3, 3, 3]
    compact = SampleHistory(6, window=2, value_shape=(3,), dtype=torch.bfloat16, topk=2)
    with pytest.raises(ValueError, match="stored as .*'bfloat16', 'storage_topk': 2.* into a buffer stored as .*'float32'"):
        whole.load_state_dict(compact.state_dict())


def test_block_top_k_selection_equals_the_whole_table() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = F.one_hot(torch.randint(0, 4, (50,), generator=generator), 4).float()
    predictions = torch.softmax(torch.randn(50, 4, generator=generator), 1)
    predictions[10] = predictions[11] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a tie
    labels[10] = labels[11] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    expected = top_k_hard_labels(labels, predictions, 7)
    candidates = []
    for block in torch.tensor_split(torch.arange(50), 3):
        gap, _ = disagreement(labels[block], predictions[block])
        chosen = most_disagreeing(gap, block, 7)
        candidates.append((disagreement(labels[chosen], predictions[chosen])[0], chosen))
    chosen = most_disagreeing(torch.cat([g for g, _ in candidates]), torch.cat([i for _, i in candidates]), 7)
    changed = (expected != labels).any(1).nonzero().flatten()
    assert sorted(chosen.tolist()) == changed.tolist() and len(changed) == 7


def test_fetcher_of_a_replicated_buffer_reads_its_rows() -> None:
    buffer = SampleBuffer(10, (3,), fill=_table())
    fetcher = RowFetcher(buffer)
    fetcher.start_epoch(None)
    assert torch.equal(fetcher.rows(torch.tensor([7, 1])), _table()[[7, 1]])
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        RowFetcher(buffer, window=0)


# -- all-to-all on 2 and 3 gloo processes --------------------------------------------------------------

N, C = 23, 4


def _epoch_records(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch as DistributedSampler pads it: N rounded up to W's multiple by repeating the first indices."""
    generator = torch.Generator().manual_seed(world_size)
    order = torch.randperm(N, generator=generator)
    padded = -(-N // world_size) * world_size
    index = torch.cat([order, order[: padded - N]])
    return index, torch.softmax(torch.randn(index.shape[0], C, generator=generator) * 2, 1)


def _check_movements(rank: int, world_size: int) -> None:
    index, values = _epoch_records(world_size)
    layout = RowLayout(N, world_size, rank)
    start, stop = layout.block(rank)
    for reduction in ("mean", "first", "max"):
        replicated, sharded = SampleRecorder((C,)), SampleRecorder((C,), round_bytes=5 * C * 4)  # 5 records a round
        for recorder in (replicated, sharded):
            mine_index, mine_values = index[rank::world_size], values[rank::world_size]
            for begin in range(0, mine_index.shape[0], 3):  # batches of 3
                recorder.add(mine_index[begin : begin + 3], mine_values[begin : begin + 3])
        all_index, all_values, all_counts = replicated.gather(reduction=reduction)
        got_index, got_values, got_counts = sharded.gather(reduction=reduction, layout=layout)
        in_block = (all_index >= start) & (all_index < stop)
        assert torch.equal(got_index, all_index[in_block]), f"rank {rank}: other rows than its block"
        assert torch.equal(got_values, all_values[in_block]), f"rank {rank}: {reduction} differs from replicated"
        assert torch.equal(got_counts, all_counts[in_block])
    for codec in (RowCodec((C,), torch.bfloat16), RowCodec((C,), torch.float32, 2)):  # compact records, too
        replicated, sharded = (SampleRecorder((C,), codec.dtype, codec.topk, round_bytes=b) for b in (1 << 20, 64))
        for recorder in (replicated, sharded):
            recorder.add(index[rank::world_size], values[rank::world_size])
        all_index, all_parts, _ = replicated.gather_parts()
        got_index, got_parts, _ = sharded.gather_parts(layout=layout)
        in_block = (all_index >= start) & (all_index < stop)
        assert torch.equal(got_index, all_index[in_block])
        assert all(torch.equal(got_parts[k], all_parts[k][in_block]) for k in all_parts), f"{codec} differs"
    # row fetch: dense float32 and bfloat16 top-2 blocks answer arbitrary requests with their stored rows
    table = torch.softmax(torch.randn(N, C, generator=torch.Generator().manual_seed(9)), 1)
    for dtype, topk in ((torch.float32, None), (torch.bfloat16, 2)):
        whole = SampleBuffer(N, (C,), dtype, fill=table, topk=topk)
        block = SampleBuffer(N, (C,), dtype, fill=lambda i: table[i], layout=layout, topk=topk)
        wanted = torch.randint(0, N, (7 + rank,), generator=torch.Generator().manual_seed(rank))
        parts = fetch_rows(wanted, layout, block.read_parts)
        assert torch.equal(block.store.decode(parts), whole.read(wanted))
        assert torch.equal(gather_rows(block), whole.values)
        state = state_on_rank_zero(block)
        if rank == 0:
            assert (state["start"], state["stop"]) == (0, N)
            for key, value in whole.state_dict().items():
                assert torch.equal(state[key], value) if isinstance(value, torch.Tensor) else state[key] == value, key
        else:
            assert (state["start"], state["stop"]) == (start, stop)
    # W - 1 rows on W ranks: the last rank's block is empty and sends nothing
    few = RowLayout(world_size - 1, world_size, rank)
    mine = torch.arange(few.start, few.stop, dtype=torch.int16)[:, None].repeat(1, 2)
    gathered = gather_to_rank_zero(mine, few)
    assert torch.equal(gathered, torch.arange(world_size - 1, dtype=torch.int16)[:, None].repeat(1, 2)) if rank == 0 else gathered is None


@pytest.mark.ddp
@pytest.mark.parametrize("world_size", [2, 3])
def test_records_rows_and_checkpoint_blocks_move_exactly(world_size: int) -> None:
    run_distributed(_check_movements, world_size=world_size)


# -- Lightning DDP: sharded and replicated fits agree bit for bit ------------------------------------


class RotatingSampler(Sampler[int]):
    """A custom order, ``arange(n)`` rotated by ``5 * epoch`` (Lightning wraps it for DDP)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.arange(self.n).roll(5 * self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


class LabelsToFile(LabelCorrectionCallback):
    """Writes the whole label table (gathered on every rank) when training starts and ends, from rank 0."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = str(out)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        restored = self.labels  # a collective when sharded
        if trainer.is_global_zero:
            torch.save(restored, self.out + ".start")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        assert self._fetcher is not None
        self.planned = self._fetcher.planned

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        labels, held = self.labels, self.local_labels()[0]
        monitor = next(c for c in trainer.callbacks if isinstance(c, NoisyLabelMonitor))
        losses, predictions = gather_rows(monitor.losses), gather_rows(monitor.predictions)  # collectives
        aum_callback = next((c for c in trainer.callbacks if isinstance(c, AUMCallback)), None)
        aum = None if aum_callback is None else aum_callback.aum
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("noisy/")}
            torch.save({"labels": labels, "weights": pl_module.state_dict(), "updates": self.num_updates,
                        "rows_held": held.shape[0], "planned": self.planned, "monitor_rows_held": monitor.losses.values.shape[0],
                        "losses": losses, "predictions": predictions, "aum": aum, "metrics": metrics}, self.out)


def _fit(out: Path, devices: int, shard_state: bool | None, max_epochs: int = 4, sampler: str = "distributed",
         drop_last: bool = False, ckpt: Path | None = None, checkpoints: Path | None = None,
         local_rows: bool = False, keep: int = 0, **options: Any) -> dict[str, Any]:
    pl.seed_everything(3, verbose=False)
    dataset = toy_dataset(n=29, noisy_every=4)
    if sampler == "distributed":  # Lightning puts a DistributedSampler in: rows fetched a window ahead
        loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=drop_last)
    else:  # a custom sampler, wrapped by Lightning: rows fetched batch by batch
        loader = DataLoader(dataset, batch_size=4, sampler=RotatingSampler(29), drop_last=drop_last)
    options = {"update": "soft", "num_average_epochs": 2, "start_epoch": 1, "prior_weight": 0.5,
               "entropy_weight": 0.2, "fetch_window": 2, **options}
    callbacks: list[pl.Callback] = [LabelsToFile(out, shard_state=shard_state, **options),
                                    NoisyLabelMonitor(shard_state=shard_state, histogram=False)]
    if options["update"] != "soft":  # AUM's margins need hard targets
        callbacks.append(AUMCallback(threshold_samples=False, shard_state=shard_state, histogram=False))
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=keep))
    strategy = (SpawnShardedStateStrategy() if local_rows else SpawnDDPStrategy()) if devices > 1 else "auto"
    trainer(devices=devices, strategy=strategy, max_epochs=max_epochs, callbacks=callbacks,
            enable_checkpointing=checkpoints is not None).fit(
        PlainClassifier(lr=0.5), loader, ckpt_path=None if ckpt is None else str(ckpt)
    )
    return torch.load(out)


def _assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["labels"], b["labels"]), "labels differ"
    assert torch.equal(a["losses"], b["losses"]) and torch.equal(a["predictions"], b["predictions"]), "monitor"
    if a["aum"] is not None:
        torch.testing.assert_close(a["aum"], b["aum"], rtol=0, atol=0, equal_nan=True)  # bit for bit
    assert a["metrics"] == b["metrics"] and "noisy/recovery_acc" in a["metrics"] and "noisy/train_pred_acc" in a["metrics"]
    assert a["updates"] == b["updates"] > 0
    for name, value in a["weights"].items():
        assert torch.equal(value, b["weights"][name]), name


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("devices", "case"),
    [
        (2, {}),  # window fetch; 29 rows in blocks of 15 and 14
        (2, {"sampler": "custom", "drop_last": True, "update": "hard", "storage_dtype": "bfloat16", "storage_topk": 2}),
        (3, {"drop_last": True, "update": "hard_topk", "top_k": 3, "history": "running"}),  # blocks of 10, 10, 9
    ],
    ids=["2-ranks-soft", "2-ranks-custom-sampler-drop-last-bf16-top2-hard", "3-ranks-drop-last-hard-topk-running"],
)
def test_sharded_fit_equals_replicated_fit(tmp_path: Path, devices: int, case: dict[str, Any]) -> None:
    sharded = _fit(tmp_path / "sharded.pt", devices, None, **case)
    replicated = _fit(tmp_path / "replicated.pt", devices, False, **case)
    assert sharded["rows_held"] == sharded["monitor_rows_held"] == -(-29 // devices)  # rank 0's rows
    assert replicated["rows_held"] == replicated["monitor_rows_held"] == 29
    assert sharded["planned"] == (case.get("sampler", "distributed") == "distributed")  # window or per-batch fetch
    _assert_same_run(sharded, replicated)
    assert not torch.equal(sharded["labels"], F.one_hot(toy_dataset(n=29, noisy_every=4).noisy_labels, 3).float())


@pytest.mark.ddp
def test_sharded_checkpoints_resume_exactly_and_on_another_world_size(tmp_path: Path) -> None:
    # two ranks, sharded: 2 epochs with a checkpoint, then resumed on 2 ranks to 4 epochs = 4 epochs at once
    first = _fit(tmp_path / "first.pt", 2, None, max_epochs=2, checkpoints=tmp_path / "two")
    state = torch.load(tmp_path / "two" / "last.ckpt", weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("LabelsToFile"))["buffers"]["labels"]
    assert (saved["start"], saved["stop"]) == (0, 29) and torch.equal(saved["data"], first["labels"])  # whole table
    resumed = _fit(tmp_path / "resumed.pt", 2, None, ckpt=tmp_path / "two" / "last.ckpt")
    assert torch.equal(torch.load(str(tmp_path / "resumed.pt") + ".start"), first["labels"])
    _assert_same_run(resumed, _fit(tmp_path / "full.pt", 2, None))
    # saved by 2 sharded ranks, restored by 1 process; saved by 1 process, restored by 2 sharded ranks
    _fit(tmp_path / "one.pt", 1, None, max_epochs=3, ckpt=tmp_path / "two" / "last.ckpt")
    assert torch.equal(torch.load(str(tmp_path / "one.pt") + ".start"), first["labels"])
    single = _fit(tmp_path / "single.pt", 1, None, max_epochs=2, checkpoints=tmp_path / "single")
    _fit(tmp_path / "onto-two.pt", 2, None, max_epochs=3, ckpt=tmp_path / "single" / "last.ckpt")
    assert torch.equal(torch.load(str(tmp_path / "onto-two.pt") + ".start"), single["labels"])


# -- checkpoints through torch.distributed.checkpoint: each rank writes its rows -----------------------------


def test_local_rows_are_chunked_by_dataset_index_and_read_back_for_another_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    monkeypatch.setattr(row_checkpoint, "chunk_rows", lambda shape: 3)  # chunks of 3 rows: [0, 3), [3, 6), ...
    saved = SampleHistory(10, 2, (3,), layout=RowLayout(10))
    saved.append(torch.arange(10), _table())
    saved.append(torch.arange(0, 10, 2), _table()[::2] * 2)
    checkpoint = {"callbacks": {"cb": {"buffers": {"history": LocalRows(saved.state_dict())}, "extra": {"k": 1}}},
                  "epoch": 3}
    out, rows = split_local_rows(checkpoint, "x.ckpt.sample_state", "abc")
    assert isinstance(checkpoint["callbacks"]["cb"]["buffers"]["history"], LocalRows)  # the input is left as it was
    placeholder = out["callbacks"]["cb"]["buffers"]["history"]
    assert is_placeholder(placeholder) and out["epoch"] == 3 and out["callbacks"]["cb"]["extra"] == {"k": 1}
    assert sorted(k for k in rows if k.startswith("rows0.data")) == [
        "rows0.data.0.3", "rows0.data.3.6", "rows0.data.6.9", "rows0.data.9.10"]
    assert torch.equal(rows["rows0.visits.3.6"], saved.visits[3:6]) and rows["nonce"] == "abc"
    dcp.save(rows, storage_writer=dcp.FileSystemWriter(tmp_path / "x.ckpt.sample_state"), no_dist=True)
    # rank 1 of 2 owns rows [5, 10): it reads the chunks from 3 on, and its block loads exactly
    layout = RowLayout(10, 2, 1)
    states = read_local_rows({"history": placeholder}, {"history": layout}, tmp_path / "x.ckpt")
    assert (states["history"]["start"], states["history"]["stop"]) == (3, 10)
    block = SampleHistory(10, 2, (3,), layout=layout)
    block.load_state_dict(states["history"])
    assert torch.equal(block.mean(), saved.mean()[5:]) and torch.equal(block.visits, saved.visits[5:])
    # another save's directory, or none, is refused
    placeholder["sharded_rows"]["nonce"] = "other"
    with pytest.raises(RuntimeError, match="another save"):
        read_local_rows({"history": placeholder}, {"history": layout}, tmp_path / "x.ckpt")
    with pytest.raises(RuntimeError, match="no directory"):
        read_local_rows({"history": placeholder}, {"history": layout}, tmp_path / "moved" / "x.ckpt")
    with pytest.raises(RuntimeError, match="ckpt_path"):
        read_local_rows({"history": placeholder}, {"history": layout}, None)


@pytest.mark.ddp
def test_strategy_writes_each_ranks_rows_and_any_world_size_resumes_them(tmp_path: Path) -> None:
    first = _fit(tmp_path / "first.pt", 2, None, max_epochs=2, checkpoints=tmp_path / "two", local_rows=True, keep=1)
    saved = torch.load(tmp_path / "two" / "last.ckpt", weights_only=False)["callbacks"]
    for name, state in next(v for k, v in saved.items() if k.startswith("LabelsToFile"))["buffers"].items():
        assert is_placeholder(state), name  # no rows in the file: each rank wrote its own
    assert (tmp_path / "two" / "last.ckpt.sample_state" / ".metadata").is_file()
    # save_top_k=1 removed the first epoch's file and its rows
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "epoch=1-step=8.ckpt", "epoch=1-step=8.ckpt.sample_state", "last.ckpt", "last.ckpt.sample_state"]
    # resumed on 2 ranks, the run continues bit for bit as the run with a gathering checkpoint
    resumed = _fit(tmp_path / "resumed.pt", 2, None, ckpt=tmp_path / "two" / "last.ckpt", local_rows=True)
    assert torch.equal(torch.load(str(tmp_path / "resumed.pt") + ".start"), first["labels"])
    _assert_same_run(resumed, _fit(tmp_path / "full.pt", 2, None))
    # one process and three ranks each read their rows
    _fit(tmp_path / "one.pt", 1, None, max_epochs=3, ckpt=tmp_path / "two" / "last.ckpt")
    assert torch.equal(torch.load(str(tmp_path / "one.pt") + ".start"), first["labels"])
    _fit(tmp_path / "three.pt", 3, None, max_epochs=3, ckpt=tmp_path / "two" / "last.ckpt", local_rows=True)
    assert torch.equal(torch.load(str(tmp_path / "three.pt") + ".start"), first["labels"])
    # the file with another save's rows beside it is refused before anything is restored
    import shutil

    shutil.rmtree(tmp_path / "two" / "last.ckpt.sample_state")
    shutil.copytree(tmp_path / "two" / "epoch=1-step=8.ckpt.sample_state", tmp_path / "two" / "last.ckpt.sample_state")
    with pytest.raises(RuntimeError, match="another save"):
        _fit(tmp_path / "refused.pt", 1, None, max_epochs=3, ckpt=tmp_path / "two" / "last.ckpt")


# -- a run killed mid-epoch resumes from its last checkpoint exactly --------------------------------------


class KillAt(pl.Callback):
    """Raises before the training step ``step``, as a preempted job would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed before step {self.step}")


def _fit_resumable(out: Path, devices: int, local_rows: bool = False, every: int | None = None,
                   kill: int | None = None, ckpt: Path | None = None) -> dict[str, Any] | None:
    pl.seed_everything(3, verbose=False)
    dataset = toy_dataset(n=29, noisy_every=4)
    if devices > 1:  # Lightning puts in a DistributedSampler: its order is a function of (seed, epoch)
        loader = ResumableDataLoader(dataset, batch_size=4, shuffle=True)
    else:
        loader = ResumableDataLoader(dataset, batch_size=4, sampler=EpochShuffleSampler(dataset, seed=1))
    callbacks: list[pl.Callback] = [
        LabelsToFile(out, update="hard", num_average_epochs=2, start_epoch=1, fetch_window=2),
        NoisyLabelMonitor(histogram=False), AUMCallback(threshold_samples=False, histogram=False),
    ]
    if every is not None:
        callbacks.append(ModelCheckpoint(dirpath=out.parent / "mid", every_n_train_steps=every, save_top_k=-1))
    if kill is not None:
        callbacks.append(KillAt(kill))
    strategy = (SpawnShardedStateStrategy() if local_rows else SpawnDDPStrategy()) if devices > 1 else "auto"
    fit = trainer(devices=devices, strategy=strategy, max_epochs=3, callbacks=callbacks, enable_checkpointing=every is not None)
    try:
        fit.fit(PlainClassifier(lr=0.5), loader, ckpt_path=None if ckpt is None else str(ckpt))
    except Exception as error:  # noqa: BLE001 - the kill, raised in the worker processes
        assert kill is not None and "killed before step" in str(error), error
        return None
    return torch.load(out)


@pytest.mark.ddp
@pytest.mark.parametrize(("devices", "local_rows"), [(1, False), (2, False), (2, True)],
                         ids=["one-process", "2-ranks-gathered", "2-ranks-dcp"])
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_exactly(tmp_path: Path, devices: int, local_rows: bool) -> None:
    # one process: 8 batches an epoch; two ranks: 4 per rank. The checkpoint is taken in epoch 1 (records kept)
    every = 10 if devices == 1 else 6
    full = _fit_resumable(tmp_path / "full.pt", devices)
    assert _fit_resumable(tmp_path / "killed.pt", devices, local_rows, every=every, kill=every + 1) is None
    (ckpt,) = (tmp_path / "mid").glob(f"epoch=1-step={every}.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches": every - (8 if devices == 1 else 4)}]
    in_flight = next(v for k, v in saved["callbacks"].items() if k.startswith("LabelsToFile"))["in_flight"]
    if local_rows:
        assert set(in_flight) == {"sharded_records"}  # each rank wrote its own records beside the file
    else:
        assert len(in_flight["ranks"]) == devices and all(r["predictions__index"].numel() > 0 for r in in_flight["ranks"])
    resumed = _fit_resumable(tmp_path / "resumed.pt", devices, local_rows, ckpt=ckpt)
    assert full is not None and resumed is not None
    _assert_same_run(resumed, full)
