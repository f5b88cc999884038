"""Tests of the noisy-label DataModules (MNIST-1D, digits, a synthetic CIFAR stand-in, image CSV)."""

from __future__ import annotations

import math
import random
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from lightning_noisy.data import (
    CIFARDataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageFolderCSVDataModule,
    MNIST1DDataModule,
    load_noisy_labels,
)

SMALL = {"num_samples": 500, "batch_size": 64}  # 400 train / 100 test


def collect(loader) -> list[torch.Tensor]:
    """Concatenate every field of every batch."""
    return [torch.cat(parts) for parts in zip(*loader, strict=True)]


def fit_setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ MNIST-1D
def test_mnist1d_default_sizes() -> None:
    dm = fit_setup(MNIST1DDataModule())
    assert dm.num_classes == 10
    assert len(dm.noisy_labels) == 4000 and len(dm.val_dataloader().dataset) == 1000
    x, y = dm.val_dataloader().dataset[0]
    assert x.shape == (1, 40) and x.dtype == torch.float32 and type(y) is int
    assert dm.noise_info.noise_rate == 0.0  # default: symmetric at rate 0


def test_mnist1d_small_and_setup_keeps_global_rng() -> None:
    numpy_state, python_state = np.random.get_state(), random.getstate()
    dm = fit_setup(MNIST1DDataModule(num_samples=333, train_split=0.75, data_seed=3))  # not cached elsewhere
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
    assert random.getstate() == python_state
    # make_dataset makes num_samples // 10 per class: 330 samples, int(330 * 0.75) = 247 for training
    assert len(dm.noisy_labels) == 247 and len(dm.test_dataloader().dataset) == 83


def test_train_batches_carry_index_and_cover_dataset_once() -> None:
    dm = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.5))
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 40) and y.dtype == torch.int64 and index.dtype == torch.int64
    _, ys, indices = collect(dm.train_dataloader())
    assert sorted(indices.tolist()) == list(range(400))
    assert indices.tolist() != list(range(400))  # shuffled
    assert torch.equal(ys, dm.noisy_labels[indices])  # the targets are the noisy labels


def test_train_eval_loader_in_order_and_val_is_clean() -> None:
    dm = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.5))
    xs, ys, indices = collect(dm.train_eval_dataloader())
    assert indices.tolist() == list(range(400)) and torch.equal(ys, dm.noisy_labels)
    train_set = dm.train_dataloader().dataset.dataset
    assert torch.equal(xs, train_set.x) and torch.equal(dm.clean_labels, train_set.targets)
    x_val, y_val = collect(dm.val_dataloader())
    test_set = dm.val_dataloader().dataset
    assert torch.equal(y_val, test_set.targets) and torch.equal(x_val, test_set.x)


def test_drop_last_and_no_index() -> None:
    dm = fit_setup(MNIST1DDataModule(**SMALL, drop_last=True, return_index=False))
    batches = list(dm.train_dataloader())
    assert len(batches) == 400 // 64 and all(len(batch) == 2 for batch in batches)


def test_noise_rate_from_args() -> None:
    dm = fit_setup(MNIST1DDataModule(noise_rate=0.4, noise_seed=1))
    n = 4000
    assert abs(dm.noise_info.noise_rate - 0.4) < 4 * math.sqrt(0.4 * 0.6 / n)  # 4 binomial std
    exact = fit_setup(MNIST1DDataModule(noise_rate=0.4, exact_rate=True, include_true_class=False))
    assert exact.noise_info.noise_rate == 0.4
    assert torch.equal(exact.clean_labels, dm.clean_labels)


def test_asymmetric_from_args_touches_mapped_classes_only() -> None:
    dm = fit_setup(MNIST1DDataModule(**SMALL, noise_type="asymmetric", noise_rate=1.0, class_map={"2": 7, "3": "8"}))
    clean, noisy = dm.clean_labels, dm.noisy_labels
    expected = torch.where(clean == 2, 7, torch.where(clean == 3, 8, clean))
    assert torch.equal(noisy, expected)


def test_same_seed_same_labels_on_every_setup() -> None:
    first = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.3, noise_seed=5)).noisy_labels
    second = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.3, noise_seed=5)).noisy_labels
    other = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.3, noise_seed=6)).noisy_labels
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_save_then_file_reproduces(tmp_path: Path) -> None:
    path = tmp_path / "noise" / "labels.pt"
    made = fit_setup(MNIST1DDataModule(**SMALL, noise_type="pairflip", noise_rate=0.3, save_noisy_labels=str(path)))
    loaded = fit_setup(MNIST1DDataModule(**SMALL, noise_type="file", noise_file=str(path)))
    assert torch.equal(loaded.noisy_labels, made.noisy_labels)
    assert torch.equal(loaded.clean_labels, made.clean_labels)
    assert loaded.noise_info.noise_rate == made.noise_info.noise_rate
    metadata = torch.load(path, weights_only=True)["metadata"]
    assert metadata["noise_type"] == "pairflip" and metadata["noise_rate"] == 0.3
    assert torch.equal(load_noisy_labels(path, 10).labels, made.noisy_labels)


