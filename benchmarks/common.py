"""Shared by the benchmarks: the run helpers of ``lightning_noisy.experiment`` and table formatting."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_noisy.experiment import EpochHistory, RunResult, run_config, run_many

__all__ = ["EpochHistory", "RunResult", "markdown_table", "mean_spread", "run_config", "run_many"]


def mean_spread(values: Iterable[float], scale: float = 100.0) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (std over seeds; just the mean for one value)."""
    values = [v * scale for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
