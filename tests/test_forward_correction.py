"""ForwardCorrectionCallback: forward loss correction for an unmodified module (Patrini et al., CVPR 2017)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import (
    LossProbe,
    NUM_CLASSES,
    TABLE,
    PlainClassifier,
    ScriptedClassifier,
    SpawnDDPStrategy,
    scripted_data,
    toy_dataset,
    toy_loader,
    trainer,
)
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import ForwardCorrectionCallback, NoisyLabelMonitor, SampleStateCallback
from lightning_noisy.callbacks.forward_correction import estimate_transition_matrix_sharded, forward_correction_transform
from lightning_noisy.data import MNIST1DDataModule, NoisyLabelDataset, TensorPairDataset
from lightning_noisy.losses import estimate_transition_matrix, forward_corrected_loss
from lightning_noisy.methods import NoisyClassifier
from lightning_noisy.state import StepContext
from lightning_noisy.state.layout import RowLayout

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
T3 = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.3, 0.7]]


# -- the transform ------------------------------------------------------------------------------------


def test_transform_is_the_forward_corrected_log_posterior_and_stable() -> None:
    transition = torch.tensor(T3)
    logits = torch.tensor([[1.0, -2.0, 0.5], [300.0, -300.0, 0.0], [-1e4, 0.0, 1e4], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2, 0, 1])
    out = forward_correction_transform(transition)(logits)
    assert out.dtype == logits.dtype and bool(torch.isfinite(out).all())
    reference = torch.logsumexp(torch.log_softmax(logits, 1)[:, :, None] + transition.clamp_min(1e-12).log()[None], 1)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))  # already normalised: rows of T sum to 1
    torch.testing.assert_close(F.cross_entropy(out, targets), forward_corrected_loss(logits, targets, transition))


def test_transform_keeps_the_dtype_under_autocast() -> None:
    logits = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_correction_transform(torch.tensor(T3))(logits)
    assert out.dtype == torch.bfloat16
    expected = torch.log(torch.softmax(logits.float(), 1) @ torch.tensor(T3))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad.float()).all())


# -- a given matrix ------------------------------------------------------------------------------------


def test_given_matrix_makes_the_unmodified_cross_entropy_forward_corrected() -> None:
    dataset = toy_dataset(n=8)
    torch.manual_seed(0)
    model = PlainClassifier(lr=1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    callback = ForwardCorrectionCallback(transition=T3)
    trainer(callbacks=[callback]).fit(model, toy_loader(dataset, batch_size=8))
    assert callback.active and torch.equal(callback.transition, torch.tensor(T3))
    reference = PlainClassifier()
    reference.load_state_dict(start)
    x = torch.stack([dataset[i][0] for i in range(8)])
    forward_corrected_loss(reference.net(x), dataset.noisy_labels[:8], torch.tensor(T3)).backward()
    for name, param in reference.net.named_parameters():
        torch.testing.assert_close(model.net.get_parameter(name), param.detach() - param.grad)
    model.eval()
    assert torch.equal(model(x), model.net(x))  # outside training steps the module is untouched
    assert "training_step" not in vars(model)  # the batch contract is released after fit


class RawLogitsProbe(SampleStateCallback):
    """Another callback on the same Trainer: what it sees as the step's logits, and what the module returned."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []
        self.returned: list[Tensor] = []

    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        assert context.logits is not None
        self.seen.append(context.logits.detach().clone())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.returned.append(outputs["logits"].detach().clone())
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_true_matrix_is_read_from_the_datamodule_and_callbacks_see_raw_logits(tmp_path: Path) -> None:
    dm = MNIST1DDataModule(num_samples=300, batch_size=64, noise_type="symmetric", noise_rate=0.4, noise_seed=0)
    callback, probe = ForwardCorrectionCallback(transition="true"), RawLogitsProbe()
    pl.seed_everything(0, verbose=False)
    fit = trainer(callbacks=[NoisyLabelMonitor(), callback, probe], limit_train_batches=2, limit_val_batches=1,
                  logger=TensorBoardLogger(tmp_path, name="", version=""))
    fit.fit(NoisyClassifier(backbone="cnn1d", num_classes=10), dm)
    true = dm.noise_info.transition_matrix.float()
    assert torch.equal(callback.transition, true) and torch.equal(callback.true_transition, true)
    assert callback.active and float(true.diag().mean()) < 0.8  # really noisy: not the identity
    # NoisyClassifier returns the module's forward output, i.e. the corrected logits; callbacks get the raw ones
    transform = forward_correction_transform(true)
    for seen, returned in zip(probe.seen, probe.returned, strict=True):
        assert not torch.allclose(seen, returned)
        torch.testing.assert_close(transform(seen), returned)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    (text,) = accumulator.Tensors("noisy/transition_matrix/text_summary")
    assert b"true (realised noise) transition matrix" in text.tensor_proto.string_val[0]


