"""DivideMix: the pure pieces against hand-computed values, a short MNIST-1D run, resume parity, bad arguments."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_noisy.callbacks.base import train_eval_loader
from lightning_noisy.callbacks.co_divide import clean_probability, normalise_losses, per_class_clean_probability
from lightning_noisy.methods.dividemix import DivideMix, default_augment, labelled_slice, linear_rampup, uniform_prior_penalty
from lightning_noisy.methods.semi_supervised import co_guess, co_refine, mixmatch_lambda, sharpen
from tests.helpers import SpawnDDPStrategy, trainer


# ---------------------------------------------------------------------------------------------- pure functions
def test_sharpen_by_hand() -> None:
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    out = sharpen(p, 0.5)
    expected = torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sharpen(p, 1.0), p)


def test_mixmatch_lambda_at_least_half() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = [mixmatch_lambda(4.0, generator) for _ in range(500)]
    assert all(0.5 <= d <= 1.0 for d in draws)
    assert max(draws) > 0.7  # really random, not constant 0.5
    assert mixmatch_lambda(4.0, torch.Generator().manual_seed(3)) == mixmatch_lambda(4.0, torch.Generator().manual_seed(3))


def test_co_refine_by_hand() -> None:
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    w = torch.tensor([0.8, 0.5])
    # row 0: 0.8 [1, 0] + 0.2 [0.5, 0.5] = [0.9, 0.1] -> [0.81, 0.01] / 0.82
    # row 1: 0.5 [0, 1] + 0.5 [0.8, 0.2] = [0.4, 0.6] -> [0.16, 0.36] / 0.52
    expected = torch.tensor([[0.81 / 0.82, 0.01 / 0.82], [0.16 / 0.52, 0.36 / 0.52]])
    torch.testing.assert_close(co_refine(y, p, w, 0.5), expected)


def test_co_guess_by_hand() -> None:
    p_net = torch.tensor([[[0.6, 0.4]], [[0.8, 0.2]]])
    p_peer = torch.tensor([[[0.4, 0.6]], [[0.6, 0.4]]])
    # mean of the four = [0.6, 0.4] -> sharpened [0.36, 0.16] / 0.52
    torch.testing.assert_close(co_guess(p_net, p_peer, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))


def test_labelled_slice_by_hand() -> None:
    order = torch.arange(10, 20)  # 10 labelled samples, batches of 3
    assert labelled_slice(order, 0, 3).tolist() == [10, 11, 12]
    assert labelled_slice(order, 3, 3).tolist() == [19]  # the short last batch
    assert labelled_slice(order, 4, 3).numel() == 0  # the pass is over
    # two ranks: step 0 takes positions 0-2 (rank 0) and 3-5 (rank 1), step 1 takes 6-8 and 9
    assert [labelled_slice(order, k, 3, 2, r).tolist() for k in (0, 1, 2) for r in (0, 1)] == [
        [10, 11, 12], [13, 14, 15], [16, 17, 18], [19], [], []]


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, 3), "step must be an int >= 0, got -1"), ((0, 0), "batch_size must be an int >= 1, got 0"),
     ((0, 3, 2, 2), r"rank must be an int in \[0, 2\), got 2"), ((0, 3, 0), "world_size must be an int >= 1")],
)
def test_labelled_slice_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        labelled_slice(torch.arange(4), *args)


@pytest.mark.parametrize(
    ("progress", "expected"), [(0.0, 0.0), (10.0, 0.0), (14.0, 6.25), (18.0, 12.5), (26.0, 25.0), (40.0, 25.0)]
)
def test_linear_rampup(progress: float, expected: float) -> None:
    assert linear_rampup(progress, 10, 25.0) == pytest.approx(expected)


def test_uniform_prior_penalty_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    expected = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert float(uniform_prior_penalty(probs.log())) == pytest.approx(expected, rel=1e-5)
    assert float(uniform_prior_penalty(torch.zeros(3, 4))) == pytest.approx(0.0, abs=1e-6)


def test_default_augment_shape_and_seed() -> None:
    x = torch.randn(5, 1, 40)
    a = default_augment(x, torch.Generator().manual_seed(1))
    b = default_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert default_augment(torch.randn(2, 3, 8, 8), torch.Generator().manual_seed(0)).shape == (2, 3, 8, 8)


def test_module_augmentation_follows_its_noise_and_shift_arguments() -> None:
    x = torch.randn(64, 1, 40)
    still = DivideMix(augment_noise_std=0.0, augment_max_shift=0)
    assert torch.equal(still._augment(x, torch.Generator().manual_seed(0)), x)
    shifted = DivideMix(augment_noise_std=0.0, augment_max_shift=3)._augment(x, torch.Generator().manual_seed(0))
    rolls = torch.stack([torch.roll(x, s, dims=-1) for s in range(-3, 4)])  # [7, B, 1, L]
    matches = (rolls == shifted[None]).all(-1).all(-1)  # [7, B]: which roll each row is
    assert bool(matches.any(0).all())  # every row is one of the rolls by -3..3
    assert int(matches[[0, 6]].any(0).sum()) > 0  # and the largest shifts occur


def test_default_augment_scale_by_hand() -> None:
    x = torch.randn(6, 1, 40)
    out = default_augment(x, torch.Generator().manual_seed(3), noise_std=0.0, max_shift=0, max_scale=0.25)
    factors = 1 + (2 * torch.rand(6, generator=torch.Generator().manual_seed(3)) - 1) * 0.25  # the first draw
    torch.testing.assert_close(out, x * factors.view(6, 1, 1))


def test_default_augment_trend_is_a_bounded_line() -> None:
    x = torch.randn(200, 1, 40)
    out = default_augment(x, torch.Generator().manual_seed(4), noise_std=0.0, max_shift=0, max_trend=0.5)
    added = (out - x).squeeze(1)  # [B, L]: per sample c * std * linspace(-1, 1)
    std = x.flatten(1).std(dim=1, unbiased=False)
    slope = added[:, -1] / std  # c, since the ramp ends at 1
    torch.testing.assert_close(added, (slope * std)[:, None] * torch.linspace(-1, 1, 40)[None, :])
    assert float(slope.abs().max()) <= 0.5 and float(slope.abs().max()) > 0.4  # within the bound, and reaching it
    assert float(slope.min()) < 0 < float(slope.max())


def test_default_augment_without_scale_or_trend_draws_as_before() -> None:
    # with both at 0 the generator's draws are unchanged: noise, then the shift
    x = torch.randn(8, 1, 40)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=generator)
    shift = torch.randint(-2, 3, (8,), generator=generator)
    expected = torch.stack([torch.roll(row, int(k), dims=-1) for row, k in
                            zip(x + 0.05 * x.flatten(1).std(1, unbiased=False).view(8, 1, 1) * noise, shift)])
    torch.testing.assert_close(default_augment(x, torch.Generator().manual_seed(5)), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_augment": 1}, "warmup_augment must be a bool, got 1"),
        ({"divide_per_class": "yes"}, "divide_per_class must be a bool, got 'yes'"),
        ({"gmm_max_fit_samples": 1}, "^gmm_max_fit_samples must be None or an integer >= 2, got 1"),
        ({"labelled_batch_size": 0}, "labelled_batch_size must be an int >= 1 or None, got 0"),
        ({"labelled_batch_size": 8.0}, "labelled_batch_size must be an int >= 1 or None, got 8.0"),
        ({"p_threshold": 1.0}, "p_threshold"),
        ({"lambda_u": -1.0}, "lambda_u"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": -2.0}, "alpha"),
        ({"penalty_weight": -0.1}, "penalty_weight"),
        ({"rampup_length": 0}, "rampup_length"),
        ({"lr": 0.0}, "lr"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"num_classes": 1}, "num_classes"),
        ({"augment": 3}, "augment"),
        ({"augment_noise_std": -0.1}, "augment_noise_std must be a finite number >= 0, got -0.1"),
        ({"augment_noise_std": float("inf")}, "augment_noise_std must be a finite number >= 0, got inf"),
        ({"augment_max_shift": 1.5}, "augment_max_shift must be an int >= 0, got 1.5"),
        ({"augment_max_shift": -1}, "augment_max_shift must be an int >= 0, got -1"),
        ({"loss_average_epochs": 0}, "loss_average_epochs must be an int >= 1, got 0"),
        ({"augment_max_scale": 1.0}, r"augment_max_scale must be a number in \[0, 1\), got 1.0"),
        ({"augment_max_scale": -0.1}, r"augment_max_scale must be a number in \[0, 1\), got -0.1"),
        ({"augment_max_trend": -1.0}, "augment_max_trend must be a finite number >= 0, got -1.0"),
        ({"augment_max_trend": float("nan")}, "augment_max_trend must be a finite number >= 0, got nan"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DivideMix(**kwargs)


def test_bad_function_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sharpen(torch.ones(2, 2), -1.0)
    with pytest.raises(ValueError, match="p_net"):
        co_guess(torch.ones(3, 2, 2), torch.ones(3, 2, 2), 0.5)
    with pytest.raises(ValueError, match="w must"):
        co_refine(torch.ones(2, 2), torch.ones(2, 2), torch.ones(3))


# ---------------------------------------------------------------------------------------------- training
def _data(num_samples: int, batch_size: int = 128):
    from lightning_noisy.data import MNIST1DDataModule

    return MNIST1DDataModule(num_samples=num_samples, batch_size=batch_size, noise_type="symmetric",
                             noise_rate=0.4, noise_seed=0)


@pytest.mark.slow
def test_short_mnist1d_run_divides_well(one_thread: None) -> None:
    """40% symmetric noise: after 8 warm-up epochs the co-divide separates clean from noisy samples."""
    # 3,200 training samples, AdamW 3e-3: measured AUROC ~0.89-0.91 at epochs 8-10, ~8 s uncontended
    # (2,000 samples gave only ~0.8 at the first co-divide, too close to the bar)
    data = _data(4000)
    model = DivideMix(backbone="cnn1d", warmup_epochs=8, lambda_u=25.0, seed=0, optimizer="adamw", lr=3e-3,
                      weight_decay=0.0)
    fit = trainer(max_epochs=10)
    fit.fit(model, datamodule=data)
    auroc = float(fit.callback_metrics["noisy/codivide_auroc"])
    assert auroc > 0.8, auroc
    assert float(fit.callback_metrics["noisy/codivide_auroc_b"]) > 0.8
    assert 0.3 < float(fit.callback_metrics["codivide/labelled_fraction"]) < 0.95
    assert model.prob_a.shape == (3200,) and torch.isfinite(model.prob_a).all()
    assert float(fit.callback_metrics["test/acc_best"]) >= float(fit.callback_metrics["test/acc"])


class WarmupInputRecorder(DivideMix):
    """Records each training batch's inputs and the inputs each network's warm-up loss receives."""

    def training_step(self, batch, batch_idx):
        self.batches.append(batch[0].clone())
        return super().training_step(batch, batch_idx)

    def warmup_loss(self, net, x, y):
        self.seen.append((net is self.net_a, x.clone()))
        return super().warmup_loss(net, x, y)


def _record_warmup(**kwargs) -> WarmupInputRecorder:
    model = WarmupInputRecorder(backbone="cnn1d", warmup_epochs=2, seed=0, **kwargs)
    model.batches, model.seen = [], []
    trainer(max_epochs=1).fit(model, datamodule=_data(300, batch_size=64))
    assert len(model.seen) == 2 * len(model.batches) == 2 * 4  # both networks, 4 batches of 240 samples
    assert [is_a for is_a, _ in model.seen] == [True, False] * 4
    return model


@pytest.mark.parametrize(("warmup_augment", "factor"), [(True, 2.0), (False, 1.0)])
def test_warmup_feeds_the_augmented_batch_when_asked(one_thread: None, warmup_augment: bool, factor: float) -> None:
    model = _record_warmup(augment=lambda x: 2.0 * x, warmup_augment=warmup_augment)
    for i, x in enumerate(model.batches):
        for _, seen in model.seen[2 * i: 2 * i + 2]:
            torch.testing.assert_close(seen, factor * x, rtol=0, atol=0)


def test_warmup_default_augmentation_differs_per_network_and_repeats(one_thread: None) -> None:
    first, second = _record_warmup(warmup_augment=True), _record_warmup(warmup_augment=True)
    for i, x in enumerate(first.batches):
        (_, to_a), (_, to_b) = first.seen[2 * i: 2 * i + 2]
        assert not torch.equal(to_a, x) and not torch.equal(to_b, x) and not torch.equal(to_a, to_b)
        assert to_a.shape == x.shape
        torch.testing.assert_close(second.seen[2 * i][1], to_a, rtol=0, atol=0)  # seeded by (seed, epoch, batch)


class LabelledBatchRecorder(DivideMix):
    """Records, per MixMatch step and network, the labelled batch and whether its optimiser stepped."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.labelled_sets = [torch.nonzero(peer > self.hparams.p_threshold).flatten().cpu()
                              for peer in (self.prob_b, self.prob_a)]  # network a learns from b's division

    def semi_supervised_loss(self, net, peer, batch, lambda_u, generator):
        self.batches.append((net is self.net_a, int(batch.inputs.shape[0]), int(batch.unlabelled.shape[0]),
                             batch.clean_probability.clone()))
        return super().semi_supervised_loss(net, peer, batch, lambda_u, generator)


