"""The benchmark runner: ``run_many`` with its result cache and its handling of a failed run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import PlainClassifier, toy_dataset, toy_loader

from lightning_noisy import experiment
from lightning_noisy.experiment import run_many

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mnist1d_ce.yaml")
TINY = ("--trainer.max_epochs=2", "--data.init_args.num_samples=300", "--data.init_args.batch_size=64")


def as_json(result: experiment.RunResult) -> str:
    """The result as text, so that NaN fields (no recovery figure for CE) compare equal."""
    return json.dumps(dataclasses.asdict(result))


def _refuse(job: object) -> None:
    raise AssertionError(f"{job} should have come from the cache")


def test_cached_runs_are_reused_and_equal_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [(CONFIG, TINY, 0), (CONFIG, (*TINY, "--data.init_args.noise_rate=0.2"), 1)]
    first = run_many(jobs, processes=1, cache_dir=tmp_path)
    assert [r.seed for r in first] == [0, 1]
    assert len(list(tmp_path.glob("*.json"))) == 2 and not list(tmp_path.glob("*.tmp"))
    assert all(len(r.history) == 2 for r in first)

    monkeypatch.setattr(experiment, "_run_job", _refuse)
    again = run_many(jobs, processes=1, cache_dir=tmp_path)
    assert [as_json(r) for r in again] == [as_json(r) for r in first]  # every field, the history included
    with pytest.raises(RuntimeError, match="should have come from the cache"):  # another seed is not cached
        run_many([(CONFIG, TINY, 2)], processes=1, cache_dir=tmp_path)


def test_a_run_made_by_other_code_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = (CONFIG, TINY, 0)
    run_many([job], processes=1, cache_dir=tmp_path)
    monkeypatch.setattr(experiment, "_run_job", _refuse)
    run_many([job], processes=1, cache_dir=tmp_path)  # same code: from the cache
    monkeypatch.setattr(experiment, "package_digest", lambda: "0" * 64)  # as after an edit of the package
    with pytest.raises(RuntimeError, match="should have come from the cache"):
        run_many([job], processes=1, cache_dir=tmp_path)


def test_package_digest_changes_with_the_source_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    original = experiment.package_digest()
    copy = tmp_path / "lightning_noisy"
    shutil.copytree(Path(experiment.__file__).resolve().parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(experiment, "__file__", str(copy / "experiment.py"))  # digest the copy instead
    assert experiment.package_digest() == original  # same files, same text: same digest wherever they lie
    (copy / "notes.txt").write_text("not source")
    assert experiment.package_digest() == original  # only .py files count
    losses = copy / "losses" / "robust.py"
    losses.write_text(losses.read_text() + "\n# an edit\n")
    assert experiment.package_digest() != original


def test_a_damaged_cache_file_is_run_again(tmp_path: Path) -> None:
    job = (CONFIG, TINY, 0)
    (first,) = run_many([job], processes=1, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text('{"config": ')  # e.g. a write cut off by an older version
    (again,) = run_many([job], processes=1, cache_dir=tmp_path)
    assert again.best_acc == first.best_acc and again.history == [
        {**row, "epoch_s": again.history[i]["epoch_s"]} for i, row in enumerate(first.history)
    ]


def test_a_failed_run_is_named_after_the_others_finish(tmp_path: Path) -> None:
    jobs = [
        (CONFIG, (*TINY, "--data.init_args.noise_rate=1.5"), 0),  # the DataModule refuses it: ValueError
        (CONFIG, (*TINY, "--model.init_args.no_such_option=1"), 0),  # the CLI parser refuses it: SystemExit
        (CONFIG, TINY, 0),
    ]
    with pytest.raises(RuntimeError, match=r"(?s)2 of 3 runs failed:\n.*noise_rate=1\.5.*no_such_option.*CLI rejected"):
        run_many(jobs, processes=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1  # the good run was kept
    results = run_many(jobs, processes=1, cache_dir=tmp_path, skip_failed=True)  # the failures are printed
    assert results[0] is None and results[1] is None and results[2] is not None and results[2].seed == 0


@pytest.mark.parametrize("processes", [0, -1, True, 1.5])
def test_processes_must_be_a_positive_int(processes: object) -> None:
    with pytest.raises(ValueError, match=f"processes must be an int >= 1, got {processes!r}"):
        run_many([(CONFIG, TINY, 0)], processes=processes)  # type: ignore[arg-type]


class EpochEndLogger(PlainClassifier):
    """Logs the epoch number at its own ``on_train_epoch_end``, as DivideMix logs its FixMatch counts."""

    def on_train_epoch_end(self) -> None:
        self.log("noisy/pseudo_label_acc", float(self.current_epoch), on_epoch=True)


def test_history_rows_hold_what_the_module_logs_at_its_epoch_end() -> None:
    import lightning.pytorch as pl

    history = experiment.EpochHistory()
    trainer = pl.Trainer(max_epochs=3, callbacks=[history], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(EpochEndLogger(), toy_loader(toy_dataset(return_index=False)))
    assert [row["noisy/pseudo_label_acc"] for row in history.rows] == [0.0, 1.0, 2.0]  # each epoch its own value
    assert all(row["epoch_s"] > 0 for row in history.rows)
