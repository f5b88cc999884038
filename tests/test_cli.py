"""The ``lightning-noisy`` command on the shipped configs, with a tiny data size."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_noisy.aum_combine import main as combine
from lightning_noisy.cli import main
from lightning_noisy.data import DatasetNotFoundError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--trainer.max_epochs=1", "--data.init_args.num_samples=300", "--trainer.enable_progress_bar=false"]


def logged_tags(root: Path) -> set[str]:
    (events,) = root.glob("lightning_logs/version_0/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["histograms"])


def test_fit_ce_config_logs_noisy_label_accuracy_to_tensorboard(tmp_path: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist1d_ce.yaml"), *TINY, f"--trainer.default_root_dir={tmp_path}"])
    tags = logged_tags(tmp_path)
    assert {"noisy/noisy_label_acc", "noisy/train_pred_acc", "test/acc", "test/acc_best"} <= tags
    assert {"noisy/sample_loss_clean", "noisy/sample_loss_noisy"} <= tags  # histograms
    assert (tmp_path / "lightning_logs/version_0/config.yaml").exists()


def test_fit_joint_optimization_config_and_callbacks_added_from_the_command_line(tmp_path: Path) -> None:
    main([
        "fit", "--config", str(CONFIGS / "mnist1d_joint_optimization.yaml"), *TINY,
        "--trainer.max_epochs=3", "--model.init_args.step1_epochs=2", "--model.init_args.start_epoch=0",
        "--trainer.callbacks+=lightning_noisy.callbacks.NoisyLabelMonitor", "--trainer.callbacks.key=second",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    assert {"noisy/recovery_acc", "noisy/changed_frac", "noisy/label_entropy", "noisy/joint_optimization_loss"} <= (
        logged_tags(tmp_path)
    )


def test_module_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_noisy", "fit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--trainer.callbacks" in out.stdout


def test_bad_config_value_is_reported_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"noise_rate must be in \[0, 1\], got 1.5"):
        main(["fit", "--config", str(CONFIGS / "mnist1d_ce.yaml"), "--data.init_args.noise_rate=1.5",
              f"--trainer.default_root_dir={tmp_path}"])
    assert not (tmp_path / "lightning_logs").exists()


def test_cifar_config_offline_ends_in_where_to_put_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_internet(*args, **kwargs):
        raise urllib.error.URLError("no internet (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_internet)  # torchvision's download goes through it
    root = tmp_path / "cifar"
    with pytest.raises(DatasetNotFoundError) as info:
        main([
            "fit", "--config", str(CONFIGS / "cifar10_dividemix.yaml"), f"--data.init_args.root={root}",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            f"--trainer.default_root_dir={tmp_path}",
        ])
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert str(info.value).startswith(f"CIFAR-10 is not in {root} (the download failed: URLError")
    assert f"CIFAR10('{root}', download=True)" in str(info.value)
    assert not (tmp_path / "lightning_logs").exists()


def test_aum_two_run_procedure_and_retraining_from_the_command_line(tmp_path: Path) -> None:
    for run in (0, 1):
        main([
            "fit", "--config", str(CONFIGS / "mnist1d_aum.yaml"), *TINY, "--trainer.max_epochs=2",
            f"--trainer.callbacks.init_args.threshold_run={run}",
            f"--trainer.callbacks.init_args.output_dir={tmp_path / f'run{run}'}",
            f"--trainer.default_root_dir={tmp_path / f'logs{run}'}",
        ])
    assert {"aum/threshold", "aum/flagged_fraction", "noisy/aum_f1", "aum/values"} <= logged_tags(tmp_path / "logs0")
    flags = [str(tmp_path / f"run{run}" / "aum_flags.csv") for run in (0, 1)]
    combine([*flags, "--out", str(tmp_path / "removed.pt")])
    removed = torch.load(tmp_path / "removed.pt")
    main([
        "fit", "--config", str(CONFIGS / "mnist1d_ce.yaml"), *TINY, f"--data.init_args.exclude_file={tmp_path / 'removed.pt'}",
        "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path / 'retrain'}",
    ])
    assert removed.ndim == 1 and (tmp_path / "retrain" / "lightning_logs" / "version_0").exists()


SHORT_METHOD_RUNS = {
    "mnist1d_coteaching.yaml": ([], "test/acc_mean"),
    "mnist1d_curriculum.yaml": (
        ["--trainer.callbacks.init_args.curriculum_epoch=0", "--trainer.callbacks.init_args.stage_epochs=[1, 2]"],
        "curriculum/active_fraction",
    ),
    "mnist1d_self_learning.yaml": (["--model.init_args.warmup_epochs=1"], "noisy/pseudo_label_recovery"),
    "mnist1d_feature_mixup.yaml": ([], "train/loss_mix"),
    "mnist1d_dividemix.yaml": (["--model.init_args.warmup_epochs=1"], "noisy/codivide_auroc"),
    "mnist1d_dividemix_fixmatch.yaml": (
        ["--model.init_args.warmup_epochs=1", "--model.init_args.fixmatch_threshold=0.2"], "noisy/fixmatch_mask_rate",
    ),
    "mnist1d_cnn_crf.yaml": (["--data.init_args.clean_subset_size=24"], "crf/alpha"),
    "mnist1d_elr.yaml": ([], "noisy/elr_target_acc"),
    "mnist1d_sop.yaml": ([], "noisy/sop_noise_auroc"),
    "mnist1d_sop_plus.yaml": ([], "noisy/sop_noise_auroc"),
    "mnist1d_elr_plus.yaml": ([], "noisy/elr_target_acc_b"),
    "mnist1d_promix.yaml": (["--model.init_args.warmup_epochs=1"], "noisy/promix_selection_precision"),
}


@pytest.mark.parametrize("config", sorted(SHORT_METHOD_RUNS))
def test_method_configs_run_and_log_their_metric(tmp_path: Path, config: str) -> None:
    extra, tag = SHORT_METHOD_RUNS[config]
    main(["fit", "--config", str(CONFIGS / config), *TINY, "--trainer.max_epochs=3", *extra,
          f"--trainer.default_root_dir={tmp_path}"])
    tags = logged_tags(tmp_path)
    assert {"test/acc", tag} <= tags


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --print_config validates every argument against the classes' signatures, then exits before building
    # anything (no download for the CIFAR configs)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_cifar_fixmatch_config_builds_the_randaugment_cutout_strong_view(tmp_path: Path) -> None:
    from lightning_noisy.augment import RandAugmentCutout
    from lightning_noisy.cli import build_cli
    from lightning_noisy.data.datamodules import CIFAR_STATS
    from lightning_noisy.methods.semi_supervised import FixMatchStage

    cli = build_cli(["--config", str(CONFIGS / "cifar10_dividemix_fixmatch.yaml"), "--trainer.accelerator=cpu",
                     "--trainer.devices=1", "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}",
                     f"--data.init_args.root={tmp_path}"], run=False)
    strong = cli.model.strong_augment
    assert isinstance(strong, RandAugmentCutout) and isinstance(cli.model.stage, FixMatchStage)
    assert (strong.mean, strong.std) == CIFAR_STATS["cifar10"] and cli.model.stage.threshold == 0.95
    assert strong(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 32, 32)