@pytest.mark.parametrize("labelled_batch_size", [None, 64])
def test_each_network_passes_once_over_its_peers_labelled_set(one_thread: None, labelled_batch_size) -> None:
    model = LabelledBatchRecorder(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0,
                                  optimizer="adamw", lr=1e-3, labelled_batch_size=labelled_batch_size)
    model.batches = []
    trainer(max_epochs=2).fit(model, datamodule=_data(400, batch_size=32))  # 320 samples: 10 steps per epoch
    # labelled batches of 16, half the loader's; 10 steps hold 160 samples, more labelled ones make them larger
    for which, (net_name, peer_prob) in enumerate((("a", model.prob_b), ("b", model.prob_a))):
        batches = [b for b in model.batches if b[0] == (net_name == "a")]
        labelled = int(model.labelled_sets[which].numel())
        assert 0 < labelled < 320
        size = 64 if labelled_batch_size else max(16, math.ceil(labelled / 10))
        full, rest = divmod(labelled, size)
        assert [b[1] for b in batches] == [size] * full + ([rest] if rest else [])  # one pass, in order
        assert all(b[2] == b[1] for b in batches)  # as many unlabelled samples as labelled
        weights = torch.cat([b[3] for b in batches])
        expected = peer_prob[model.labelled_sets[which]]
        torch.testing.assert_close(weights.sort().values, expected.sort().values)  # each labelled sample once
        optimizer = model.optimizers()[which].optimizer
        steps = int(next(iter(optimizer.state.values()))["step"])
        assert steps == 10 + len(batches)  # the warm-up's 10, then only the steps with a labelled batch


