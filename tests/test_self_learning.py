"""SelfLearning: density / prototype selection, pseudo labels, the loss, a short fit, checkpointing, bad args."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import NUM_CLASSES, NUM_FEATURES, SpawnDDPStrategy, toy_dataset, toy_loader, trainer

from lightning_noisy.data import MNIST1DDataModule
from lightning_noisy.methods.self_learning import (
    SelfLearning,
    pseudo_labels,
    select_prototypes,
    similarity_density,
)

MLP_KWARGS = {"in_features": NUM_FEATURES, "hidden": [8]}


def self_learning(**kwargs: object) -> SelfLearning:
    defaults = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": MLP_KWARGS,
                "num_sampled": 8, "num_prototypes": 2, "warmup_epochs": 1}
    defaults.update(kwargs)
    return SelfLearning(**defaults)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_density_and_eta_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # S = [[1,1,0],[1,1,0],[0,0,1]]; sorted entries 0,0,0,0,1,1,1,1,1 -> S_c = entry 3 (floor(0.4 * 8)) = 0
    sim, rho, eta = similarity_density(features, percentile=40.0)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))
    assert rho.tolist() == [2.0, 2.0, 1.0]  # sign(S_ij - 0) summed over j
    assert eta.tolist() == [0.0, 0.0, 0.0]  # the densest: min similarity; sample 2: max S to a denser one
    assert select_prototypes(features, 2, percentile=40.0).tolist() == [0, 1]
    # the default, the paper's "top 40%": S_c = entry floor(0.6 * 8) = 4 = 1, so sign(S_ij - 1) is 0 or -1
    _, rho, eta = similarity_density(features)
    assert rho.tolist() == [-1.0, -1.0, -2.0]
    assert eta.tolist() == [0.0, 0.0, 0.0]


def test_prototypes_come_from_the_dense_cluster() -> None:
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=generator)
    cluster = centre + 0.4 * torch.randn(20, 8, generator=generator)  # indices 0..19
    outliers = torch.randn(5, 8, generator=generator) * 2  # indices 20..24
    features = torch.cat([cluster, outliers])
    _, rho, eta = similarity_density(features)
    assert rho[:20].min() > rho[20:].max()
    picked = select_prototypes(features, num_prototypes=4)
    assert picked.numel() == 4 and set(picked.tolist()) <= set(range(20))
    assert picked[0].item() == int(torch.argmax(rho))  # the densest sample comes first
    assert (eta[picked] < 0.95).all()
    # asking for more prototypes than pass the eta test fills up with the densest others; never more than m
    assert select_prototypes(features, 40).numel() == 25


def test_eta_is_the_similarity_to_the_nearest_denser_sample() -> None:
    angles = (0, 5, -5, 10, -10, 15, -15, 20, -20, 25, -25, 120, 200, 270)
    features = torch.tensor([unit(a) for a in angles])
    sim, rho, eta = similarity_density(features)
    for i in range(len(angles)):
        denser = rho > rho[i]
        expected = sim[i][denser].max() if denser.any() else sim[i].min()
        assert float(eta[i]) == pytest.approx(float(expected))
    # the 20-degree sample is less dense than the 15-degree one, 5 degrees away (cos = 0.996 > 0.95): skipped
    assert rho[7] < rho[5] and eta[7] > 0.95
    assert 7 not in select_prototypes(features, 9).tolist()


def test_pseudo_labels_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    prototypes = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.6, 0.8]]])
    # [1,1]/sqrt2: class 0 -> 0.707, class 1 -> (0.707 + 1.4 / sqrt2) / 2 = 0.849
    assert pseudo_labels(features, prototypes).tolist() == [0, 1, 1]
    # a class without prototypes never wins; classes may have different numbers of prototypes
    ragged = [torch.zeros(0, 2), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.1]])]
    # [1,1]/sqrt2: class 1 -> 0.707, class 2 -> (0.707 + 1.1 / (sqrt2 * 1.005)) / 2 = 0.741
    assert pseudo_labels(features, ragged).tolist() == [2, 1, 2]


def test_loss_is_the_weighted_sum_of_the_two_cross_entropies() -> None:
    model = self_learning(alpha=0.3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    noisy, pseudo = torch.tensor([0, 1]), torch.tensor([1, 1])
    log_z = [math.log(math.exp(2) + 2), math.log(math.e + 2)]
    ce_noisy = ((log_z[0] - 2) + (log_z[1] - 1)) / 2
    ce_pseudo = (log_z[0] + (log_z[1] - 1)) / 2
    loss, loss_noisy, loss_pseudo = model.self_learning_loss(logits, noisy, pseudo)
    assert float(loss_noisy) == pytest.approx(ce_noisy)
    assert float(loss_pseudo) == pytest.approx(ce_pseudo)
    assert float(loss) == pytest.approx(0.7 * ce_noisy + 0.3 * ce_pseudo)


def test_sampling_is_seeded_by_seed_and_epoch() -> None:
    model = self_learning()
    features = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
    noisy = torch.arange(24) % NUM_CLASSES
    first = model.correct_labels(features, noisy, epoch=3)
    assert torch.equal(first, model.correct_labels(features, noisy, epoch=3))  # what every DDP rank computes
    draws = {tuple(torch.randperm(8, generator=model.sample_generator(e)).tolist()) for e in range(4)}
    assert len(draws) > 1


def test_short_fit_produces_pseudo_labels_and_logs_recovery() -> None:
    model = self_learning(warmup_epochs=1, correction_interval=1)
    run = trainer(max_epochs=3)
    data = toy_dataset(n=24, noisy_every=4)
    run.fit(model, toy_loader(data, batch_size=8, shuffle=True), toy_loader(toy_dataset(return_index=False)))
    labels = model.pseudo_label
    assert labels.shape == (24,) and labels.min() >= 0 and labels.max() < NUM_CLASSES
    metrics = run.callback_metrics
    recovery = float(metrics["noisy/pseudo_label_recovery"])
    assert recovery == pytest.approx(float((labels == data.clean_labels).float().mean()))
    assert float(metrics["noisy/pseudo_label_changed"]) == pytest.approx(
        float((labels != data.noisy_labels).float().mean()))
    assert {"train/loss", "train/loss_noisy", "train/loss_pseudo", "test/acc", "test/acc_best"} <= set(metrics)
    # the buffer is checkpointed and loads into a fresh module
    state = model.state_dict()
    fresh = self_learning()
    fresh.load_state_dict(state)  # the empty buffer takes the checkpoint's size
    assert torch.equal(fresh.pseudo_label, labels)


def test_warmup_only_needs_no_index_but_correction_does() -> None:
    no_index = toy_loader(toy_dataset(return_index=False), batch_size=8)
    trainer(max_epochs=1).fit(self_learning(warmup_epochs=1), no_index)  # plain CE during warm-up
    with pytest.raises(RuntimeError, match="dataset index"):
        trainer(max_epochs=1).fit(self_learning(warmup_epochs=0), no_index)


def test_mean_pooled_correction_features_average_the_feature_map() -> None:
    model = SelfLearning(backbone="cnn1d", num_classes=10, feature_pooling="mean")
    x = torch.randn(6, 1, 40, generator=torch.Generator().manual_seed(0))
    conv_map = model.backbone.feature_map(x)  # [6, 32, 5]
    assert conv_map.shape == (6, 32, 5)
    torch.testing.assert_close(model.backbone.features(x), conv_map.reshape(6, 160))  # features = flattened map
    torch.testing.assert_close(model.correction_features(x), conv_map.sum(2) / 5)
    flat = SelfLearning(backbone="cnn1d", num_classes=10)
    torch.testing.assert_close(flat.correction_features(x), flat.backbone.features(x))


def test_mean_pooling_needs_a_feature_map() -> None:
    with pytest.raises(ValueError, match="feature_pooling='mean' needs a backbone with `feature_map"):
        self_learning(feature_pooling="mean")  # the MLP backbone has no map
    with pytest.raises(ValueError, match="feature_pooling must be 'none' or 'mean', got 'max'"):
        self_learning(feature_pooling="max")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": 1.5}, "alpha must be a number in \\[0, 1\\], got 1.5"), ({"alpha": -0.1}, "alpha.*-0.1"),
     ({"num_prototypes": 0}, "num_prototypes must be an integer >= 1, got 0"),
     ({"num_sampled": 0}, "num_sampled.*>= 1"), ({"warmup_epochs": -1}, "warmup_epochs.*-1"),
     ({"correction_interval": 0}, "correction_interval.*>= 1"), ({"percentile": 120.0}, "percentile.*120"),
     ({"eta_max": 1.5}, "eta_max.*1.5"), ({"num_prototypes": 9, "num_sampled": 8}, "num_prototypes \\(9\\)"),
     ({"mixup_alpha": 1.0}, "mixup")],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        self_learning(**kwargs)


def test_bad_function_arguments() -> None:
    with pytest.raises(ValueError, match="num_prototypes"):
        select_prototypes(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match="features must be"):
        select_prototypes(torch.randn(4), 1)
    with pytest.raises(ValueError, match="prototypes must be"):
        pseudo_labels(torch.randn(4, 2), torch.randn(3, 2, 5))


class RankCheckedSelfLearning(SelfLearning):
    """Asserts at every epoch end that both ranks hold the same pseudo labels and weights, and that the pseudo
    labels are what one process computes from the same weights and the whole training set."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.is_correction_epoch(self.current_epoch):
            expected = self.correct_labels(self.training_features(), self._noisy, self.current_epoch)
            assert torch.equal(self.pseudo_label, expected.to(self.pseudo_label.device))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        assert self.trainer.world_size == 2
        if self.current_epoch >= self.hparams.warmup_epochs:
            assert bool((self.pseudo_label >= 0).all()), "no label correction happened"
        state = torch.cat([self.pseudo_label.double(), *(p.detach().double().flatten() for p in self.parameters())])
        gathered = self.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), f"the ranks differ at epoch {self.current_epoch}"


@pytest.mark.ddp
def test_two_ranks_hold_the_same_pseudo_labels_and_weights() -> None:
    model = RankCheckedSelfLearning(backbone="cnn1d", num_classes=10, warmup_epochs=1, num_sampled=40,
                                    num_prototypes=4, feature_pooling="mean", lr=0.05)
    data = MNIST1DDataModule(num_samples=300, batch_size=32, noise_type="symmetric", noise_rate=0.4)
    trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=3).fit(model, datamodule=data)
