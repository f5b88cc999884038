"""The per-sample state engine: reduction of duplicate records, buffers, history, checkpoint state."""

import pytest
import torch

from lightning_noisy.state import SampleBuffer, SampleHistory, SampleRecorder, reduce_by_index


def test_reduce_by_index_mean_first_last_max_min() -> None:
    index = torch.tensor([3, 1, 3, 0, 1])
    values = torch.tensor([1.0, 10.0, 5.0, 7.0, 20.0])
    for reduction, expected in {
        "mean": [7.0, 15.0, 3.0],
        "sum": [7.0, 30.0, 6.0],
        "first": [7.0, 10.0, 1.0],
        "last": [7.0, 20.0, 5.0],
        "max": [7.0, 20.0, 5.0],
        "min": [7.0, 10.0, 1.0],
    }.items():
        unique, reduced, counts = reduce_by_index(index, values, reduction)
        assert unique.tolist() == [0, 1, 3]
        assert counts.tolist() == [1, 2, 2]
        assert reduced.tolist() == expected, reduction


def test_reduce_by_index_vector_values_and_integer_values() -> None:
    index = torch.tensor([2, 2, 0])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]])
    unique, reduced, _ = reduce_by_index(index, values, "mean")
    assert unique.tolist() == [0, 2]
    assert torch.equal(reduced, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    _, first, _ = reduce_by_index(index, torch.tensor([4, 9, 1]), "first")
    assert first.tolist() == [1, 4]


def test_mean_of_duplicates_does_not_depend_on_arrival_order() -> None:
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 50, (400,), generator=generator)
    values = torch.randn(400, 3, generator=generator)
    perm = torch.randperm(400, generator=generator)
    _, a, _ = reduce_by_index(index, values, "mean")
    _, b, _ = reduce_by_index(index[perm], values[perm], "mean")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # only float32 rounding may differ


def test_reduce_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="reduction must be one of .* got 'median'"):
        reduce_by_index(torch.tensor([0]), torch.tensor([1.0]), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got index \(2,\) and values \(3,\)"):
        reduce_by_index(torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))


