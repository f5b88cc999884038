"""Shared by the benchmarks: the run helpers of ``lightning_noisy.experiment`` and table formatting."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_noisy.experiment import EpochHistory, RunResult, quiet_cli, run_config, run_many

__all__ = [
    "EpochHistory", "RunResult", "markdown_table", "mean_spread", "noise_overrides", "plot_curves", "quiet_cli",
    "run_config", "run_many",
]

#: the class map of asymmetric noise on MNIST-1D (2->7, 3->8, 5<->6, 7->1)
ASYMMETRIC_CLASS_MAP = "mnist"


def noise_overrides(kind: str, rate: float, num_samples: int | None = None) -> list[str]:
    """CLI overrides for ``kind`` noise at ``rate`` (and a data set of ``num_samples``, 80% train, if given)."""
    out = [f"--data.init_args.noise_type={kind}", f"--data.init_args.noise_rate={rate}"]
    if num_samples is not None:
        out.append(f"--data.init_args.num_samples={num_samples}")
    return out + ([f"--data.init_args.class_map={ASYMMETRIC_CLASS_MAP}"] if kind == "asymmetric" else [])


def plot_curves(path: Path, title: str, ylabel: str, curves: dict[str, list[float]], scale: float = 1.0) -> None:
    """One line per curve against the epoch (1-based), values times ``scale``, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), [scale * v for v in values], label=label, linewidth=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) > 4 else 8, ncol=2 if len(curves) > 4 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
