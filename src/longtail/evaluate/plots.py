"""Figures: class-count histogram (more plots live in the report module)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure through a temp file + rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)
    return path


def class_count_histogram(
    counts: np.ndarray,
    path: str | os.PathLike,
    classes: list[str] | None = None,
    title: str = "",
    many: int = 100,
    few: int = 20,
) -> Path:
    """Bar chart of training images per class (log scale), shot thresholds as dashed lines.

    ``counts``: ``(C,)`` images per class, plotted in label order.
    """
    plt = _plt()
    counts = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.35 * len(counts), 16.0)), 3.6))
    ax.bar(np.arange(len(counts)), counts, color="#4C72B0")
    ax.set_yscale("log")
    ax.axhline(many, ls="--", c="0.4", lw=1, label=f"many-shot > {many}")
    ax.axhline(few, ls=":", c="0.4", lw=1, label=f"few-shot < {few}")
    ax.set_xlabel("class")
    ax.set_ylabel("training images (log)")
    if classes is not None and len(classes) <= 40:
        ax.set_xticks(np.arange(len(counts)))
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_title(title or f"{len(counts)} classes, {int(counts.sum()):,} images")
    ax.legend(fontsize=8)
    return savefig_atomic(fig, path)