@pytest.mark.parametrize("loss_average_epochs", [1, 2])
def test_resume_parity_at_epoch_boundary(tmp_path: Path, one_thread: None, loss_average_epochs: int) -> None:
    def make() -> DivideMix:
        return DivideMix(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0,
                         loss_average_epochs=loss_average_epochs)

    straight = make()
    trainer(max_epochs=3).fit(straight, datamodule=_data(300, batch_size=64))

    first = make()
    first_trainer = trainer(max_epochs=2)
    first_trainer.fit(first, datamodule=_data(300, batch_size=64))
    ckpt = tmp_path / "epoch2.ckpt"
    first_trainer.save_checkpoint(ckpt)
    assert first.prob_a.shape == (240,) and not torch.equal(first.prob_a, torch.ones(240))

    resumed = make()
    trainer(max_epochs=3).fit(resumed, datamodule=_data(300, batch_size=64), ckpt_path=str(ckpt))
    for name in ("prob_a", "prob_b", "best_acc", "loss_history", "divide_count"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=0, atol=0)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    assert not torch.equal(straight.prob_a, first.prob_a)  # the third epoch did co-divide again


class LossRecordingDivideMix(DivideMix):
    """Keeps network a's normalised per-sample losses of every co-divide, computed the same way beforehand."""

    def co_divide(self) -> None:
        loader = train_eval_loader(self.trainer, "test")
        self.recorded.append(normalise_losses(self.per_sample_losses(self.net_a, loader, self.prob_a.numel()).cpu()))
        super().co_divide()