def test_true_matrix_without_clean_labels_is_an_error() -> None:
    base = toy_dataset(n=8)
    unknown = NoisyLabelDataset(TensorPairDataset(base.dataset.x, base.noisy_labels), base.noisy_labels, None,
                                NUM_CLASSES)
    model = PlainClassifier()
    with pytest.raises(ValueError, match=r"transition='true'.*noise_info.transition_matrix"):
        trainer(callbacks=[ForwardCorrectionCallback(transition="true")]).fit(model, toy_loader(unknown))
    assert "training_step" not in vars(model)  # released after the failure


# -- an estimated matrix -------------------------------------------------------------------------------


def scripted_losses(epoch: int, transition: Tensor | None) -> Tensor:
    """The loss the scripted module's single batch has in ``epoch``, corrected by ``transition`` or not."""
    data = scripted_data()
    logits, labels = TABLE[epoch].log(), data.noisy_labels
    return F.cross_entropy(logits, labels) if transition is None else forward_corrected_loss(logits, labels, transition)


def test_estimate_is_made_at_the_chosen_epoch_from_the_recorded_predictions() -> None:
    callback, losses = ForwardCorrectionCallback(estimate_epoch=1), LossProbe()
    fit = trainer(max_epochs=3, callbacks=[callback, losses])
    fit.fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=10, shuffle=True))
    expected = estimate_transition_matrix(TABLE[1], percentile=97.0, filter_outlier=True)
    torch.testing.assert_close(callback.transition, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, estimate_transition_matrix(TABLE[0]))  # not another epoch's
    assert not torch.allclose(expected, estimate_transition_matrix(TABLE[2]))
    assert callback.active
    # the labels are clean here, so the true matrix is the identity
    mae = (expected - torch.eye(NUM_CLASSES)).abs().mean()
    torch.testing.assert_close(fit.callback_metrics["noisy/transition_mae"], mae, rtol=0, atol=1e-6)
    # plain cross-entropy up to the estimate epoch, forward-corrected from the next one
    for epoch in (0, 1):
        torch.testing.assert_close(losses.losses[epoch][0], scripted_losses(epoch, None))
    torch.testing.assert_close(losses.losses[2][0], scripted_losses(2, expected))


def test_estimate_options_are_passed_to_the_estimator() -> None:
    callback = ForwardCorrectionCallback(estimate_epoch=0, percentile=50.0, filter_outlier=False)
    trainer(max_epochs=1, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=4))
    torch.testing.assert_close(callback.transition, estimate_transition_matrix(TABLE[0], filter_outlier=False))
    callback = ForwardCorrectionCallback(estimate_epoch=0, percentile=50.0)
    trainer(max_epochs=1, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data(), batch_size=4))
    torch.testing.assert_close(callback.transition, estimate_transition_matrix(TABLE[0], percentile=50.0))


def test_training_that_ends_before_the_estimate_epoch_warns() -> None:
    callback = ForwardCorrectionCallback(estimate_epoch=5)
    with pytest.warns(UserWarning, match="before estimate_epoch=5"):
        trainer(max_epochs=1, callbacks=[callback]).fit(ScriptedClassifier(), DataLoader(scripted_data()))
    assert callback.transition is None and not callback.active


# -- sharded estimate: bit for bit the estimate of the gathered rows ---------------------------------------


def _check_sharded_estimate(rank: int, world_size: int) -> None:
    for n, c in ((37, 5), (11, 2)):  # with 2 classes on 3 ranks, one rank owns no column
        generator = torch.Generator().manual_seed(n)
        probs = torch.softmax(torch.randint(0, 4, (n, c), generator=generator).float(), 1)  # few values: many ties
        seen = torch.ones(n, dtype=torch.bool)
        seen[[3, 7, n - 1]] = False  # rows no rank recorded (drop_last)
        layout = RowLayout(n, world_size, rank)
        index = torch.arange(layout.start, layout.stop)
        index = index[seen[index]]
        for percentile, filter_outlier in ((97.0, True), (50.0, True), (100.0, True), (97.0, False)):
            options = {"percentile": percentile, "filter_outlier": filter_outlier}
            got = estimate_transition_matrix_sharded(index, probs[index], layout, **options)
            assert torch.equal(got, estimate_transition_matrix(probs[seen], **options)), (rank, n, options)
        bad = probs[index].clone()
        if rank == world_size - 1:
            bad[0] *= 2
        with pytest.raises(ValueError, match="distributions|sums to"):  # on every rank: none waits for the others
            estimate_transition_matrix_sharded(index, bad, layout)


