"""SOPPlus, ELRPlus and ProMix resumed from an epoch-boundary checkpoint continue as the uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import NUM_CLASSES, NUM_FEATURES, toy_dataset, trainer
from torch.utils.data import DataLoader

from lightning_noisy.methods import ELRPlus, ProMix, SOPPlus

LINEAR = {"backbone": "mlp", "num_classes": NUM_CLASSES, "backbone_kwargs": {"in_features": NUM_FEATURES, "hidden": [6]}}
# schedules that do not depend on max_epochs: the first run stops at 2 epochs, the others go to 3
MAKERS: dict[str, Callable[[], pl.LightningModule]] = {
    "SOPPlus": lambda: SOPPlus(**LINEAR, init_std=0.1, lr=0.3, scheduler="multistep", milestones=[2]),
    "ELRPlus": lambda: ELRPlus(**LINEAR, ema_rampup_steps=4, lr=0.3, milestones=[2]),
    "ProMix": lambda: ProMix(**LINEAR, warmup_epochs=1, rho_start=0.5, lr=0.3, tau=0.6, scheduler="multistep",
                             milestones=[2]),
}


def per_sample_state(model: pl.LightningModule) -> list[torch.Tensor]:
    """The module's per-sample state that lives outside its state_dict (in its callbacks)."""
    if isinstance(model, SOPPlus):
        return list(model.sop.local_parameters())
    if isinstance(model, ELRPlus):
        return [t for targets in model.peer_targets for t in targets.local_targets()]
    return []


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_resume_from_an_epoch_boundary_continues_exactly(tmp_path: Path, name: str) -> None:
    def make() -> pl.LightningModule:
        torch.manual_seed(0)  # SOPPlus draws its network from the global RNG, as NoisyClassifier does
        return MAKERS[name]()

    def data() -> DataLoader:
        return DataLoader(toy_dataset(n=24), batch_size=8)  # unshuffled: the order is the same after a resume

    straight = make()
    trainer(max_epochs=3).fit(straight, data())
    first = make()
    first_trainer = trainer(max_epochs=2)
    first_trainer.fit(first, data())
    ckpt = tmp_path / "epoch2.ckpt"
    first_trainer.save_checkpoint(ckpt)
    resumed = make()
    trainer(max_epochs=3).fit(resumed, data(), ckpt_path=str(ckpt))
    for (key, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=0, atol=0, msg=key)
    for value, other in zip(per_sample_state(straight), per_sample_state(resumed), strict=True):
        torch.testing.assert_close(other, value, rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(first.state_dict().values(), straight.state_dict().values()))
