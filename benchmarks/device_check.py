"""Device check: every callback and method for a few epochs under DDP, ranks compared, seconds per epoch.

Each case fits MNIST-1D (``MNIST1DDataModule``, 40% symmetric noise) for ``--epochs`` epochs with DDP
over all visible GPUs (NCCL) in ``bf16-mixed`` precision by default. Every model, DataModule and Trainer
is built from the case's config in ``configs/`` through the package's own ``lightning-noisy`` CLI
(``lightning_noisy.cli.build_cli``), with the epochs, devices, strategy, precision, batch size and a few
method phases (warm-ups, start epochs) overridden so that every phase of a method runs within the short
fit. The callback cases are the plain ``NoisyClassifier`` of ``configs/mnist1d_ce.yaml`` without its
callbacks (``plain``, the baseline) plus one callback (and ``WarmupEntropyCallback`` beside
``CoDivideCallback``), each with its per-sample state sharded (the default under DDP); the method cases
keep their configs' callbacks (mostly ``NoisyLabelMonitor``).

After each fit, on every rank, the state is read and compared across the ranks:

- the LightningModule's ``state_dict`` (parameters and buffers: DivideMix's clean probabilities,
  ProMix's ``selected``, SelfLearning's pseudo labels, ...) and the optimisers' ``state_dict``;
- every per-sample buffer of every ``SampleStateCallback`` on the Trainer (also those the module adds
  through ``configure_callbacks``), the whole table of a sharded buffer gathered from its blocks (which
  must tile ``[0, N)``), with the callback's small extra state and its public tensor attributes.

Each tensor is hashed (SHA-256 of its bytes) and the hashes are all-gathered: a tensor that is not
bit-identical on every rank fails the case, and so does any non-finite float (in a per-sample buffer,
among the rows visited). An exception in a fit or in the check fails the case too; the next case runs.

The time of a training epoch runs from ``on_train_epoch_start`` to ``on_train_epoch_end`` (CUDA
synchronised), less the validation inside it: it includes the callbacks' epoch-boundary work. The
first epoch is a warm-up and is not counted; a case's figure is the median over the other epochs of
the slowest rank's time, and its ratio is to ``plain``. Rank 0 prints the environment, one line per
case and a table at the end; the script exits 1 (rank 0's status) if any case failed. A watchdog ends
every rank with status 1 and a traceback of each thread if the run exceeds ``--timeout`` seconds, e.g.
when a failure on one rank leaves the others waiting in a collective.

On a GPU machine, from the repository root (all visible GPUs, 4 epochs, 16,000 training samples, batch
256 per rank; meant to take well under 5 minutes on one H200):

    .venv/bin/python benchmarks/device_check.py
    .venv/bin/python benchmarks/device_check.py --cases DivideMix ProMix --epochs 3   # rerun part of it

On a CPU (2 gloo processes, 3 epochs, 4,000 training samples; about 2 minutes on 2 cores):

    .venv/bin/python benchmarks/device_check.py --accelerator cpu --devices 2 --precision 32-true

With ``--strategy ddp`` (the default, also for one device, so that the DDP wrapper runs) Lightning starts
ranks 1.. by running this script again with the same arguments; each rank runs every case in the same
order. ``torchrun --nproc-per-node=N benchmarks/device_check.py --devices N`` works as well.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import logging
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the working tree's package, also when it is not installed
    sys.path.insert(0, str(ROOT))

import lightning
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_noisy.callbacks import (
    AUMCallback,
    CoDivideCallback,
    CurriculumCallback,
    ELRCallback,
    ForwardCorrectionCallback,
    LabelCorrectionCallback,
    NoisyLabelMonitor,
    SampleStateCallback,
    SOPCallback,
    WarmupEntropyCallback,
)
from lightning_noisy.cli import build_cli
from lightning_noisy.state import all_gather_uneven

from common import markdown_table

PLAIN = "plain"


@dataclass(frozen=True)
class Case:
    """One fit: a config, CLI overrides (``{half}`` becomes half the epochs), and callbacks added in Python."""

    config: str
    overrides: tuple[str, ...] = ()
    callbacks: Callable[[int], list[Callback]] = lambda epochs: []


NO_CALLBACKS = ("--trainer.callbacks=[]",)  # the config's NoisyLabelMonitor off: one callback per case

CASES: dict[str, Case] = {
    # -- the plain classifier, then each callback on it -----------------------------------------------
    PLAIN: Case("configs/mnist1d_ce.yaml", NO_CALLBACKS),
    "LabelCorrectionCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [
        LabelCorrectionCallback(update="soft", num_average_epochs=2, start_epoch=1, prior_weight=1.2,
                                entropy_weight=0.8)]),
    "NoisyLabelMonitor": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [NoisyLabelMonitor()]),
    "AUMCallback": Case("configs/mnist1d_ce.yaml", (*NO_CALLBACKS, "--model.init_args.num_classes=11"),
                        lambda e: [AUMCallback(start_epoch=0, histogram=False)]),
    "ELRCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [ELRCallback(beta=0.7, weight=3.0)]),
    "SOPCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS,
                        lambda e: [SOPCallback(lr_u=10.0, lr_v=100.0, init_std=1e-8)]),
    "CoDivideCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [
        WarmupEntropyCallback(warmup_epochs=1), CoDivideCallback(start_epoch=1, per_class=True)]),
    "ForwardCorrectionCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [
        ForwardCorrectionCallback(transition="estimate", estimate_epoch=0)]),
    "CurriculumCallback": Case("configs/mnist1d_ce.yaml", NO_CALLBACKS, lambda e: [
        CurriculumCallback(curriculum_epoch=0, stage_epochs=[2, 3])]),
    # -- the methods, from their configs, with their phases brought into the short fit -----------------
    "JointOptimization": Case("configs/mnist1d_joint_optimization.yaml", (
        "--model.init_args.step1_epochs={half}", "--model.init_args.start_epoch=0",
        "--model.init_args.num_average_epochs=1", "--model.init_args.step2_milestones=[1]",
        "--model.init_args.lr=0.1")),  # 0.2 leaves the predictions near uniform for the first epochs: no update
    "CoTeaching": Case("configs/mnist1d_coteaching.yaml", ("--model.init_args.num_gradual=2",)),
    "CoTeaching+": Case("configs/mnist1d_coteaching.yaml", (
        "--model.init_args.num_gradual=2", "--model.init_args.disagreement=true",
        "--model.init_args.disagreement_start_epoch=1")),
    "DivideMix": Case("configs/mnist1d_dividemix.yaml", (
        "--model.init_args.warmup_epochs=1", "--model.init_args.rampup_length=2")),
    "SelfLearning": Case("configs/mnist1d_self_learning.yaml", ("--model.init_args.warmup_epochs=1",)),
    "FeatureMixup": Case("configs/mnist1d_feature_mixup.yaml"),
    "SOPPlus": Case("configs/mnist1d_sop_plus.yaml"),
    "ELRPlus": Case("configs/mnist1d_elr_plus.yaml", ("--model.init_args.ema_rampup_steps=10",)),
    "ProMix": Case("configs/mnist1d_promix.yaml", (
        "--model.init_args.warmup_epochs=1", "--model.init_args.rho_rampup_epochs=2",
        "--model.init_args.consistency_rampup_epochs=2")),
}


# ------------------------------------------------------------------------------------------ helpers
def say(*parts: Any) -> None:
    """Print on global rank 0 only, flushed (the other ranks' output would interleave)."""
    if rank_zero_only.rank == 0:
        print(*parts, flush=True)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (just ``[value]`` without a process group)."""
    if not distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class EpochTimer(Callback):
    """Seconds of each training epoch, ``on_train_epoch_start`` to ``on_train_epoch_end``, less validation."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = self._val_start = self._val = 0.0

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = 0.0
        self._start = self._now(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self._now(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val += self._now(trainer) - self._val_start

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(self._now(trainer) - self._start - self._val)


# ------------------------------------------------------------------------------------- state check
def _flatten(value: Any, name: str) -> Iterator[tuple[str, Any]]:
    """``(name, leaf)`` of nested dicts, lists and tuples; tensors and plain values are leaves."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _flatten(value[key], f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{name}[{i}]")
    else:
        yield name, value


def _digest(value: Any) -> str:
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.reshape(-1)
        body = raw.numpy().tobytes() if data.numel() else b""
        return hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode() + body).hexdigest()[:16]
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _non_finite(value: Any, rows: Tensor | None = None) -> int:
    """How many non-finite values a float tensor holds (in ``rows`` only, when given); 0 for the rest."""
    if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
        return 0
    bad = ~torch.isfinite(value.detach())
    if rows is not None and bad.ndim and bad.shape[0] == rows.shape[0]:
        bad = bad[rows.to(bad.device)]
    return int(bad.sum())


@dataclass
class StateReport:
    """This rank's view of the state after a fit: a digest per entry, the non-finite entries, other faults."""

    digests: dict[str, str] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    buffers: int = 0

    def add(self, name: str, value: Any, rows: Tensor | None = None) -> None:
        self.digests[name] = _digest(value)
        bad = _non_finite(value, rows)
        if bad:
            self.non_finite[name] = bad


def _whole(tensor: Tensor, sharded: bool, device: torch.device) -> Tensor:
    """Every rank's block of a row tensor, concatenated in rank order (a collective when sharded)."""
    if not sharded or not distributed():
        return tensor
    return torch.cat([part.cpu() for part in all_gather_uneven(tensor.to(device))])


def read_state(trainer: pl.Trainer, module: pl.LightningModule) -> StateReport:
    """The state to compare across ranks; the collectives run in the same order on every rank."""
    report = StateReport()
    device = trainer.strategy.root_device
    for name, value in module.state_dict().items():
        report.add(f"module.{name}", value)
    for i, optimizer in enumerate(trainer.optimizers):
        for name, value in _flatten(optimizer.state_dict(), f"optimizer{i}"):
            report.add(name, value)
    for position, callback in enumerate(trainer.callbacks):
        if not isinstance(callback, SampleStateCallback):
            continue
        prefix = f"{type(callback).__name__}#{position}"
        for buffer_name, buffer in sorted(callback.sample_buffers().items()):
            report.buffers += 1
            layout = buffer.layout
            if layout.is_sharded:  # the blocks must tile [0, N) in rank order
                blocks = gather_objects((layout.start, layout.stop))
                stops = [0] + [stop for _, stop in blocks]
                if [start for start, _ in blocks] != stops[:-1] or stops[-1] != buffer.num_samples:
                    report.faults.append(
                        f"{prefix}.{buffer_name}: blocks {blocks} do not tile [0, {buffer.num_samples})")
            state = buffer.state_dict()
            visits = state.get("visits")
            whole_visits = _whole(visits, layout.is_sharded, device) if isinstance(visits, Tensor) else None
            visited = None if whole_visits is None else whole_visits > 0
            for key in sorted(state):
                value = state[key]
                if isinstance(value, Tensor):  # every tensor of a buffer's state leads with its rows
                    value = _whole(value, layout.is_sharded, device)
                elif key in ("start", "stop"):
                    continue  # this rank's block: differs between ranks by design
                report.add(f"{prefix}.{buffer_name}.{key}", value, visited)
        for name, value in _flatten(callback.extra_state_dict(), f"{prefix}.extra"):
            report.add(name, value)
        # public tensors (AUM's threshold_mask, CoDivide's last_losses, ...): a sharded callback's [R] tensor
        # of this rank's rows is gathered when every rank holds its own block's rows so
        layouts = [b.layout for b in callback.sample_buffers().values() if b.layout.is_sharded]
        tensors = [(attr, value) for attr, value in sorted(vars(callback).items())
                   if isinstance(value, Tensor) and not attr.startswith("_")]
        local = [bool(layouts) and value.ndim >= 1 and value.shape[0] == layouts[0].num_rows
                 and value.shape[0] != layouts[0].num_samples for _, value in tensors]
        blocks = [all(flags) for flags in zip(*gather_objects(local))]  # on every rank, even with none
        for (attr, value), block in zip(tensors, blocks):
            report.add(f"{prefix}.{attr}", _whole(value, block, device))
    return report


def compare(reports: list[StateReport]) -> tuple[bool, list[str]]:
    """Whether every rank holds the same state, and what is wrong (mismatches, non-finite values, faults)."""
    problems: list[str] = []
    names = sorted(set().union(*(r.digests for r in reports)))
    mismatched = [n for n in names if len({r.digests.get(n) for r in reports}) > 1]
    if mismatched:
        shown = ", ".join(mismatched[:6]) + (f" (+{len(mismatched) - 6} more)" if len(mismatched) > 6 else "")
        problems.append(f"differs between ranks: {shown}")
    for rank, report in enumerate(reports):
        problems += [f"rank {rank}: {fault}" for fault in report.faults]
        if report.non_finite:
            shown = ", ".join(f"{k} ({v})" for k, v in list(report.non_finite.items())[:6])
            problems.append(f"rank {rank}: non-finite values in {shown}")
    return not mismatched, problems


# ------------------------------------------------------------------------------------------ cases
@dataclass
class CaseResult:
    name: str
    epoch_s: float | None = None
    epochs_timed: int = 0
    identical: bool | None = None
    entries: int = 0
    buffers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def cli_args(case: Case, args: argparse.Namespace, strategy: str) -> list[str]:
    overrides = [o.replace("{half}", str(max(1, args.epochs // 2))) for o in case.overrides]
    return [
        "--config", str(ROOT / case.config), *overrides,
        f"--seed_everything={args.seed}", f"--data.init_args.noise_seed={args.seed}",
        "--data.init_args.noise_type=symmetric", "--data.init_args.noise_rate=0.4",
        f"--data.init_args.num_samples={args.num_samples}", f"--data.init_args.batch_size={args.batch_size}",
        f"--trainer.max_epochs={args.epochs}", f"--trainer.accelerator={args.accelerator}",
        f"--trainer.devices={args.devices}", f"--trainer.strategy={strategy}",
        f"--trainer.precision={args.precision}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
    ]


#: the Trainer of the case in progress, whose launcher holds the ranks that rank 0 started (for the watchdog)
_CURRENT: dict[str, pl.Trainer | None] = {"trainer": None}


def started_ranks() -> list[Any]:
    """The processes of ranks 1.. that Lightning's launcher started from this one (rank 0), if any."""
    trainer = _CURRENT["trainer"]
    launcher = None if trainer is None else trainer.strategy.launcher
    return list(getattr(launcher, "procs", None) or [])


def start_watchdog(timeout: float) -> threading.Timer:
    """After ``timeout`` s: every thread's traceback, the ranks this one started killed, and exit status 1.

    ``faulthandler`` ends the process 60 s later in case the interpreter cannot run the timer thread.
    """
    def fire() -> None:
        print(f"[rank {rank_zero_only.rank}] device_check: still running after --timeout {timeout:.0f} s "
              "(a rank waiting in a collective?); every thread:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        for proc in started_ranks():
            proc.kill()
        os._exit(1)

    faulthandler.dump_traceback_later(timeout + 60, exit=True)
    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_case(name: str, args: argparse.Namespace, strategy: str) -> CaseResult:
    """Fit one case and check its state; every rank calls it, and every rank ends with the same result."""
    case, result = CASES[name], CaseResult(name)
    error: str | None = None
    timer = EpochTimer()
    trainer: pl.Trainer | None = None
    try:
        cli = build_cli(args=cli_args(case, args, strategy), run=False, save_config_callback=None)
        trainer = cli.trainer
        trainer.callbacks.extend([*case.callbacks(args.epochs), timer])  # the timer last
        if not started_ranks():  # keep the Trainer whose launcher started the other ranks
            _CURRENT["trainer"] = trainer
        trainer.fit(cli.model, cli.datamodule)
    except Exception as err:  # noqa: BLE001 - the case fails; the next one runs
        error = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        print(f"[rank {rank_zero_only.rank}] case {name} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
    errors = gather_objects(error)
    result.problems += [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None]
    if result.problems or trainer is None:
        return result
    try:
        report = read_state(trainer, cli.model)
        reports = gather_objects(report)
        result.identical, problems = compare(reports)
        result.problems += problems
        result.entries, result.buffers = len(report.digests), report.buffers
    except Exception as err:  # noqa: BLE001
        print(f"[rank {rank_zero_only.rank}] state check of {name} failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        result.problems.append(f"state check: {type(err).__name__}: {err}".splitlines()[0][:300])
    times = gather_objects(timer.times)  # per rank: the slowest rank's epoch is the epoch's time
    slowest = [max(epoch) for epoch in zip(*times)][1:]
    if slowest:
        result.epoch_s, result.epochs_timed = statistics.median(slowest), len(slowest)
    if len(timer.times) != args.epochs:
        result.problems.append(f"{len(timer.times)} of {args.epochs} epochs ran")
    return result


# ------------------------------------------------------------------------------------------ report
def print_environment(args: argparse.Namespace, strategy: str) -> None:
    if rank_zero_only.rank != 0:
        return  # the other ranks touch no device here
    say(f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{platform.platform()}")
    if torch.cuda.is_available():
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = "n/a"
        say(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}, "
            f"{torch.cuda.device_count()} visible GPU(s):")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            say(f"  cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"capability {props.major}.{props.minor}")
    else:
        say(f"CUDA not available (torch built with CUDA {torch.version.cuda}); {os.cpu_count()} CPU core(s)")
    backend = "nccl" if args.accelerator in ("cuda", "gpu") else "gloo"
    say(f"run: accelerator {args.accelerator}, devices {args.devices}, strategy {strategy}"
        f"{f' ({backend})' if strategy.startswith('ddp') else ''}, precision {args.precision}, "
        f"{args.epochs} epochs, MNIST-1D {args.num_samples} samples (80% train), batch {args.batch_size} per rank, "
        "40% symmetric noise\n")


def print_table(results: list[CaseResult]) -> None:
    base = next((r.epoch_s for r in results if r.name == PLAIN and r.ok), None)
    rows = []
    for r in results:
        seconds = "—" if r.epoch_s is None else f"{r.epoch_s:.3f}"
        ratio = "—" if r.epoch_s is None or base is None else f"{r.epoch_s / base:.2f}"
        identical = {True: "yes", False: "NO", None: "—"}[r.identical]
        rows.append([r.name, seconds, ratio, identical, f"{r.entries} ({r.buffers})", "ok" if r.ok else "FAIL"])
    say("\n" + markdown_table(
        ["case", "s/epoch", "ratio to plain", "state identical on every rank",
         "tensors checked (per-sample buffers)", "status"], rows))
    failed = [r for r in results if not r.ok]
    if failed:
        say(f"\n{len(failed)} of {len(results)} case(s) failed:")
        for r in failed:
            for problem in r.problems:
                say(f"  {r.name}: {problem}")
    else:
        say(f"\nall {len(results)} case(s) passed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--devices", type=int, default=None,
                        help="processes: default every visible GPU (cuda), 2 (cpu)")
    parser.add_argument("--strategy", default="ddp",
                        help="Lightning strategy (default ddp: NCCL on cuda, gloo on cpu; also with one device, "
                             "so that the DDP wrapper runs)")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (default bf16-mixed)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per fit, the first not timed (default 4 on cuda, 3 on cpu)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="MNIST-1D samples, 80%% for training (default 20000 on cuda, 5000 on cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (default 256 on cuda, 128 on cpu)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"cases to run (default all; {PLAIN} always runs first): {', '.join(CASES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=480.0,
                        help="seconds before a watchdog ends the run with status 1 (default 480)")
    args = parser.parse_args(argv)
    cuda = args.accelerator in ("cuda", "gpu")
    if cuda and not torch.cuda.is_available():
        parser.error("--accelerator cuda, but CUDA is not available: "
                     "pass --accelerator cpu --devices 2 --precision 32-true")
    if args.devices is None:
        args.devices = torch.cuda.device_count() if cuda else 2
    if args.epochs is None:
        args.epochs = 4 if cuda else 3
    if args.num_samples is None:
        args.num_samples = 20_000 if cuda else 5000
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 128
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is not timed), got {args.epochs}")
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    strategy = args.strategy
    names = [PLAIN] + [n for n in CASES if n in args.cases and n != PLAIN]

    watchdog = start_watchdog(args.timeout)  # a rank stuck in a collective ends the run
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LightningCLI's args parameter.*",
                    ".*sync_dist=True.*", ".*smaller than the logging interval.*", ".*treespec, LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
    print_environment(args, strategy)

    start = time.perf_counter()
    results: list[CaseResult] = []
    for name in names:
        case_start = time.perf_counter()
        result = run_case(name, args, strategy)
        results.append(result)
        seconds = "—" if result.epoch_s is None else f"{result.epoch_s:.3f} s/epoch"
        say(f"[{time.perf_counter() - start:5.0f} s] {name}: {'ok' if result.ok else 'FAIL'}, {seconds}, "
            f"fit and check {time.perf_counter() - case_start:.1f} s")
    if distributed():
        dist.barrier()
    print_table(results)
    say(f"\ntotal {time.perf_counter() - start:.0f} s")
    for proc in started_ranks():  # rank 0: the ranks it started end after the last collective
        proc.wait()
    watchdog.cancel()
    faulthandler.cancel_dump_traceback_later()
    failed = any(not r.ok for r in results)
    return int(failed) if rank_zero_only.rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
