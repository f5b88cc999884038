"""``lightning-noisy search``: the space file, its sampling and patches, the criteria, trials and the command."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from scipy.stats import spearmanr

from lightning_noisy.cli import main as cli_main
from lightning_noisy.experiment import quiet_cli
from lightning_noisy.search import SearchSpace, SearchSpaceError, Selection, merge_config
from lightning_noisy.search.command import main as search_main
from lightning_noisy.search.report import best_row, majority_filter_scores, spearman, TrialRow
from lightning_noisy.search.study import StudyOptions, check_options, open_study
from lightning_noisy.search.trial import PruneOnScore, TrialSettings, final_config, run_trial, trial_config

SHIPPED = "configs/search/mnist1d_space.yaml"
CE = "configs/mnist1d_ce.yaml"

SMALL_SPACE: dict[str, Any] = {
    "dimensions": {
        "selection": {"none": {}, "pair": {"patch": {"model": {"class_path": "Pair", "init_args": {"k": "$k"}}},
                                             "params": {"k": {"type": "int", "low": 1, "high": 3}}}},
        "loss": {"ce": {}, "gce": {"patch": {"model": {"init_args": {"loss": "gce", "loss_kwargs": {"q": "$q"}}}},
                                   "params": {"q": {"type": "float", "low": 0.1, "high": 1.0}}},
                 "mae": {"patch": {"model": {"init_args": {"loss": "mae"}}}}},
        "mixup": {"no": {}, "yes": {"patch": {"model": {"init_args": {"mixup_alpha": "$alpha"}}},
                                    "params": {"alpha": {"type": "float", "low": 0.1, "high": 2.0, "log": True}}}},
    },
    "invalid": [{"selection": "pair", "loss": ["gce", "mae"]}, {"selection": "pair", "mixup": "yes"}],
}


# -- the space -------------------------------------------------------------------------------------------------


def test_combinations_leave_out_the_invalid_ones() -> None:
    space = SearchSpace.from_dict(SMALL_SPACE)
    # 2 x 3 x 2 = 12, less pair with gce or mae (2 x 2 = 4) and pair with mixup yes and ce (1)
    assert len(space.combinations()) == 7
    assert {"selection": "pair", "loss": "ce", "mixup": "no"} in space.combinations()
    assert space.allowed("loss", {"selection": "pair"}) == ["ce"]
    assert space.allowed("loss", {"selection": "none"}) == ["ce", "gce", "mae"]
    assert space.allowed("mixup", {"selection": "pair", "loss": "ce"}) == ["no"]


def test_sampling_asks_only_what_is_left_to_choose() -> None:
    space = SearchSpace.from_dict(SMALL_SPACE)
    pair = space.sample(optuna.trial.FixedTrial({"selection": "pair", "selection.pair.k": 2}))
    assert pair.choices == {"selection": "pair", "loss": "ce", "mixup": "no"}  # the rest had one way left
    assert pair.params == {"selection.pair.k": 2}
    chosen = space.sample(optuna.trial.FixedTrial(
        {"selection": "none", "loss": "gce", "loss.gce.q": 0.4, "mixup": "yes", "mixup.yes.alpha": 0.5}))
    assert chosen.label == "selection=none loss=gce mixup=yes"
    assert space.optuna_params(pair) == {"selection": "pair", "selection.pair.k": 2}
    assert space.optuna_params(chosen) == {"selection": "none", "loss": "gce", "mixup": "yes", "loss.gce.q": 0.4,
                                           "mixup.yes.alpha": 0.5}


def test_a_study_samples_only_valid_combinations_with_values_in_range() -> None:
    space = SearchSpace.from_dict(SMALL_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        selection = space.sample(trial)
        assert not space.is_invalid(selection.choices)
        if "loss.gce.q" in selection.params:
            assert 0.1 <= selection.params["loss.gce.q"] <= 1.0
        seen.add(tuple(selection.choices.values()))
        study.tell(trial, 0.0)
    assert len(seen) == 7  # every valid combination drawn


def test_patches_are_filled_and_merged_into_the_base() -> None:
    space = SearchSpace.from_dict(SMALL_SPACE)
    base = {"model": {"class_path": "Plain", "init_args": {"loss": "ce", "lr": 0.1}}, "data": {"x": 1}}
    gce = Selection({"selection": "none", "loss": "gce", "mixup": "yes"}, {"loss.gce.q": 0.5, "mixup.yes.alpha": 0.2})
    assert space.apply(base, gce) == {
        "model": {"class_path": "Plain", "init_args": {"loss": "gce", "lr": 0.1, "loss_kwargs": {"q": 0.5},
                                                       "mixup_alpha": 0.2}},
        "data": {"x": 1},
    }
    pair = Selection({"selection": "pair", "loss": "ce", "mixup": "no"}, {"selection.pair.k": 3})
    assert space.apply(base, pair)["model"] == {"class_path": "Pair", "init_args": {"k": 3}}  # replaced whole
    assert base["model"]["init_args"] == {"loss": "ce", "lr": 0.1}  # the base is not changed


def test_model_from_starts_the_patch_from_a_fit_configs_model_section(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pair.yaml").write_text(yaml.safe_dump(
        {"trainer": {"max_epochs": 9}, "model": {"class_path": "Pair", "init_args": {"k": 1, "lr": 0.5}}}))
    spec = yaml.safe_load(yaml.safe_dump(SMALL_SPACE))
    spec["dimensions"]["selection"]["pair"] = {"model_from": "../configs/pair.yaml",
                                               "patch": {"model": {"init_args": {"k": "$k"}}},
                                               "params": {"k": {"type": "int", "low": 1, "high": 3}}}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "space.yaml").write_text(yaml.safe_dump(spec))
    space = SearchSpace.from_file(tmp_path / "search" / "space.yaml")  # the path is relative to the space file
    pair = Selection({"selection": "pair", "loss": "ce", "mixup": "no"}, {"selection.pair.k": 3})
    base = {"model": {"class_path": "Plain", "init_args": {"loss": "ce"}}, "trainer": {"max_epochs": 2}}
    # the config's model section (replacing the base's model), its k filled; the config's trainer is not taken
    assert space.apply(base, pair) == {"model": {"class_path": "Pair", "init_args": {"k": 3, "lr": 0.5}},
                                       "trainer": {"max_epochs": 2}}
    with pytest.raises(SearchSpaceError, match=r"selection.pair: model_from must name a fit config file, got 'none.yaml'"):
        SearchSpace.from_dict({**spec, "dimensions": {**spec["dimensions"], "selection": {
            "pair": {**spec["dimensions"]["selection"]["pair"], "model_from": "none.yaml"}}}}, root=tmp_path)
    (tmp_path / "no_model.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}}))
    with pytest.raises(SearchSpaceError, match="has no model section with a class_path"):
        SearchSpace.from_dict({**spec, "dimensions": {**spec["dimensions"], "selection": {
            "pair": {**spec["dimensions"]["selection"]["pair"], "model_from": "no_model.yaml"}}}}, root=tmp_path)


def test_merge_config_appends_replaces_and_recurses() -> None:
    base = {"trainer": {"callbacks": [{"class_path": "A"}], "max_epochs": 5}, "seed": 1}
    patch = {"trainer": {"callbacks+": [{"class_path": "B"}], "max_epochs": 7}, "new": [1]}
    assert merge_config(base, patch) == {"trainer": {"callbacks": [{"class_path": "A"}, {"class_path": "B"}],
                                                     "max_epochs": 7}, "seed": 1, "new": [1]}
    assert merge_config({}, {"callbacks+": [1]}) == {"callbacks": [1]}  # appends to nothing
    with pytest.raises(SearchSpaceError, match="'callbacks\\+' appends a list to a list"):
        merge_config({"callbacks": 3}, {"callbacks+": [1]})


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("dimensions"), "needs a non-empty mapping 'dimensions'"),
    (lambda s: s.update(extra=1), r"unknown top-level keys \['extra'\]"),
    (lambda s: s["dimensions"]["loss"]["gce"]["params"]["q"].update(type="double"), "a parameter needs type one of"),
    (lambda s: s["dimensions"]["loss"]["gce"]["params"]["q"].update(low=2.0), "needs numbers low < high, got low=2.0"),
    (lambda s: s["dimensions"]["loss"]["gce"]["params"].pop("q"), r"placeholders \['q'\] must be exactly its params \[\]"),
    (lambda s: s["dimensions"]["mixup"]["yes"]["params"]["alpha"].update(low=0.0), "needs low > 0"),
    (lambda s: s["dimensions"]["selection"]["pair"]["params"]["k"].update(high=3.5), "an int parameter needs int bounds"),
    (lambda s: s["invalid"].append({"schedule": "x"}), "unknown dimension 'schedule'"),
    (lambda s: s["invalid"].append({"loss": ["ce", "sce"]}), "loss must name choices of"),
    (lambda s: s["invalid"].append({"mixup": ["no", "yes"]}), "leave no valid combination"),
    (lambda s: s.update(enqueue=[{"choices": {"selection": "pair", "loss": "gce", "mixup": "no"},
                                  "params": {"selection.pair.k": 1, "loss.gce.q": 0.5}}]), "is an invalid combination"),
    (lambda s: s.update(enqueue=[{"choices": {"selection": "none", "loss": "gce", "mixup": "no"},
                                  "params": {"loss.gce.q": 5.0}}]), "loss.gce.q must be given within its range, got 5.0"),
    (lambda s: s.update(enqueue=[{"choices": {"selection": "none"}}]), r"leaves dimensions \['loss', 'mixup'\] unchosen"),
])
def test_a_bad_space_is_refused_with_what_was_wrong(change: Any, message: str) -> None:
    spec = yaml.safe_load(yaml.safe_dump(SMALL_SPACE))  # a deep copy
    change(spec)
    with pytest.raises(SearchSpaceError, match=message):
        SearchSpace.from_dict(spec)


def test_a_missing_space_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="search space file not found: '.*nothing.yaml'"):
        SearchSpace.from_file(tmp_path / "nothing.yaml")


def _covering_selections(space: SearchSpace) -> list[Selection]:
    """Valid combinations that together use every choice of every dimension, each with in-range parameters."""
    combos, uncovered = space.combinations(), {(d, c) for d in space.dimensions for c in space.dimensions[d]}
    picked = []
    while uncovered:
        combo = max(combos, key=lambda c: len(uncovered & set(c.items())))
        uncovered -= set(combo.items())
        params = {}
        for dim, choice in combo.items():
            for p in space.dimensions[dim][choice].params:
                value = p.choices[0] if p.type == "categorical" else (p.low + p.high) / 2
                params[f"{dim}.{choice}.{p.name}"] = int(value) if p.type == "int" else value
        picked.append(Selection(combo, params))
    return picked


WHOLE_METHODS = {"dividemix": "DivideMix", "coteaching": "CoTeaching", "promix": "ProMix", "sop_plus": "SOPPlus"}


def test_every_choice_of_the_shipped_space_builds_through_the_cli(tmp_path: Path) -> None:
    space = SearchSpace.from_file(SHIPPED)
    base = yaml.safe_load(Path(CE).read_text())
    selections = [*space.enqueue, *_covering_selections(space)]
    for i, selection in enumerate(selections):
        settings = TrialSettings(base=base, out_dir=str(tmp_path), val_fraction=0.1, score_epochs=1)
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(trial_config(settings, space, selection)))
        cli = quiet_cli(str(path), seed=None)  # the CLI instantiates model, data and callbacks
        assert cli.datamodule.noisy_val_fraction == 0.1, selection.label
        assert type(cli.model).__name__ == WHOLE_METHODS.get(selection.choices["selection"], "NoisyClassifier")
        assert "noisy_val_fraction" not in final_config(base, space, selection)["data"]["init_args"]


# -- the criteria ----------------------------------------------------------------------------------------------


def test_majority_filter_against_a_hand_count() -> None:
    noisy = np.array([0, 1, 2, 2, 1])
    predictions = np.array([
        [0, 1, 2, 0, 0],
        [0, 1, 1, 0, 1],
        [0, 2, 2, 0, 2],
    ])
    # majority per sample: 0, 1, 2, 0, tie of 0/1/2 -> 0; agrees with the label on samples 0, 1, 2
    scores, clean = majority_filter_scores(predictions, noisy)
    assert clean.tolist() == [True, True, True, False, False]
    np.testing.assert_allclose(scores, [3 / 3, 2 / 3, 2 / 3])
    with pytest.raises(ValueError, match=r"predictions must be \[T, 5\]"):
        majority_filter_scores(predictions[:, :4], noisy)


def test_spearman_agrees_with_scipy_and_names_its_edge_cases() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(20).tolist(), rng.random(20).tolist()
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman([1, 2, 3, 4], [10, 20, 25, 90]) == pytest.approx(1.0)  # monotone
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equally long sequences, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])


def _row(number: int, noisy_val: float, majority: float) -> TrialRow:
    return TrialRow(number, "c", {}, noisy_val, majority, 0.5, 0.5, 1.0)


def test_the_best_row_by_each_criterion() -> None:
    rows = [_row(0, 0.4, 0.9), _row(1, 0.6, math.nan), _row(2, 0.6, 0.5)]
    assert best_row(rows, "noisy_val").number == 1  # a tie goes to the earlier trial
    assert best_row(rows, "majority_filter").number == 0
    with pytest.raises(ValueError, match="criterion must be one of"):
        best_row(rows, "clean_test")
    with pytest.raises(ValueError, match="no finished trial has a finite majority_filter score"):
        best_row([_row(0, 0.1, math.nan)], "majority_filter")


# -- trials and the command ------------------------------------------------------------------------------------

TINY_SPACE = {
    "dimensions": {"loss": {"ce": {}, "gce": {"patch": {"model": {"init_args": {"loss": "gce", "loss_kwargs": {"q": "$q"}}}},
                                              "params": {"q": {"type": "float", "low": 0.5, "high": 0.9}}}}},
    "enqueue": [{"choices": {"loss": "gce"}, "params": {"loss.gce.q": 0.7}}],
}


def _tiny_base(tmp_path: Path, epochs: int = 2) -> Path:
    base = yaml.safe_load(Path(CE).read_text())
    base["trainer"]["max_epochs"] = epochs
    base["data"]["init_args"].update(num_samples=500, noise_rate=0.4)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _settings(tmp_path: Path, **kwargs: Any) -> TrialSettings:
    return TrialSettings(base=yaml.safe_load(_tiny_base(tmp_path).read_text()), out_dir=str(tmp_path), val_fraction=0.2,
                         score_epochs=2, **kwargs)


def test_a_trial_scores_on_the_noisy_split_and_records_the_clean_test_apart(tmp_path: Path, one_thread: None) -> None:
    space = SearchSpace.from_dict(TINY_SPACE)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"loss": "ce"})
    study.optimize(lambda t: run_trial(t, space, _settings(tmp_path)), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    attrs = trial.user_attrs
    assert attrs["combination"] == "loss=ce" and len(attrs["val_predictions"]) == 80  # 20% of 400
    noisy = np.array(study.user_attrs["noisy_val_labels"])
    assert attrs["noisy_val_acc_last"] == pytest.approx(float((np.array(attrs["val_predictions"]) == noisy).mean()))
    assert 0.0 <= attrs["test_acc_last"] <= 1.0 and attrs["test_acc_best"] >= attrs["test_acc_last"]
    assert trial.value == pytest.approx(np.mean(list(trial.intermediate_values.values())))  # the last 2 of 2 epochs
    assert (tmp_path / "trials" / "trial_0000.yaml").is_file()


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tmp_path: Path, one_thread: None) -> None:
    bad = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    bad["dimensions"]["loss"]["gce"]["params"]["q"].update(low=1.5, high=2.0)  # GCE takes q in (0, 1]
    bad.pop("enqueue")
    space = SearchSpace.from_dict(bad)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"loss": "gce", "loss.gce.q": 1.7})
    study.enqueue_trial({"loss": "ce"})
    study.optimize(lambda t: run_trial(t, space, _settings(tmp_path)), n_trials=2, catch=(Exception,))
    failed, done = study.trials
    assert failed.state == optuna.trial.TrialState.FAIL and "q must be in (0, 1], got 1.7" in failed.user_attrs["fail_reason"]
    assert done.state == optuna.trial.TrialState.COMPLETE


def test_the_pruner_and_the_deadline_stop_a_trial(tmp_path: Path, one_thread: None) -> None:
    space = SearchSpace.from_dict(TINY_SPACE)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    study.enqueue_trial({"loss": "ce"})
    study.optimize(lambda t: run_trial(t, space, _settings(tmp_path)), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert list(study.trials[0].intermediate_values) == [0]  # stopped after its first epoch
    late = optuna.create_study(direction="maximize")
    late.enqueue_trial({"loss": "ce"})
    late.optimize(lambda t: run_trial(t, space, _settings(tmp_path, deadline=0.0)), n_trials=1)
    assert late.trials[0].state == optuna.trial.TrialState.PRUNED and list(late.trials[0].intermediate_values) == [0]


def test_study_options_are_checked() -> None:
    for name, bad in (("trials", 0), ("jobs", True), ("startup_trials", 0), ("prune_after", -1), ("timeout", -5.0)):
        fields: dict[str, Any] = {"name": "s", "storage": "sqlite://", "trials": 1, name: bad}
        with pytest.raises(ValueError, match=f"{name} must be"):
            check_options(StudyOptions(**fields))


def test_a_resumed_study_must_keep_its_split(tmp_path: Path) -> None:
    space = SearchSpace.from_dict(TINY_SPACE)
    options = StudyOptions(name="s", storage=f"sqlite:///{tmp_path / 'db.sqlite'}", trials=1)
    study = open_study(options, space, _settings(tmp_path))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.WAITING]  # the enqueued trial
    assert len(open_study(options, space, _settings(tmp_path)).trials) == 1  # loaded, not enqueued again
    with pytest.raises(ValueError, match="was scored with val_fraction 0.2, not 0.3"):
        open_study(options, space, TrialSettings(base={}, out_dir=str(tmp_path), val_fraction=0.3, score_epochs=2))


@pytest.mark.slow
def test_the_command_searches_reports_resumes_and_its_best_config_fits(tmp_path: Path, capfd: Any) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    out = tmp_path / "out"
    args = ["search", "--config", str(_tiny_base(tmp_path, epochs=3)), "--space", str(space), "--trials", "3",
            "--jobs", "2", "--out", str(out), "--val-fraction", "0.2", "--score-epochs", "2", "--startup-trials", "3"]
    cli_main(args)
    printed = capfd.readouterr().out  # the workers' lines too (their own processes)
    assert printed.count("] trial ") == 3 and "best (noisy_val): trial" in printed
    for name in ("report.md", "trials.json", "best.yaml", "optimization_history.png", "noisy_val_vs_clean_test.png"):
        assert (out / name).is_file(), name
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3 and study.trials[0].params == {"loss": "gce", "loss.gce.q": 0.7}
    report = (out / "report.md").read_text()
    assert "clean test last (not used)" in report and "`noisy_val`:" in report and "`majority_filter`:" in report
    # the interrupted or extended search resumes from its storage: one more trial, not three
    more = list(args)
    more[more.index("--trials") + 1] = "4"
    cli_main(more)
    assert len(optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}").trials) == 4
    # best.yaml is the winner's config on the whole training set
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "noisy_val_fraction" not in best["data"]["init_args"]
    winner = max((t for t in study.trials if t.value is not None), key=lambda t: (t.value, -t.number))
    assert best["model"]["init_args"]["loss"] == winner.params["loss"]
    cli = quiet_cli(str(out / "best.yaml"), ["--trainer.max_epochs=1"], seed=None)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(cli.datamodule.noisy_labels) == 400
    assert torch.isfinite(cli.trainer.callback_metrics["test/acc"])


def test_the_command_refuses_bad_arguments(tmp_path: Path, capsys: Any) -> None:
    base, space = _tiny_base(tmp_path), tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    for extra, message in ((["--val-fraction", "1.0"], "--val-fraction must be in (0, 1), got 1.0"),
                           (["--trials", "0"], "--trials must be an int >= 1, got 0"),
                           (["--config", str(tmp_path / "none.yaml")], "--config: no such file"),
                           (["--space", str(base)], "needs a non-empty mapping 'dimensions'")):
        with pytest.raises(SystemExit) as exit_info:
            search_main(["--config", str(base), "--space", str(space), "--out", str(tmp_path / "o"), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "o").exists()  # nothing written