@pytest.mark.ddp
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_estimate_equals_the_estimate_of_the_gathered_rows(world_size: int) -> None:
    run_distributed(_check_sharded_estimate, world_size=world_size)


class TransitionToFile(ForwardCorrectionCallback):
    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({"transition": self.transition, "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_sharded_and_replicated_estimates_train_the_same_model(tmp_path: Path) -> None:
    runs = {}
    for shard_state in (None, False):
        pl.seed_everything(0, verbose=False)
        out = tmp_path / f"{shard_state}.pt"
        callback = TransitionToFile(out, estimate_epoch=1, shard_state=shard_state, storage_dtype="bfloat16")
        trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3, callbacks=[callback]).fit(
            PlainClassifier(lr=0.5), DataLoader(toy_dataset(n=29), batch_size=4, shuffle=True, drop_last=True)
        )
        runs[shard_state] = torch.load(out)
    assert runs[None]["transition"] is not None and torch.equal(runs[None]["transition"], runs[False]["transition"])
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


# -- resume ---------------------------------------------------------------------------------------------


def _scripted_run(tmp_path: Path, max_epochs: int, estimate_epoch: int, ckpt: Path | None = None,
                  ) -> tuple[ForwardCorrectionCallback, LossProbe, ScriptedClassifier]:
    callback, losses, model = ForwardCorrectionCallback(estimate_epoch=estimate_epoch), LossProbe(), ScriptedClassifier()
    trainer(max_epochs=max_epochs, callbacks=[callback, losses], default_root_dir=tmp_path).fit(
        model, DataLoader(scripted_data(), batch_size=10), ckpt_path=None if ckpt is None else str(ckpt)
    )
    return callback, losses, model


def test_resume_after_the_estimate_restores_the_matrix_and_the_correction(tmp_path: Path) -> None:
    first, _, model = _scripted_run(tmp_path / "first", max_epochs=1, estimate_epoch=0)
    assert first.transition is not None and first.active
    ckpt = tmp_path / "epoch1.ckpt"
    model.trainer.save_checkpoint(ckpt)
    resumed, losses, _ = _scripted_run(tmp_path / "resumed", max_epochs=2, estimate_epoch=0, ckpt=ckpt)
    assert torch.equal(resumed.transition, first.transition) and resumed.active
    assert list(losses.losses) == [1]
    torch.testing.assert_close(losses.losses[1][0], scripted_losses(1, first.transition))


@pytest.mark.filterwarnings("ignore:.*before estimate_epoch=1")
def test_resume_before_the_estimate_estimates_at_the_chosen_epoch(tmp_path: Path) -> None:
    first, _, model = _scripted_run(tmp_path / "first", max_epochs=1, estimate_epoch=1)
    assert first.transition is None
    ckpt = tmp_path / "epoch1.ckpt"
    model.trainer.save_checkpoint(ckpt)
    resumed, _, _ = _scripted_run(tmp_path / "resumed", max_epochs=2, estimate_epoch=1, ckpt=ckpt)
    torch.testing.assert_close(resumed.transition, estimate_transition_matrix(TABLE[1]), rtol=0, atol=1e-6)


def test_checkpoint_with_a_matrix_of_another_size_is_rejected(tmp_path: Path) -> None:
    _, _, model = _scripted_run(tmp_path / "first", max_epochs=1, estimate_epoch=0)
    ckpt = tmp_path / "epoch1.ckpt"
    model.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if "ForwardCorrectionCallback" in k]
    state["callbacks"][key]["extra"]["transition"] = torch.eye(2)
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"checkpoint's transition matrix: transition must have shape \[3, 3\]"):
        _scripted_run(tmp_path / "resumed", max_epochs=2, estimate_epoch=0, ckpt=ckpt)


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transition": [[0.5, 0.4], [0.0, 1.0]]}, r"transition rows must sum to 1.*row 0 sums to 0.9.*got transition="),
        ({"transition": [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]}, r"transition must be a square \[C, C\] matrix.*got \[\["),
        ({"transition": [[1.2, -0.2], [0.0, 1.0]]}, r"transition entries must be finite and non-negative"),
        ({"transition": "oracle"}, r"transition must be .*'estimate' or 'true', got 'oracle'"),
        ({"transition": [["a", "b"], ["c", "d"]]}, r"transition must be a square"),
        ({"estimate_epoch": -1}, r"estimate_epoch must be an int >= 0, got -1"),
        ({"estimate_epoch": 1.5}, r"estimate_epoch must be an int >= 0, got 1.5"),
        ({"percentile": 0.0}, r"percentile must be a number in \(0, 100\], got 0.0"),
        ({"percentile": 100.5}, r"percentile must be a number in \(0, 100\], got 100.5"),
        ({"percentile": math.nan}, r"percentile must be a number in \(0, 100\], got nan"),
        ({"filter_outlier": "yes"}, r"filter_outlier must be a bool, got 'yes'"),
        ({"storage_topk": 3}, r"storage_topk must be None: .* reads whole rows, got 3"),
        ({"storage_dtype": "int8"}, r"storage_dtype must be one of"),
        ({"shard_state": "yes"}, r"shard_state must be"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ForwardCorrectionCallback(**kwargs)


def test_matrix_of_the_wrong_size_for_the_data_is_rejected() -> None:
    model = PlainClassifier()
    callback = ForwardCorrectionCallback(transition=[[0.9, 0.1], [0.1, 0.9]])
    with pytest.raises(ValueError, match=r"transition must be \[3, 3\] for the 3 classes of the data, got a \[2, 2\]"):
        trainer(callbacks=[callback]).fit(model, toy_loader(toy_dataset(n=8)))
    assert "training_step" not in vars(model)


class NetOnlyClassifier(PlainClassifier):
    """Returns its logits under "logits" but computes them without calling the module: nothing to correct."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def test_module_whose_logits_bypass_its_forward_is_an_error_not_a_silent_uncorrected_loss() -> None:
    with pytest.raises(RuntimeError, match=r"calling the module itself \(`logits = self\(x\)`\)"):
        trainer(callbacks=[ForwardCorrectionCallback(transition=T3)]).fit(
            NetOnlyClassifier(), toy_loader(toy_dataset(n=8))
        )


# -- configs -----------------------------------------------------------------------------------------


def build(config: str, *overrides: str) -> Any:
    from lightning_noisy.cli import build_cli

    return build_cli(args=["--config", str(CONFIGS / config), *overrides], run=False, save_config_callback=None)


CLI_IN_PYTEST = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter")


@CLI_IN_PYTEST
@pytest.mark.parametrize(
    ("config", "loss", "loss_kwargs", "mixup_alpha"),
    [
        ("mnist1d_mae.yaml", "mae", None, 0.0),
        ("mnist1d_gce.yaml", "gce", {"q": 0.7}, 0.0),
        ("mnist1d_sce.yaml", "sce", {"alpha": 0.1, "beta": 1.0, "log_clamp": -4.0}, 0.0),
        ("mnist1d_bootstrap.yaml", "bootstrap_soft", {"beta": 0.95}, 0.0),
        ("mnist1d_mixup.yaml", "ce", None, 1.0),
        ("mnist1d_forward.yaml", "ce", None, 0.0),
    ],
)
def test_loss_configs_differ_from_the_ce_config_only_in_the_loss(
    config: str, loss: str, loss_kwargs: dict[str, float] | None, mixup_alpha: float
) -> None:
    cli, ce = build(config), build("mnist1d_ce.yaml")
    hparams, reference = dict(cli.model.hparams), dict(ce.model.hparams)
    assert (hparams.pop("loss"), hparams.pop("loss_kwargs"), hparams.pop("mixup_alpha")) == (loss, loss_kwargs, mixup_alpha)
    for key in ("loss", "loss_kwargs", "mixup_alpha"):
        reference.pop(key)
    assert hparams == reference
    assert cli.config["data"] == ce.config["data"]
    trainer_args, reference_args = dict(cli.config["trainer"]), dict(ce.config["trainer"])
    callbacks = trainer_args.pop("callbacks")
    assert trainer_args == {k: v for k, v in reference_args.items() if k != "callbacks"}
    assert callbacks[: len(reference_args["callbacks"])] == reference_args["callbacks"]
    assert cli.config["seed_everything"] == ce.config["seed_everything"]


@CLI_IN_PYTEST
def test_forward_config_estimates_and_the_true_matrix_is_one_override_away() -> None:
    (callback,) = [c for c in build("mnist1d_forward.yaml").trainer.callbacks if isinstance(c, ForwardCorrectionCallback)]
    assert (callback.mode, callback.estimate_epoch, callback.percentile, callback.filter_outlier) == (
        "estimate", 15, 97.0, True
    )
    cli = build("mnist1d_forward.yaml", "--trainer.callbacks.transition=true")
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ForwardCorrectionCallback)]
    assert callback.mode == "true"
