"""Instructions per training step with and without the per-sample callbacks, counted by callgrind.

On a small CPU step (``cnn1d`` at batch 128 takes 4-5 ms here) the wall-time ratios of ``overhead.py`` swing by
10-20 % from one run to the next on a shared machine; an instruction count does not. Each configuration is fitted
for two epochs (``overhead.fit``: the same data, network and optimiser) in a process of its own under ``valgrind
--tool=callgrind --collect-atstart=no``, one torch thread, and only the second epoch is counted: from the first
callback's ``on_train_epoch_start`` to the last one's ``on_train_epoch_end``, so forward, loss, backward, optimiser,
every hook and the epoch-boundary work. Prints instructions per step and their ratio to the baseline.

An instruction is not a unit of time: the callbacks' small ops on ``[B, C]`` run after the network's step has
evicted the caches, so their wall-time share is larger than their instruction share. Read the ratio as the work
the callback adds, a lower bound for its time on a memory-bound step.

    .venv/bin/python benchmarks/instructions.py                         # plain, ELRCallback, SOPCallback
    .venv/bin/python benchmarks/instructions.py --variants AUMCallback --num-samples 2000

Needs valgrind on PATH (``apt install valgrind``). One configuration takes 5-10 minutes under it at 5,000 samples;
the data generation and the first epoch run under valgrind too, so at 50,000 samples it takes over half an hour.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from typing_extensions import override

from common import markdown_table
from overhead import PLAIN, VARIANTS, EpochWindow, fit, with_baselines

STEPS_PREFIX = "steps counted: "


class EpochInstructions(EpochWindow):
    """Turns callgrind's collection on for the second training epoch (:class:`~overhead.EpochWindow`)."""

    @override
    def begin(self) -> None:
        torch._C._valgrind_toggle()

    @override
    def end(self) -> None:
        torch._C._valgrind_toggle()


def read_total(path: Path) -> int:
    """The instructions collected, from the ``totals:`` (or ``summary:``) line of a callgrind output file."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"totals", "summary"}:
            return int(value.split()[0])
    raise ValueError(f"{path} has no totals or summary line: is it a callgrind output file?")


def count_in_this_process(name: str, num_samples: int, batch_size: int, channels: int) -> None:
    """Fit ``name`` with the window (run under callgrind by :func:`count`); print the steps it spanned."""
    if not torch._C._valgrind_supported_platform():
        raise SystemExit("this torch build cannot toggle callgrind (torch._C._valgrind_supported_platform() is False)")
    make_callbacks, num_outputs, _ = VARIANTS[name]
    window = EpochInstructions()
    fit([window.first, *make_callbacks(), window.last], num_samples, 2, num_outputs,
        batch_size=batch_size, channels=channels)
    print(f"{STEPS_PREFIX}{window.steps}")


def count(name: str, num_samples: int, batch_size: int, channels: int) -> tuple[int, int]:
    """Instructions and steps of the second epoch of ``name``'s fit, in a fresh process under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--in-process", name, "--num-samples", str(num_samples),
            "--batch-size", str(batch_size), "--channels", str(channels),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name}: the run under valgrind failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        steps = [int(line.removeprefix(STEPS_PREFIX)) for line in done.stdout.splitlines()
                 if line.startswith(STEPS_PREFIX)]
        if not steps or steps[-1] < 1:
            raise SystemExit(f"{name}: the fit did not report the steps it counted; its output:\n{done.stdout[-3000:]}")
        return read_total(out), steps[-1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=5_000, help="MNIST-1D samples, train + test")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--channels", type=int, default=32, help="width of the cnn1d network (the configs': 32)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=[PLAIN, "ELRCallback", "SOPCallback"],
                        help="configurations to count (each with its baseline)")
    parser.add_argument("--in-process", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("num_samples", "batch_size", "channels"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    sizes = (args.num_samples, args.batch_size, args.channels)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if args.in_process is not None:
        count_in_this_process(args.in_process, *sizes)
        return
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not on PATH (apt install valgrind)")

    chosen = with_baselines(args.variants)
    per_step: dict[str, float] = {}
    for name in chosen:
        instructions, steps = count(name, *sizes)
        per_step[name] = instructions / steps
        print(f"{name}: {instructions} instructions in {steps} steps", flush=True)

    print(f"\nMNIST-1D, {args.num_samples} samples (80% for training), cnn1d of {args.channels} channels, batch size "
          f"{args.batch_size}, the second epoch of two; torch {torch.__version__}, 1 thread, callgrind\n")
    rows = []
    for name in chosen:
        baseline = VARIANTS[name][2]
        ratio = "—" if name == baseline else f"{per_step[name] / per_step[baseline]:.3f}"
        extra = "—" if name == baseline else f"{(per_step[name] - per_step[baseline]) / 1e6:+.2f}"
        rows.append([name, f"{per_step[name] / 1e6:.2f}", baseline, extra, ratio])
    print(markdown_table(["configuration", "M instructions / step", "baseline", "vs baseline (M)", "ratio"], rows))


if __name__ == "__main__":
    main()
