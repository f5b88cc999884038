"""JointOptimization: the two-step method of Tanaka et al. (CVPR 2018) in one ``fit`` call."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from typing_extensions import override

from lightning_noisy.callbacks import LabelCorrectionCallback
from lightning_noisy.callbacks.label_correction import HistoryForm
from lightning_noisy.state.storage import StorageDtype
from lightning_noisy.methods.classifier import NoisyClassifier, build_optimizer
from lightning_noisy.state.label_rules import UpdateRule


def two_step_lr(
    epoch: int, step1_epochs: int, step1_lr: float, step2_lr: float, step2_milestones: list[int], gamma: float
) -> float:
    """Learning rate at ``epoch`` (0-based): constant ``step1_lr`` in step 1, then ``step2_lr`` decayed by
    ``gamma`` at each of ``step2_milestones`` (counted in epochs from the start of step 2)."""
    if epoch < step1_epochs:
        return step1_lr
    passed = sum(1 for m in step2_milestones if epoch - step1_epochs >= m)
    return step2_lr * gamma**passed


def reinitialise(module: torch.nn.Module, seed: int) -> None:
    """Reset every submodule that has ``reset_parameters`` from ``seed``: the same weights on every rank."""
    devices = [p.device for p in module.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for submodule in module.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()


class JointOptimization(NoisyClassifier):
    """Joint Optimization (Tanaka et al., CVPR 2018): label correction at a high rate, then retraining.

    Step 1 (epochs ``[0, step1_epochs)``): the network trains at the constant rate ``lr`` on labels that
    a :class:`~lightning_noisy.callbacks.LabelCorrectionCallback` (added by :meth:`configure_callbacks`)
    updates every epoch from ``start_epoch`` on, with the loss ``L_c + alpha L_p + beta L_e``.
    Step 2 (the next ``max_epochs - step1_epochs`` epochs): the network is initialised afresh (from
    ``step2_seed``, identically on every DDP rank; optimiser state cleared) and trains with the configured loss (cross-entropy) on the final labels of step 1, at
    ``step2_lr`` decayed by ``gamma`` at ``step2_milestones``. Test accuracy is that of the active network.

    Args:
        step1_epochs: length of step 1 (paper, CIFAR-10: 200).
        update: label-update rule, ``"soft"`` (paper's best), ``"hard"`` or ``"hard_topk"``.
        num_average_epochs: ``K`` epochs of predictions averaged per sample (paper: 10).
        start_epoch: first epoch at whose end labels are updated (paper, CIFAR-10: 70).
        top_k: labels changed per update by ``"hard_topk"``.
        alpha: weight of the prior term ``L_p`` (paper, CIFAR-10: 1.2).
        beta: weight of the entropy term ``L_e`` (paper, CIFAR-10: 0.8).
        prior: class prior of ``L_p``; uniform when ``None``.
        step2_lr: initial learning rate of step 2 (paper, CIFAR-10: 0.2).
        step2_milestones: step-2 epochs at which its rate is multiplied by ``gamma`` (paper: 40, 80).
        step2_seed: seed of the fresh initialisation of step 2.
        shard_state: shard the label state across DDP ranks (``None``: whenever the world size is above 1).
        storage_dtype: dtype of the stored labels and history (``"float32"``, ``"bfloat16"``, ``"float16"``).
        storage_topk: keep the ``k`` largest entries of each label and history row (``None``: dense).
        history: ``"ring"`` (the last ``K`` predictions, exact) or ``"running"`` (one running mean); see
            :class:`~lightning_noisy.callbacks.LabelCorrectionCallback`.
        **kwargs: the :class:`NoisyClassifier` arguments (``lr`` is step 1's constant rate; ``scheduler``
            and ``milestones`` are not used: the two-step schedule replaces them).
    """

    def __init__(
        self,
        step1_epochs: int = 200,
        update: UpdateRule = "soft",
        num_average_epochs: int = 10,
        start_epoch: int = 70,
        top_k: int = 50,
        alpha: float = 1.2,
        beta: float = 0.8,
        prior: list[float] | None = None,
        step2_lr: float = 0.2,
        step2_milestones: list[int] | None = None,
        step2_seed: int = 0,
        shard_state: bool | None = None,
        storage_dtype: StorageDtype = "float32",
        storage_topk: int | None = None,
        history: HistoryForm = "ring",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if int(step1_epochs) < 1:
            raise ValueError(f"step1_epochs must be >= 1, got {step1_epochs}")
        if not step2_lr > 0:
            raise ValueError(f"step2_lr must be > 0, got {step2_lr}")
        self.step2_milestones = list(step2_milestones if step2_milestones is not None else [40, 80])
        if any(m < 1 for m in self.step2_milestones) or self.step2_milestones != sorted(self.step2_milestones):
            raise ValueError(f"step2_milestones must be increasing positive epochs, got {step2_milestones}")
        self.step1_epochs = int(step1_epochs)
        self.label_correction = LabelCorrectionCallback(
            update=update,
            num_average_epochs=num_average_epochs,
            start_epoch=start_epoch,
            stop_epoch=self.step1_epochs,
            top_k=top_k,
            prior_weight=alpha,
            entropy_weight=beta,
            prior=prior,
            shard_state=shard_state,
            storage_dtype=storage_dtype,
            storage_topk=storage_topk,
            history=history,
            key="joint_optimization",
        )

    @override
    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.step1_epochs:
            reinitialise(self.backbone, self.hparams.step2_seed)
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
            self.best_acc.zero_()  # step 2's test accuracy is what the paper reports

    @override
    def configure_callbacks(self) -> list[Callback]:
        return [self.label_correction]

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        hp = self.hparams
        optimizer = build_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
        step1, lr1, lr2, milestones, gamma = self.step1_epochs, hp.lr, hp.step2_lr, self.step2_milestones, hp.gamma
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: two_step_lr(e, step1, lr1, lr2, milestones, gamma) / lr1
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
