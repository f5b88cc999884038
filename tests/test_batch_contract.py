"""The batch contract with an unmodified classifier, on one process and under 2-process CPU DDP."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, PlainClassifier, SpawnDDPStrategy, toy_dataset, toy_loader, trainer
from torch import Tensor

from lightning_noisy.callbacks.base import SampleStateCallback
from lightning_noisy.state import StepContext


class SoftTargetProbe(SampleStateCallback):
    """Substitutes soft targets, adds a loss term, and checks what the module and the contract saw."""

    def __init__(self, term_weight: float = 0.0, key: str | None = None) -> None:
        super().__init__(key=key)
        self.term_weight = term_weight
        self.seen_index: list[Tensor] = []
        self.sent_targets: list[Tensor] = []
        self.captured_is_forward_output: list[bool] = []

    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: Any) -> None:
        if self.term_weight:
            self.contract.add_loss_term(self, "square", lambda c: self.term_weight * c.logits.pow(2).mean())

    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self.seen_index.append(context.index.clone())
        soft = torch.full((context.batch_size, NUM_CLASSES), 0.1)
        soft[torch.arange(context.batch_size), context.targets] = 0.8
        self.sent_targets.append(soft)
        self.contract.set_targets(soft)

    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        # the logits are the module's own forward output of this step, not the DDP wrapper's loss output
        self.captured_is_forward_output.append(context.logits is pl_module.forward_outputs[-1])


def test_unmodified_module_receives_soft_targets_and_logits_are_its_own() -> None:
    dataset = toy_dataset(n=24)
    model, probe = PlainClassifier(), SoftTargetProbe()
    trainer(callbacks=[probe]).fit(model, toy_loader(dataset, batch_size=8))
    assert len(model.received_targets) == 3
    for received, sent in zip(model.received_targets, probe.sent_targets):
        assert torch.equal(received, sent)  # the module's `x, y = batch` got our soft labels
    assert torch.equal(torch.cat(probe.seen_index), torch.arange(24))
    assert probe.captured_is_forward_output == [True, True, True]
    assert "training_step" not in vars(model)  # the wrapper is removed at teardown


def test_two_callbacks_share_one_index_removal() -> None:
    dataset = toy_dataset(n=16)
    model, first, second = PlainClassifier(), SoftTargetProbe(key="a"), SoftTargetProbe(key="b")
    trainer(callbacks=[first, second]).fit(model, toy_loader(dataset, batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(first.seen_index, second.seen_index))
    assert first.state_key != second.state_key


def test_added_loss_term_changes_the_gradient_by_its_own_gradient() -> None:
    dataset = toy_dataset(n=8)
    torch.manual_seed(0)
    model = PlainClassifier(lr=1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    probe = SoftTargetProbe(term_weight=0.5)
    trainer(callbacks=[probe]).fit(model, toy_loader(dataset, batch_size=8))
    # the same step by hand: SGD(lr=1) on CE(soft targets) + 0.5 * mean(logits^2)
    reference = PlainClassifier()
    reference.load_state_dict(start)
    x = torch.stack([dataset[i][0] for i in range(8)])
    logits = reference.net(x)
    loss = F.cross_entropy(logits, probe.sent_targets[0]) + 0.5 * logits.pow(2).mean()
    loss.backward()
    for name, param in reference.net.named_parameters():
        torch.testing.assert_close(model.net.get_parameter(name), param.detach() - param.grad)


def test_module_whose_logits_cannot_be_found_fails_on_first_batch() -> None:
    model = PlainClassifier(call_self=False)  # calls self.net(x): no forward hook fires, no "logits" entry
    with pytest.raises(RuntimeError, match=r"return a dict from `training_step` with a 'logits' entry.*self\(x\)"):
        trainer(callbacks=[SoftTargetProbe()]).fit(model, toy_loader(toy_dataset(n=16)))
    assert len(model.received_targets) == 1
    assert "training_step" not in vars(model)


def test_batch_without_index_is_rejected_with_advice() -> None:
    dataset = toy_dataset(n=8, return_index=False)
    with pytest.raises(ValueError, match="carries no index.*NoisyLabelDataset"):
        trainer(callbacks=[SoftTargetProbe()]).fit(PlainClassifier(), toy_loader(dataset))


def test_tuple_batch_is_rejected_with_advice() -> None:
    loader = torch.utils.data.DataLoader(toy_dataset(n=8), batch_size=4, collate_fn=lambda s: tuple(
        torch.utils.data.default_collate(s)))
    with pytest.raises(TypeError, match="returned a tuple"):
        trainer(callbacks=[SoftTargetProbe()]).fit(PlainClassifier(), loader)


class DDPProbe(SoftTargetProbe):
    """Asserts inside each DDP worker, at the end of training."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.world_size == 2
        assert self.captured_is_forward_output and all(self.captured_is_forward_output)
        assert all(torch.equal(r, s) for r, s in zip(pl_module.received_targets, self.sent_targets))
        mine = torch.cat(self.seen_index)
        everyone = trainer.strategy.all_gather(mine).flatten()
        assert set(everyone.tolist()) == set(range(20))  # 20 samples: the two ranks together saw all