def test_recorder_gathers_locally_and_clears() -> None:
    recorder = SampleRecorder((2,))
    recorder.add(torch.tensor([4, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    recorder.add(torch.tensor([4]), torch.tensor([[3.0, 0.0]]))
    assert len(recorder) == 3
    index, values, counts = recorder.gather()
    assert index.tolist() == [1, 4] and counts.tolist() == [1, 2]
    assert values.tolist() == [[3.0, 4.0], [2.0, 1.0]]
    assert len(recorder) == 0
    index, values, _ = recorder.gather()  # nothing recorded: empty but well-shaped
    assert index.shape == (0,) and values.shape == (0, 2)


def test_recorder_rejects_wrong_value_shape() -> None:
    recorder = SampleRecorder((3,))
    with pytest.raises(ValueError, match=r"expected index \[B\] and values \[B, 3\], got index \(2,\) and values \(2, 4\)"):
        recorder.add(torch.tensor([0, 1]), torch.zeros(2, 4))
    assert len(recorder) == 0


def _records(rows: int, width: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(index [4], values [4, width])`` with repeated indices, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (4,), generator=generator), torch.randn(4, width, generator=generator))
            for _ in range(rows)]


@pytest.mark.parametrize("topk", [None, 2])
def test_recorder_holding_records_gathers_what_storing_each_at_once_gathers(topk: int | None) -> None:
    records = _records(9, 5, seed=0)
    at_once = SampleRecorder((5,), topk=topk, hold_bytes=0)  # every record stored when added
    held = SampleRecorder((5,), topk=topk, hold_bytes=3 * 4 * 5 * 4)  # stored every third batch, and at the gather
    for index, values in records:
        at_once.add(index, values)
        held.add(index, values)
        assert len(held) == len(at_once)
    for reduction in ("mean", "first", "last"):
        a, b = SampleRecorder((5,), topk=topk, hold_bytes=0), SampleRecorder((5,), topk=topk)
        for index, values in records:
            a.add(index, values)
            b.add(index, values)
        for got, want in zip(b.gather(reduction=reduction), a.gather(reduction=reduction)):
            assert torch.equal(got, want)


def test_recorder_keeps_the_order_of_arrival_across_held_and_stored_records() -> None:
    recorder = SampleRecorder(())
    recorder.add(torch.tensor([3]), torch.tensor([1.0]))  # held
    recorder.add_parts(torch.tensor([3]), {"data": torch.tensor([2.0])})  # stored: the held record goes first
    recorder.add(torch.tensor([3, 5]), torch.tensor([3.0, 4.0]))
    index, parts = recorder.pending()
    assert index.tolist() == [3, 3, 3, 5] and parts["data"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert recorder.gather(reduction="first")[1].tolist() == [1.0, 4.0]
    assert recorder.gather(reduction="last")[0].numel() == 0  # the gather cleared the held records too


def test_recorder_refuses_a_value_changed_in_place_before_it_was_stored() -> None:
    recorder = SampleRecorder(())
    values = torch.tensor([1.0, 2.0])
    recorder.add(torch.tensor([0, 1]), values)
    values.mul_(10.0)  # the caller reuses its tensor: the record held would silently change
    with pytest.raises(RuntimeError, match=r"changed in place before it was stored; pass a copy"):
        recorder.gather()
    recorder.clear()
    recorder.add(torch.tensor([0, 1]), values.clone())
    values.zero_()  # a copy is safe
    assert recorder.gather()[1].tolist() == [10.0, 20.0]


@pytest.mark.parametrize("hold_bytes", [-1, 1.5, True])
def test_recorder_rejects_bad_hold_bytes(hold_bytes: object) -> None:
    with pytest.raises(ValueError, match=rf"hold_bytes must be an integer >= 0, got {hold_bytes!r}"):
        SampleRecorder((), hold_bytes=hold_bytes)  # type: ignore[arg-type]


def test_recorder_clear_drops_the_held_records() -> None:
    recorder = SampleRecorder(())
    recorder.add(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    recorder.clear()
    assert len(recorder) == 0 and recorder.gather()[0].numel() == 0


def test_buffer_writes_counts_visits_and_keeps_unvisited() -> None:
    buffer = SampleBuffer(5, (), fill=-1.0)
    buffer.write(torch.tensor([0, 3]), torch.tensor([2.0, 4.0]))
    buffer.write(torch.tensor([3]), torch.tensor([1.0]), mode="add")
    assert buffer.values.tolist() == [2.0, -1.0, -1.0, 5.0, -1.0]
    assert buffer.visits.tolist() == [1, 0, 0, 2, 0]
    assert buffer.visited.tolist() == [True, False, False, True, False]


@pytest.mark.parametrize(
    ("index", "values", "message"),
    [
        (torch.tensor([0, 5]), torch.zeros(2), r"index values must be in \[0, 5\), got min 0 and max 5"),
        (torch.tensor([-1]), torch.zeros(1), r"got min -1"),
        (torch.tensor([0.0]), torch.zeros(1), "1-D integer tensor"),
        (torch.tensor([1, 1]), torch.zeros(2), "must not repeat"),
        (torch.tensor([1, 2]), torch.zeros(3), r"values must have shape \(2,\), got \(3,\)"),
    ],
)
def test_buffer_rejects_bad_writes_and_stays_unchanged(index, values, message) -> None:
    buffer = SampleBuffer(5, (), fill=7.0)
    with pytest.raises(ValueError, match=message):
        buffer.write(index, values)
    assert buffer.values.tolist() == [7.0] * 5 and buffer.visits.sum() == 0


def test_buffer_state_dict_round_trip_and_rejects_other_shapes() -> None:
    buffer = SampleBuffer(4, (3,))
    buffer.write(torch.tensor([1, 2]), torch.arange(6.0).view(2, 3))
    restored = SampleBuffer(4, (3,))
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.values, buffer.values) and torch.equal(restored.visits, buffer.visits)
    for other in (SampleBuffer(5, (3,)), SampleBuffer(4, (2,))):
        before = other.values.clone()
        with pytest.raises(ValueError, match="num_samples=4 and value_shape=\\(3,\\)"):
            other.load_state_dict(buffer.state_dict())
        assert torch.equal(other.values, before)


def test_history_keeps_last_window_per_sample() -> None:
    history = SampleHistory(3, window=2, value_shape=(1,))
    history.append(torch.tensor([0, 1]), torch.tensor([[1.0], [10.0]]))
    history.append(torch.tensor([0]), torch.tensor([[3.0]]))  # sample 1 missed this epoch (drop_last)
    history.append(torch.tensor([0, 1]), torch.tensor([[5.0], [20.0]]))
    # sample 0: last two values 3 and 5; sample 1: both of its values 10, 20; sample 2: never seen
    assert history.mean().squeeze(1).tolist() == [4.0, 15.0, 0.0]
    assert history.visits.tolist() == [3, 2, 0]
    assert history.mean(torch.tensor([1])).squeeze(1).tolist() == [15.0]


def test_history_state_round_trip_and_window_check() -> None:
    history = SampleHistory(3, window=2)
    history.append(torch.tensor([2]), torch.tensor([1.5]))
    restored = SampleHistory(3, window=2)
    restored.load_state_dict(history.state_dict())
    assert torch.equal(restored.mean(), history.mean())
    with pytest.raises(ValueError, match="window=2 into one with window=3"):
        SampleHistory(3, window=3).load_state_dict(history.state_dict())
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        SampleHistory(3, window=0)


def test_recorder_stores_inference_tensors_at_once() -> None:
    recorder = SampleRecorder(())
    recorder.add(torch.tensor([0]), torch.tensor([5.0]))  # held
    with torch.inference_mode():  # as in an evaluation pass: such tensors have no version counter
        index, values = torch.tensor([1, 2]), torch.tensor([1.0, 2.0])
    recorder.add(index, values)
    with torch.inference_mode():
        values.mul_(10.0)  # allowed in inference mode, and undetectable: the record was stored when added
    assert recorder.gather()[1].tolist() == [5.0, 1.0, 2.0]  # with the record held before it, in order