def test_setup_validate_builds_only_test_data() -> None:
    dm = MNIST1DDataModule(**SMALL)
    dm.setup("validate")
    assert len(dm.val_dataloader().dataset) == 100
    with pytest.raises(RuntimeError, match=r"setup\('fit'\) must run"):
        _ = dm.noisy_labels


def test_hparams_hold_subclass_and_shared_args() -> None:
    dm = MNIST1DDataModule(num_samples=500, noise_rate=0.2)
    assert dm.hparams["num_samples"] == 500 and dm.hparams["noise_rate"] == 0.2 and dm.hparams["batch_size"] == 128


class _Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(40, 10)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_runs() -> None:
    trainer = Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(_Linear(), MNIST1DDataModule(**SMALL, noise_rate=0.2))
    assert trainer.state.finished


# ------------------------------------------------------------------ digits
def test_digits() -> None:
    dm = fit_setup(DigitsDataModule(noise_type="instance", noise_rate=0.3, batch_size=500))
    train = dm.train_dataloader().dataset.dataset
    _, y_test = collect(dm.test_dataloader())
    assert len(dm.noisy_labels) == 1347 and len(y_test) == 450  # ceil(0.25 * 1797) held out
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) == 1.0
    # stratified: every class share in the test split within one sample of its share overall
    all_counts = torch.bincount(torch.cat([dm.clean_labels, y_test]), minlength=10)
    assert ((torch.bincount(y_test, minlength=10) - all_counts * 450 / 1797).abs() <= 1).all()
    assert 0.1 < dm.noise_info.noise_rate < 0.5


