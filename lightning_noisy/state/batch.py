"""The batch contract shared by every callback of the package.

A training batch arrives as ``[input, target, index]``. The first of our callbacks to see a batch takes
the index out, so the module's own ``training_step`` receives ``[input, target]`` and runs unmodified.
Callbacks may then replace ``target`` by corrected hard labels ``[B]`` or soft labels ``[B, C]``.

The logits of the step are taken from a ``"logits"`` entry when ``training_step`` returns a dict, else
from a forward hook on the LightningModule that keeps the first ``[B, C]`` output produced while the
module's ``training_step`` runs. Under DDP the strategy routes ``training_step`` through the wrapper's
``forward`` and the LightningModule is called a second time with its forward redirected; that outer call
ends after ``training_step`` has returned, so the hook never mistakes its output for the logits.

Loss terms that callbacks add (prior, entropy, confidence penalties) are summed onto the loss that
``training_step`` returns, inside the same autocast and DDP context, so one backward pass covers both.

A callback may also set a logits transform: during training steps only, the module's own forward
output is replaced by ``transform(logits)`` (e.g. forward loss correction's ``log(softmax(z) @ T)``,
under which the module's unmodified cross-entropy is the corrected loss). The callbacks keep seeing
the raw logits in :attr:`StepContext.logits`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

LOGITS_KEY = "logits"

MISSING_LOGITS_MESSAGE = (
    "lightning-noisy could not find the logits of this training step. Either return a dict from "
    "`training_step` with a {key!r} entry of shape [B, C] (and the loss under 'loss'), or compute them by "
    "calling the LightningModule itself (`logits = self(x)`), whose forward output of shape [B, C] is "
    "captured by a forward hook."
)

LossTerm = Callable[["StepContext"], Tensor | None]


@dataclass
class StepContext:
    """What the callbacks share about the current training batch.

    Attributes:
        batch: the batch object Lightning passes to ``training_step`` (index already removed).
        batch_idx: its index in the epoch.
        index: ``[B]`` int64 dataset indices of the samples.
        targets: the targets as loaded (the noisy labels), before any substitution.
        logits: ``[B, C]`` logits of the step, with their graph, once ``training_step`` has run.
        loss_terms: the values of the loss terms added in this step, by name (detached).
    """

    batch: MutableSequence[Any]
    batch_idx: int
    index: Tensor
    targets: Tensor
    logits: Tensor | None = None
    loss_terms: dict[str, Tensor] = field(default_factory=dict)
    _hooked_logits: Tensor | None = None
    _transformed_logits: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])


def _describe(batch: Any) -> str:
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"a {type(batch).__name__}"


class BatchContract:
    """Per-module helper shared by the package's callbacks; obtain it with :meth:`attach`.

    It wraps the module instance's ``training_step`` (the class is untouched) and registers one forward
    hook. Each callback that needs it calls :meth:`attach` in ``setup`` and :meth:`release` in
    ``teardown``; the wrapper and hook are removed when the last one leaves.
    """

    _ATTRIBUTE = "_lightning_noisy_batch_contract"

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.context: StepContext | None = None
        self._owners: set[int] = set()
        self._loss_terms: dict[str, LossTerm] = {}
        self._logits_transform: Callable[[Tensor], Tensor] | None = None
        self._logits_transform_owner: int | None = None
        self._logits_required = False
        self._capturing = False
        self._original_training_step = module.training_step
        self._hook: RemovableHandle = module.register_forward_hook(self._capture_logits)
        module.training_step = self._wrap(self._original_training_step)  # type: ignore[method-assign]

    @classmethod
    def attach(cls, module: pl.LightningModule, owner: object, require_logits: bool = False) -> BatchContract:
        """Return the module's contract, creating it on first use, and register ``owner`` as a user."""
        contract = getattr(module, cls._ATTRIBUTE, None)
        if contract is None:
            contract = cls(module)
            object.__setattr__(module, cls._ATTRIBUTE, contract)
        contract._owners.add(id(owner))
        contract._logits_required |= require_logits
        return contract

    @classmethod
    def current_index(cls, module: pl.LightningModule) -> Tensor | None:
        """``[B]`` sample indices of the running training batch, if a callback took them out; else ``None``."""
        contract = getattr(module, cls._ATTRIBUTE, None)
        return None if contract is None or contract.context is None else contract.context.index

    @classmethod
    def current_raw_logits(cls, module: pl.LightningModule) -> Tensor | None:
        """``[B, C]`` logits of the running training step's first forward, before any logits transform.

        With their graph; ``None`` outside a training step, before its first forward, or without a callback.
        A module that knows a callback transforms its logits (SOP+ and SOP's noise term) reads them here.
        """
        contract = getattr(module, cls._ATTRIBUTE, None)
        return None if contract is None or contract.context is None else contract.context._hooked_logits

    def release(self, owner: object) -> None:
        """Unregister ``owner``; the last user restores the module's own ``training_step``."""
        self._owners.discard(id(owner))
        for name in [n for n in self._loss_terms if n.startswith(f"{id(owner)}:")]:
            del self._loss_terms[name]
        if self._logits_transform_owner == id(owner):
            self._logits_transform = self._logits_transform_owner = None
        if self._owners:
            return
        self._hook.remove()
        if "training_step" in vars(self.module):
            del self.module.training_step
        if self.module.__dict__.get(self._ATTRIBUTE) is self:
            del self.module.__dict__[self._ATTRIBUTE]

    # -- per batch -------------------------------------------------------------------------------
    def begin_batch(self, batch: Any, batch_idx: int) -> StepContext:
        """Take the index out of ``batch`` in place (once per batch, whichever callback comes first)."""
        if self.context is not None and self.context.batch is batch:
            return self.context
        if not isinstance(batch, list):
            if isinstance(batch, tuple) and len(batch) == 3:
                raise TypeError(
                    "lightning-noisy needs a mutable batch to take the index out: the collate function returned "
                    "a tuple; return a list [input, target, index] (PyTorch's default collate does)"
                )
            raise TypeError(
                "lightning-noisy expects training batches [input, target, index], got " + _describe(batch)
            )
        if len(batch) != 3:
            raise ValueError(
                "lightning-noisy expects training batches [input, target, index] but got "
                f"{_describe(batch)}: the dataset carries no index. Wrap it in "
                "lightning_noisy.data.NoisyLabelDataset or use one of the package's DataModules."
            )
        index = batch[2]
        if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point():
            raise ValueError(
                f"the third element of the batch must be the [B] integer sample index, got {_describe(index)}"
                + (f" with dtype {index.dtype} and shape {tuple(index.shape)}" if isinstance(index, Tensor) else "")
            )
        del batch[2]
        self.context = StepContext(batch=batch, batch_idx=batch_idx, index=index.to(torch.long), targets=batch[1])
        return self.context

    def set_targets(self, targets: Tensor) -> None:
        """Replace the targets of the current batch by hard labels ``[B]`` or soft labels ``[B, C]``."""
        context = self._require_context()
        size = context.batch_size
        hard = targets.ndim == 1 and not targets.is_floating_point()
        soft = targets.ndim == 2 and targets.is_floating_point()
        if not (hard or soft) or targets.shape[0] != size:
            raise ValueError(
                f"targets must be hard labels [{size}] (integer) or soft labels [{size}, C] (float), got "
                f"dtype {targets.dtype} and shape {tuple(targets.shape)}"
            )
        device = context.targets.device if isinstance(context.targets, Tensor) else targets.device
        context.batch[1] = targets.to(device, non_blocking=True)

    def set_logits_transform(self, owner: object, transform: Callable[[Tensor], Tensor] | None) -> None:
        """Replace the module's training forward output ``[B, C]`` by ``transform(logits)`` (``None`` to stop).

        One owner at a time: two transforms of the logits would silently compose, so a second is refused.
        """
        if self._logits_transform_owner not in (None, id(owner)):
            raise ValueError("another callback already transforms the logits; only one logits transform can be active")
        self._logits_transform = transform
        self._logits_transform_owner = None if transform is None else id(owner)
        if transform is not None:
            self._logits_required = True

    def add_loss_term(self, owner: object, name: str, term: LossTerm) -> None:
        """Add ``term(context)`` (a scalar, or ``None`` to skip) to every training step's loss."""
        self._loss_terms[f"{id(owner)}:{name}"] = term
        self._logits_required = True

    # -- internals -------------------------------------------------------------------------------
    def _require_context(self) -> StepContext:
        if self.context is None:
            raise RuntimeError("no training batch has started: call begin_batch in on_train_batch_start first")
        return self.context

    def _capture_logits(self, module: torch.nn.Module, args: Any, output: Any) -> Tensor | None:
        context = self.context
        if not self._capturing or context is None or context._hooked_logits is not None:
            return None
        if (
            isinstance(output, Tensor)
            and output.ndim == 2
            and output.is_floating_point()
            and output.shape[0] == context.batch_size
        ):
            context._hooked_logits = output
            if self._logits_transform is not None:
                context._transformed_logits = self._logits_transform(output)
                return context._transformed_logits  # a forward hook's return value replaces the output
        return None

    def _wrap(self, training_step: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(training_step)
        def training_step_with_contract(*args: Any, **kwargs: Any) -> Any:
            context = self.context
            if context is None or context.logits is not None:
                return training_step(*args, **kwargs)
            self._capturing = True
            try:
                output = training_step(*args, **kwargs)
            finally:
                self._capturing = False
            logits = output.get(LOGITS_KEY) if isinstance(output, Mapping) else None
            if not isinstance(logits, Tensor) or logits is context._transformed_logits:
                logits = context._hooked_logits  # the raw logits, also when the module returned transformed ones
            context._hooked_logits = context._transformed_logits = None
            if logits is None:
                if self._logits_required:
                    raise RuntimeError(MISSING_LOGITS_MESSAGE.format(key=LOGITS_KEY))
                return output
            if logits.ndim != 2 or logits.shape[0] != context.batch_size:
                raise RuntimeError(
                    f"the logits of the training step must have shape [B={context.batch_size}, C], "
                    f"got {tuple(logits.shape)}"
                )
            context.logits = logits
            return self._add_loss_terms(output, context)

        return training_step_with_contract

    def _add_loss_terms(self, output: Any, context: StepContext) -> Any:
        if output is None or not self._loss_terms:
            return output
        extra: Tensor | None = None
        for name, term in self._loss_terms.items():
            value = term(context)
            if value is None:
                continue
            context.loss_terms[name.split(":", 1)[1]] = value.detach()
            extra = value if extra is None else extra + value
        if extra is None:
            return output
        if isinstance(output, Tensor):
            return output + extra
        if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
            return {**output, "loss": output["loss"] + extra}
        raise RuntimeError(
            "lightning-noisy adds loss terms to the loss that training_step returns: return a Tensor or a dict "
            f"with a 'loss' entry, got {type(output).__name__}"
        )
