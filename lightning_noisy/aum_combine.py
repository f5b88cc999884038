"""``python -m lightning_noisy.aum_combine``: the two-run rule of AUM over the runs' ``aum_flags.csv`` files.

Example (two runs with disjoint threshold sets, then retraining without the removed samples)::

    lightning-noisy fit --config configs/mnist1d_aum.yaml --trainer.callbacks.init_args.threshold_run 0 \\
        --trainer.callbacks.init_args.output_dir aum/run0
    lightning-noisy fit --config configs/mnist1d_aum.yaml --trainer.callbacks.init_args.threshold_run 1 \\
        --trainer.callbacks.init_args.output_dir aum/run1
    python -m lightning_noisy.aum_combine aum/run0/aum_flags.csv aum/run1/aum_flags.csv --out aum/removed.pt
    lightning-noisy fit --config configs/mnist1d_ce.yaml --data.exclude_file aum/removed.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lightning_noisy.callbacks.aum import combine_aum_runs, read_flag_file


def combine_flag_files(paths: Sequence[str]) -> torch.Tensor:
    """Sorted ``[R]`` int64 indices of the samples to remove, from the flag files of several runs."""
    runs = [read_flag_file(path) for path in paths]
    ids = runs[0][0]
    for path, (other, _, _) in zip(paths, runs):
        if not torch.equal(other, ids):
            raise ValueError(f"{path} lists other samples than {paths[0]}; combine runs over the same training set")
    removed = combine_aum_runs([flagged for _, _, flagged in runs], [threshold for _, threshold, _ in runs])
    return ids[removed]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flag_files", nargs="+", help="aum_flags.csv of each run")
    parser.add_argument("--out", required=True, help="where to save the removed indices (.pt, an int64 tensor)")
    args = parser.parse_args(argv)
    removed = combine_flag_files(args.flag_files)
    torch.save(removed, args.out)
    print(f"{removed.numel()} samples removed -> {args.out}")


if __name__ == "__main__":
    main()