def test_division_fits_the_average_of_the_last_losses(one_thread: None) -> None:
    model = LossRecordingDivideMix(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0,
                                   loss_average_epochs=2)
    model.recorded = []
    trainer(max_epochs=4).fit(model, datamodule=_data(300, batch_size=64))
    assert len(model.recorded) == 3 and int(model.divide_count) == 3  # epochs 1, 2 and 3
    expected = clean_probability((model.recorded[1] + model.recorded[2]) / 2, seed=0)  # the last two
    torch.testing.assert_close(model.prob_a, expected.to(model.prob_a), rtol=0, atol=0)
    assert not torch.equal(model.prob_a, clean_probability(model.recorded[2], seed=0).to(model.prob_a))
    assert model.loss_history.shape == (2, 2, 240)


def test_per_class_division_fits_one_mixture_per_noisy_class(one_thread: None) -> None:
    model = LossRecordingDivideMix(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0,
                                   divide_per_class=True)
    model.recorded = []
    data = _data(300, batch_size=64)
    trainer(max_epochs=2).fit(model, datamodule=data)
    assert len(model.recorded) == 1
    expected = per_class_clean_probability(model.recorded[0], data.noisy_labels, seed=0)
    torch.testing.assert_close(model.prob_a, expected.to(model.prob_a), rtol=0, atol=1e-5)
    assert not torch.allclose(model.prob_a, clean_probability(model.recorded[0], seed=0).to(model.prob_a), atol=1e-3)