@pytest.mark.ddp
def test_contract_under_two_process_ddp() -> None:
    model = PlainClassifier()
    trainer(devices=2, strategy=SpawnDDPStrategy(), callbacks=[DDPProbe(term_weight=0.1)]).fit(
        model, toy_loader(toy_dataset(n=20), batch_size=4)
    )


class ForwardCorrectionProbe(SoftTargetProbe):
    """Sets the forward-correction transform ``log(softmax(z) @ T)`` for the whole run."""

    def __init__(self, transition: Tensor) -> None:
        super().__init__()
        self.transition = transition
        self.raw_logits: list[Tensor] = []

    def allocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, labels: Any) -> None:
        self.contract.set_logits_transform(self, lambda z: torch.log(torch.softmax(z, 1) @ self.transition))

    def on_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self.seen_index.append(context.index.clone())

    def on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: StepContext) -> None:
        self.raw_logits.append(context.logits.detach())


def test_logits_transform_makes_the_unmodified_loss_forward_corrected() -> None:
    from lightning_noisy.losses import forward_corrected_loss

    dataset = toy_dataset(n=8)
    torch.manual_seed(0)
    model = PlainClassifier(lr=1.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    transition = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.3, 0.7]])
    probe = ForwardCorrectionProbe(transition)
    trainer(callbacks=[probe]).fit(model, toy_loader(dataset, batch_size=8))
    reference = PlainClassifier()
    reference.load_state_dict(start)
    x = torch.stack([dataset[i][0] for i in range(8)])
    logits = reference.net(x)
    torch.testing.assert_close(probe.raw_logits[0], logits.detach())  # callbacks see the raw logits
    forward_corrected_loss(logits, dataset.noisy_labels[:8], transition).backward()
    for name, param in reference.net.named_parameters():
        torch.testing.assert_close(model.net.get_parameter(name), param.detach() - param.grad)
    model.eval()
    assert torch.equal(model(x), model.net(x))  # outside training steps the forward output is untouched


def test_second_logits_transform_is_refused_and_release_clears_it() -> None:
    from lightning_noisy.state import BatchContract

    model = PlainClassifier()
    first, second = object(), object()
    contract = BatchContract.attach(model, first)
    BatchContract.attach(model, second)
    contract.set_logits_transform(first, torch.log_softmax)
    with pytest.raises(ValueError, match="only one logits transform"):
        contract.set_logits_transform(second, torch.log_softmax)
    contract.release(first)
    contract.set_logits_transform(second, torch.log_softmax)  # free again once its owner left
    contract.release(second)
    assert "training_step" not in vars(model)
