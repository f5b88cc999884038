"""SOPPlus: SOP with the class-balance and consistency terms on two views (Liu et al., ICML 2022)."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, NUM_FEATURES, LossProbe, SpawnDDPStrategy, toy_dataset, trainer
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_noisy.callbacks import SOPCallback
from lightning_noisy.methods import NoisyClassifier, SOPPlus
from lightning_noisy.methods.sop_plus import class_balance_loss, consistency_loss
from lightning_noisy.state.sharded import gather_rows

LINEAR = {"in_features": NUM_FEATURES, "hidden": []}


def sop_plus(**kwargs: Any) -> SOPPlus:
    defaults: dict[str, Any] = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": LINEAR}
    defaults.update(kwargs)
    return SOPPlus(**defaults)


def half(x: Tensor) -> Tensor:
    return 0.5 * x


def same(x: Tensor) -> Tensor:
    return x


def test_terms_by_hand() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])  # batch mean [0.75, 0.25, 0] -> the 0 floored at 1e-4
    expected = -(math.log(0.75) + math.log(0.25) + math.log(1e-4)) / 3
    torch.testing.assert_close(class_balance_loss(p), torch.tensor(expected))
    weak = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])).requires_grad_(True)
    strong = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]])).requires_grad_(True)
    kl = (0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.25)
          + 0.1 * math.log(0.1 / 0.2) + 0.1 * math.log(0.1 / 0.4) + 0.8 * math.log(0.8 / 0.4)) / 2
    loss = consistency_loss(weak, strong)
    torch.testing.assert_close(loss, torch.tensor(kl))
    loss.backward()
    assert weak.grad is None and strong.grad is not None  # the weak view is the target only


def test_first_step_loss_by_hand() -> None:
    model, probe = sop_plus(lr_u=2.0, lr_v=3.0, init_std=0.3, weak_augment=same, strong_augment=half), LossProbe()
    net = copy.deepcopy(model.backbone)
    data = toy_dataset(n=8)
    trainer(max_epochs=1, callbacks=[probe]).fit(model, DataLoader(data, batch_size=8))
    x = torch.stack([data[i][0] for i in range(8)])
    y = F.one_hot(data.noisy_labels, NUM_CLASSES).float()
    start = model.sop.start_values(torch.arange(8), NUM_CLASSES)
    u, v = start[:, 0], start[:, 1:]
    with torch.no_grad():
        z, z_strong = net(x), net(0.5 * x)
    big_u, big_v = ((u * u)[:, None] * y).clamp(0, 1 - 1e-4), (v * v * (1 - y)).clamp(0, 1 - 1e-4)
    p = (torch.softmax(z, 1) + big_u - big_v).clamp_min(1e-4)
    p = (p / p.sum(1, keepdim=True)).clamp(1e-4, 1)
    ce = -(y * p.log()).sum(1).mean()
    balance = -p.mean(0).clamp_min(1e-4).log().mean()
    q, r = torch.softmax(z, 1), torch.softmax(z_strong, 1)
    consistency = (q * (q.log() - r.log())).sum(1).mean()
    v_term = ((F.one_hot(z.argmax(1), NUM_CLASSES) + big_u - big_v - y) ** 2).sum() / 8
    expected = ce + 0.1 * balance + 0.9 * consistency + v_term
    torch.testing.assert_close(probe.losses[0][0], expected, rtol=1e-5, atol=1e-6)


def test_without_its_terms_and_views_it_is_sop_on_the_plain_classifier() -> None:
    data = DataLoader(toy_dataset(n=24), batch_size=8)
    optimiser = {"optimizer": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "constant"}
    torch.manual_seed(0)
    plus = sop_plus(consistency_weight=0.0, balance_weight=0.0, weak_augment=same, strong_augment=same,
                    lr_u=5.0, lr_v=5.0, init_std=0.1, **optimiser)
    plain = NoisyClassifier(backbone="mlp", num_classes=NUM_CLASSES, backbone_kwargs=LINEAR, **optimiser)
    plain.backbone.load_state_dict(plus.backbone.state_dict())
    callback = SOPCallback(lr_u=5.0, lr_v=5.0, init_std=0.1)
    trainer(max_epochs=3).fit(plus, data)
    trainer(max_epochs=3, callbacks=[callback]).fit(plain, data)
    for mine, theirs in zip(plus.sop.local_parameters(), callback.local_parameters()):
        assert torch.equal(mine, theirs)
    for name, value in plus.backbone.state_dict().items():
        assert torch.equal(value, plain.backbone.state_dict()[name]), name


def test_default_views_repeat_per_step_and_differ_between_steps() -> None:
    model = sop_plus(seed=3)
    x = torch.randn(6, 40)
    weak, strong = model.views(x, batch_idx=0)
    again = model.views(x, batch_idx=0)
    assert torch.equal(weak, again[0]) and torch.equal(strong, again[1])
    assert not torch.equal(weak, model.views(x, batch_idx=1)[0])
    assert not torch.equal(weak, x) and not torch.equal(strong, weak)
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.views(images, 0)[0], images)  # images: the DataModule's transform is the weak view


def test_fit_trains_u_v_and_logs_its_terms() -> None:
    model = sop_plus(init_std=0.1, lr=0.5)
    run = trainer(max_epochs=2)
    run.fit(model, DataLoader(toy_dataset(), batch_size=8, shuffle=True))
    _, u, _ = model.sop.local_parameters()
    assert not torch.equal(u, model.sop.start_values(torch.arange(24), NUM_CLASSES)[:, 0])
    assert {"train/loss", "train/ce", "train/balance", "train/consistency", "noisy/sop_u_mean",
            "noisy/sop_noise_auroc"} <= set(run.callback_metrics)


def test_a_batch_without_index_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects training batches \[input, target, index\]"):
        trainer(max_epochs=1).fit(sop_plus(), DataLoader(toy_dataset(return_index=False), batch_size=8))


class SaveState(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sop = pl_module.sop
        assert sop._u is not None and sop._v is not None
        state = torch.cat([gather_rows(sop._u)[:, None], gather_rows(sop._v)], 1)  # collectives when sharded
        gathered = trainer.strategy.all_gather(state)
        assert torch.equal(gathered[0], gathered[1]), "the ranks end with different u, v"
        if trainer.is_global_zero:
            torch.save({"state": state, "held": sop.local_parameters()[0].numel(),
                        "weights": pl_module.state_dict()}, self.out)


@pytest.mark.ddp
def test_two_rank_fits_agree_sharded_or_replicated() -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for shard_state in (None, False):
            pl.seed_everything(4, verbose=False)
            out = Path(folder) / f"{shard_state}.pt"
            model = sop_plus(shard_state=shard_state, init_std=0.1, fetch_window=2, lr=0.5)
            trainer(devices=2, strategy=SpawnDDPStrategy(), max_epochs=2, callbacks=[SaveState(out)]).fit(
                model, DataLoader(toy_dataset(n=29, noisy_every=4), batch_size=4, shuffle=True))
            runs[shard_state] = torch.load(out)
    assert runs[None]["held"] == 15 and runs[False]["held"] == 29
    assert torch.equal(runs[None]["state"], runs[False]["state"])
    for name, value in runs[None]["weights"].items():
        assert torch.equal(value, runs[False]["weights"][name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"consistency_weight": -1.0}, r"consistency_weight must be a finite number >= 0, got -1.0"),
        ({"balance_weight": float("nan")}, r"balance_weight must be a finite number >= 0, got nan"),
        ({"strong_augment": "randaugment"}, r"strong_augment must be a callable .* got str"),
        ({"lr_u": 0.0}, r"lr_u must be a finite number > 0, got 0.0"),
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
        ({"scheduler": "step"}, r"scheduler must be 'constant', 'multistep', 'cosine' or 'linear', got 'step'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sop_plus(**kwargs)