# ------------------------------------------------------------------ CIFAR (synthetic stand-in)
class FakeCIFAR10:
    """Stands in for torchvision's CIFAR10: ``.data`` [N, 32, 32, 3] uint8 and ``.targets`` ints."""

    num_classes = 10
    calls: ClassVar[list[tuple[bool, bool]]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((train, download))
        n = 120 if train else 40
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = (np.arange(n) % self.num_classes).tolist()


class FakeCIFAR100(FakeCIFAR10):
    num_classes = 100


class SyntheticCIFAR(CIFARDataModule):
    def dataset_classes(self):
        return {"cifar10": FakeCIFAR10, "cifar100": FakeCIFAR100}


@pytest.fixture(autouse=True)
def _reset_fake_calls():
    FakeCIFAR10.calls.clear()


def test_cifar_synthetic_batches_and_normalisation() -> None:
    dm = fit_setup(SyntheticCIFAR(noise_rate=0.4, batch_size=32))
    assert FakeCIFAR10.calls[:2] == [(True, True), (False, True)]  # prepare_data downloads, setup does not
    assert all(not download for _, download in FakeCIFAR10.calls[2:])
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    # the evaluation view is exactly the normalised image
    raw = torch.from_numpy(FakeCIFAR10("", train=True).data[5]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    x_eval, y_eval, i_eval = dm.train_eval_dataloader().dataset[5]
    torch.testing.assert_close(x_eval, (raw - mean[:, None, None]) / std[:, None, None])
    assert i_eval == 5 and y_eval == int(dm.noisy_labels[5])
    assert torch.equal(dm.clean_labels, torch.arange(120) % 10)
    assert len(dm.test_dataloader().dataset) == 40


def test_cifar_augmentation_changes_training_view() -> None:
    dm = fit_setup(SyntheticCIFAR(augment=True, download=False))
    assert FakeCIFAR10.calls[0] == (True, False)
    torch.manual_seed(0)
    views = torch.stack([dm.train_dataloader().dataset[0][0] for _ in range(8)])
    assert not torch.equal(views.min(0).values, views.max(0).values)
    plain = fit_setup(SyntheticCIFAR(augment=False, download=False))
    assert torch.equal(plain.train_dataloader().dataset[0][0], plain.train_eval_dataloader().dataset[0][0])


def test_cifar100_and_instance_noise() -> None:
    dm = fit_setup(SyntheticCIFAR(dataset="cifar100", noise_type="instance", noise_rate=0.3, download=False))
    assert dm.num_classes == 100 and int(dm.clean_labels.max()) == 99
    assert dm.noise_info.transition_matrix.shape == (100, 100)


def test_cifar_n(tmp_path: Path) -> None:
    clean = np.arange(120) % 10
    worse = np.where(np.arange(120) % 3 == 0, (clean + 1) % 10, clean)
    keys = ("aggre_label", "random_label1", "random_label2", "random_label3")
    torch.save({"clean_label": clean, "worse_label": worse, **{k: clean for k in keys}}, tmp_path / "c10n.pt")
    dm = fit_setup(
        SyntheticCIFAR(noise_type="cifar_n", noise_file=str(tmp_path / "c10n.pt"), noise_label_key="worse_label")
    )
    assert dm.noisy_labels.tolist() == worse.tolist()
    assert dm.noise_info.noise_rate == pytest.approx(40 / 120)
    torch.save({"clean_label": (clean + 1) % 10, "worse_label": worse}, tmp_path / "shifted.pt")
    other = SyntheticCIFAR(noise_type="cifar_n", noise_file=str(tmp_path / "shifted.pt"), noise_label_key="worse_label")
    with pytest.raises(ValueError, match=r"clean_labels disagree with the clean labels in .* at 120 positions"):
        fit_setup(other)


def test_cifar_real_torchvision_class_without_files_fails_offline(tmp_path: Path) -> None:
    dm = CIFARDataModule(root=str(tmp_path), download=False)
    dm.prepare_data()  # nothing to do without download
    expected = re.escape(f"CIFAR-10 is not in {tmp_path} (download=False)")
    with pytest.raises(DatasetNotFoundError, match=expected) as info:
        dm.setup("fit")
    assert "Dataset not found" in str(info.value.__cause__)  # torchvision's own error, chained
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FileNotFoundError)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every download fails with a URLError, as on a compute node without internet; gives the URLs asked for."""
    urls: list[str] = []

    def urlopen(request, *args, **kwargs):
        urls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no internet (test)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)  # what torchvision.datasets.utils calls
    return urls


@pytest.mark.parametrize(
    ("dataset", "name", "cls", "folder"),
    [
        ("cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
        ("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python"),
    ],
)
def test_cifar_download_failure_says_where_and_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: list[str], dataset: str, name: str, cls: str, folder: str
) -> None:
    monkeypatch.chdir(tmp_path)
    dm = CIFARDataModule(root="data", dataset=dataset)  # a relative root is reported as an absolute path
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    root = tmp_path / "data"
    message = str(info.value)
    assert offline and offline[0].startswith("https://www.cs.toronto.edu/~kriz/")  # torchvision did try to fetch
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert message.startswith(f"{name} is not in {root} (the download failed: URLError")
    assert f"Expected {root / folder}" in message
    assert f"python -c \"from torchvision.datasets import {cls}; {cls}('{root}', download=True)\"" in message
    assert f"copy the folder {folder} into {root}" in message
    assert "Traceback" not in message and len(message.splitlines()) == 5


def test_cifar_n_label_file_missing_says_where_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "CIFAR-10_human.pt"
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"noise_file '{missing}' does not exist")) as info:
        SyntheticCIFAR(noise_type="cifar_n", noise_file=str(missing), noise_label_key="worse_label")
    assert "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-10_human.pt" in str(info.value)
    assert FakeCIFAR10.calls == []


# ------------------------------------------------------------------ image folder + CSV
@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    rows = "\n".join(f"img{i}.png,{(i + (i % 3 == 0)) % 3},{i % 3}" for i in range(6))
    (tmp_path / "train.csv").write_text("path,label,clean_label\n" + rows + "\n")
    (tmp_path / "train_noisy.csv").write_text(
        "path,label\n" + "\n".join(f"img{i}.png,{i % 3}" for i in range(6)) + "\n"
    )
    (tmp_path / "test.csv").write_text("path,label\nimg6.png,1\nimg7.png,2\n")
    return tmp_path


def test_image_csv_with_clean_column(image_root: Path) -> None:
    dm = fit_setup(ImageFolderCSVDataModule(str(image_root), "train.csv", "test.csv", image_size=8, batch_size=4))
    assert dm.num_classes == 3
    assert dm.noisy_labels.tolist() == [1, 1, 2, 1, 1, 2] and dm.clean_labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert dm.noise_info.noise_rate == pytest.approx(2 / 6)
    x, _, index = collect(dm.train_dataloader())
    assert x.shape == (6, 3, 8, 8) and sorted(index.tolist()) == list(range(6))
    x_test, y_test = collect(dm.test_dataloader())
    assert x_test.shape == (2, 3, 8, 8) and y_test.tolist() == [1, 2]


def test_image_csv_without_clean_labels(image_root: Path) -> None:
    dm = fit_setup(ImageFolderCSVDataModule(str(image_root), str(image_root / "train_noisy.csv"), image_size=8))
    assert dm.clean_labels is None and math.isnan(dm.noise_info.noise_rate)
    assert len(dm.val_dataloader().dataset) == 0  # no test_csv: nothing to validate on
    synthetic = fit_setup(
        ImageFolderCSVDataModule(
            str(image_root), "train_noisy.csv", noise_type="symmetric", noise_rate=1.0, image_size=8
        )
    )
    assert torch.equal(synthetic.clean_labels, torch.arange(6) % 3) and synthetic.noise_info.noise_rate == 1.0


# ------------------------------------------------------------------ bad arguments
BAD_ARGS = [
    ("noise_rate", MNIST1DDataModule, {"noise_rate": 1.5}, ["noise_rate", "1.5"]),
    ("batch_size", MNIST1DDataModule, {"batch_size": 0}, ["batch_size", "0"]),
    ("num_workers", MNIST1DDataModule, {"num_workers": -1}, ["num_workers", "-1"]),
    ("noise_type", MNIST1DDataModule, {"noise_type": "gaussian"}, ["noise_type", "'gaussian'"]),
    ("cifar_n_on_mnist", MNIST1DDataModule, {"noise_type": "cifar_n"}, ["noise_type", "'cifar_n'"]),
    ("noise_seed", MNIST1DDataModule, {"noise_seed": -3}, ["noise_seed", "-3"]),
    ("exact_rate", MNIST1DDataModule, {"exact_rate": "yes"}, ["exact_rate", "'yes'"]),
    ("class_map_self", MNIST1DDataModule, {"noise_type": "asymmetric", "class_map": {3: 3}}, ["class_map", "{3: 3}"]),
    ("class_map_missing", MNIST1DDataModule, {"noise_type": "asymmetric"}, ["class_map", "None"]),
    ("noise_file_missing", MNIST1DDataModule, {"noise_type": "file"}, ["noise_file", "None"]),
    (
        "noise_file_absent",
        MNIST1DDataModule,
        {"noise_type": "file", "noise_file": "nope.pt"},
        ["noise_file", "'nope.pt'"],
    ),
    ("label_key_unused", MNIST1DDataModule, {"noise_label_key": "worse_label"}, ["noise_label_key", "'worse_label'"]),
    ("save_suffix", MNIST1DDataModule, {"save_noisy_labels": "out.npy"}, ["save_noisy_labels", "'out.npy'"]),
    ("num_samples", MNIST1DDataModule, {"num_samples": 5}, ["num_samples", "5"]),
    ("train_split", MNIST1DDataModule, {"train_split": 1.0}, ["train_split", "1.0"]),
    ("train_split_empty", MNIST1DDataModule, {"num_samples": 10, "train_split": 0.05}, ["train_split", "0.05"]),
    ("data_seed", MNIST1DDataModule, {"data_seed": 2**32}, ["data_seed", str(2**32)]),
    ("test_fraction", DigitsDataModule, {"test_fraction": 0.0}, ["test_fraction", "0.0"]),
    ("dataset", SyntheticCIFAR, {"dataset": "svhn"}, ["dataset", "'svhn'"]),
    ("download", SyntheticCIFAR, {"download": 1}, ["download", "1"]),
]


@pytest.mark.parametrize(("cls", "kwargs", "fragments"), [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_bad_args_fail_in_init(cls, kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert FakeCIFAR10.calls == []  # no data was built


def test_cifar_n_key_checked_in_init(tmp_path: Path) -> None:
    torch.save({"clean_label": np.zeros(3)}, tmp_path / "n.pt")
    kwargs = {"noise_type": "cifar_n", "noise_file": str(tmp_path / "n.pt")}
    with pytest.raises(
        ValueError, match=r"noise_label_key must be one of .* for dataset='cifar100', got 'worse_label'"
    ):
        SyntheticCIFAR(dataset="cifar100", noise_label_key="worse_label", **kwargs)
    with pytest.raises(ValueError, match=r"noise_label_key must be one of .* got None"):
        SyntheticCIFAR(**kwargs)
    assert FakeCIFAR10.calls == []


def test_image_csv_bad_args(image_root: Path) -> None:
    root = str(image_root)
    with pytest.raises(ValueError, match=r"noise_type must be one of .* got 'instance'"):
        ImageFolderCSVDataModule(root, "train_noisy.csv", noise_type="instance")
    with pytest.raises(ValueError, match="noise_type='symmetric' adds noise to the 'label' column"):
        ImageFolderCSVDataModule(root, "train.csv", noise_type="symmetric")
    with pytest.raises(ValueError, match=r"train_csv must be an existing file, got 'missing.csv'"):
        ImageFolderCSVDataModule(root, "missing.csv")
    with pytest.raises(ValueError, match=r"CSV labels must be in \[0, 2\) for num_classes=2, got values in \[0, 2\]"):
        ImageFolderCSVDataModule(root, "train_noisy.csv", num_classes=2)
    (image_root / "negative.csv").write_text("path,label\nimg0.png,-1\nimg1.png,-1\n")
    negative = r"CSV labels must be in \[0, num_classes\), got values in \[-1, -1\]; 2 of 2 are negative, the first at"
    with pytest.raises(ValueError, match=negative):
        ImageFolderCSVDataModule(root, "negative.csv")  # not "num_classes (inferred ...) must be >= 2, got 0"
    (image_root / "bad.csv").write_text("file,label\nimg0.png,1\n")
    with pytest.raises(ValueError, match="train_csv must be a CSV with a 'path,label"):
        ImageFolderCSVDataModule(root, "bad.csv")
    with pytest.raises(ValueError, match="root must be an existing directory, got '/no/such/dir'"):
        ImageFolderCSVDataModule("/no/such/dir", "train.csv")


def test_exclude_file_leaves_out_exactly_the_listed_samples(tmp_path: Path) -> None:
    excluded = torch.tensor([0, 5, 399, 17])
    torch.save(excluded, tmp_path / "removed.pt")
    dm = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.2, exclude_file=str(tmp_path / "removed.pt")))
    seen = torch.cat([index for _, _, index in dm.train_dataloader()])
    assert sorted(seen.tolist()) == sorted(set(range(400)) - set(excluded.tolist()))
    assert dm.noisy_labels.shape == (400,)  # indices keep their meaning for per-sample callbacks
    for x, y, index in dm.train_dataloader():
        assert torch.equal(y, dm.noisy_labels[index])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.tensor([0.5, 1.0]), "must hold a 1-D integer tensor"),
        (torch.tensor([3, 400]), r"indices must be in \[0, 400\), got \[3, 400\]"),
        (torch.arange(400), "leaves out every one of the 400 training samples"),
    ],
)
def test_bad_exclude_file_is_rejected(tmp_path: Path, content: torch.Tensor, message: str) -> None:
    torch.save(content, tmp_path / "removed.pt")
    dm = MNIST1DDataModule(**SMALL, exclude_file=str(tmp_path / "removed.pt"))
    with pytest.raises(ValueError, match=message):
        fit_setup(dm)
    assert dm._train is None and dm._noise is None  # nothing half set up
    with pytest.raises(ValueError, match="exclude_file must be an existing file"):
        MNIST1DDataModule(**SMALL, exclude_file=str(tmp_path / "missing.pt"))


# -- the clean subset (for methods that learn from a few clean labels, e.g. CNN-CRF) ---------------------


def test_clean_subset_is_a_seeded_draw_with_the_true_labels() -> None:
    dm = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.4, noise_seed=3, clean_subset_size=40))
    index, labels = dm.clean_subset
    assert index.shape == labels.shape == (40,) and index.dtype == labels.dtype == torch.int64
    assert torch.equal(index, index.unique()) and 0 <= int(index.min()) and int(index.max()) < dm.noisy_labels.numel()
    assert torch.equal(labels, dm.clean_labels[index])
    assert bool((dm.noisy_labels[index] != labels).any())  # the subset keeps its noisy labels for training
    again = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.2, noise_seed=3, clean_subset_size=40)).clean_subset[0]
    other = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.4, noise_seed=4, clean_subset_size=40)).clean_subset[0]
    assert torch.equal(index, again)  # a stream of the seed of its own: the noise rate does not move it
    assert not torch.equal(index, other)
    none = fit_setup(MNIST1DDataModule(**SMALL, noise_rate=0.4)).clean_subset
    assert none[0].numel() == none[1].numel() == 0


def test_bad_clean_subset_size_is_refused_before_any_state() -> None:
    with pytest.raises(ValueError, match="clean_subset_size must be an int >= 0, got -1"):
        MNIST1DDataModule(**SMALL, clean_subset_size=-1)
    dm = MNIST1DDataModule(**SMALL, clean_subset_size=10_000)
    with pytest.raises(ValueError, match=r"clean_subset_size must be at most the \d+ training samples, got 10000"):
        dm.setup("fit")
    with pytest.raises(RuntimeError, match="setup\\('fit'\\) must run"):
        dm.noise_info
