"""PNG plots of evaluation results (matplotlib is optional: without it, no plots and a note)."""

from __future__ import annotations

import os
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_by_bucket(
    series: dict[str, list[float | None]], ylabel: str, title: str, path: str
) -> str | None:
    """Grouped bars: one group per frequency bucket, one bar per series; returns the path."""
    plt = _pyplot()
    if plt is None or not series:
        return None
    buckets = len(next(iter(series.values())))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(1.4 * buckets + 2, 3.2))
    for number, (name, values) in enumerate(series.items()):
        xs = [b + (number - (len(series) - 1) / 2) * width for b in range(buckets)]
        axes.bar(xs, [0.0 if v is None else v for v in values], width, label=name)
    axes.set_xticks(range(buckets))
    axes.set_xticklabels([f"{b}" + (" (rarest)" if b == 0 else "") for b in range(buckets)])
    axes.set_xlabel("frequency bucket")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
