"""Per-epoch cost of the state engine: record N samples in batches, gather, reduce and write a buffer.

Prints a markdown table: time to record an epoch, time of the epoch-boundary gather + write, records
per second of that boundary work, and the peak resident memory of the process next to the size of
the ``N x C`` buffer itself. Each (N, C) runs in a fresh process so peaks do not carry over.

    .venv/bin/python benchmarks/state_engine.py                 # N = 1e5, 1e6, 1e7; C = 10, 100
    .venv/bin/python benchmarks/state_engine.py --sizes 100000 --classes 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lightning_noisy.state import SampleBuffer, SampleRecorder


def run_one(num_samples: int, num_classes: int, batch_size: int) -> dict[str, float]:
    """One epoch of records for every sample (random order), then the boundary work, timed."""
    torch.manual_seed(0)
    buffer = SampleBuffer(num_samples, (num_classes,))
    recorder = SampleRecorder((num_classes,))
    order = torch.randperm(num_samples)
    batch_values = torch.rand(batch_size, num_classes)
    start = time.perf_counter()
    for begin in range(0, num_samples, batch_size):
        index = order[begin : begin + batch_size]
        recorder.add(index, batch_values[: index.shape[0]])
    record_s = time.perf_counter() - start
    start = time.perf_counter()
    index, values, _ = recorder.gather("cpu", reduction="mean")
    buffer.write(index, values)
    boundary_s = time.perf_counter() - start
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "N": num_samples,
        "C": num_classes,
        "record_s": record_s,
        "boundary_s": boundary_s,
        "records_per_s": num_samples / boundary_s,
        "peak_gib": peak_bytes / 2**30,
        "buffer_gib": buffer.values.numel() * buffer.values.element_size() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.sizes[0], args.classes[0], args.batch_size)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}, one process, CPU\n")
    print("| N | C | record epoch (s) | gather + write (s) | records/s at boundary | peak RSS (GiB) | buffer (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for c in args.classes:
            out = subprocess.run(
                [sys.executable, __file__, "--one", "--sizes", str(n), "--classes", str(c), "--batch-size",
                 str(args.batch_size)], capture_output=True, text=True,
            )
            if out.returncode != 0:
                print(f"| {n:.0e} | {c} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
                continue
            r = json.loads(out.stdout)
            print(f"| {n:.0e} | {c} | {r['record_s']:.2f} | {r['boundary_s']:.2f} | {r['records_per_s']:.3g} | "
                  f"{r['peak_gib']:.2f} | {r['buffer_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