def test_division_fits_at_most_gmm_max_fit_samples_losses(one_thread: None) -> None:
    model = LossRecordingDivideMix(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0,
                                   gmm_max_fit_samples=100)
    model.recorded = []
    trainer(max_epochs=2).fit(model, datamodule=_data(300, batch_size=64))
    assert len(model.recorded) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = clean_probability(model.recorded[0], seed=0, max_fit_samples=100)
        every_loss = clean_probability(model.recorded[0], seed=0, max_fit_samples=None)
    torch.testing.assert_close(model.prob_a, expected.to(model.prob_a), rtol=0, atol=0)
    assert not torch.equal(model.prob_a, every_loss.to(model.prob_a))


class RankCheckedDivideMix(DivideMix):
    """Asserts that each division is the one-process GMM of all losses, and that both ranks hold the same state."""

    def co_divide(self) -> None:
        expected = []
        with torch.no_grad():  # every loss computed by this rank alone, in one process's way
            for net in (self.net_a, self.net_b):
                net.eval()
                losses = torch.empty(self.prob_a.numel())
                for x, y, index in train_eval_loader(self.trainer, "test"):
                    losses[index] = F.cross_entropy(net(x), y, reduction="none")
                net.train()
                expected.append(clean_probability(losses, seed=0))
        super().co_divide()
        torch.testing.assert_close(self.prob_a, expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(self.prob_b, expected[1], rtol=0, atol=1e-5)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        assert self.trainer.world_size == 2
        if self.current_epoch >= self.hparams.warmup_epochs:
            assert not torch.equal(self.prob_a, torch.ones_like(self.prob_a)), "no co-divide happened"
        orders = [order.to(self.prob_a) for order in self._labelled_orders]  # the labelled pass is split by rank
        state = torch.cat([self.prob_a, self.prob_b, *orders, *(p.detach().flatten() for p in self.parameters())])
        gathered = self.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), f"the ranks differ at epoch {self.current_epoch}"


@pytest.mark.ddp
def test_two_ranks_hold_the_same_divisions_and_weights() -> None:
    # each rank runs the co-divide pass on its share of the batches; MixMatch steps are synchronised by DDP
    model = RankCheckedDivideMix(backbone="cnn1d", warmup_epochs=1, lambda_u=10.0, rampup_length=1, seed=0)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3).fit(model, datamodule=_data(300, batch_size=32))
