"""Figures: class-count histogram, and the report's per-class accuracy, weight-norm, reliability
and stage-1 curve plots (matplotlib, Agg backend; every PNG written atomically)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
    *,
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


# --------------------------------------------------------------------------- report figures


def _color(name: str, i: int, colors: Mapping[str, str] | None) -> str:
    """The caller's colour for ``name`` (stable across figures), else the default palette's."""
    return (colors or {}).get(name) or f"C{i % 10}"


def _plain_log_xticks(ax) -> None:
    """Plain numbers (14, 20, 50, 100) instead of powers of ten on a log x axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    if hi / max(lo, 1e-12) < 100:  # under two decades: label 2x and 5x too
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(plain)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _nan_array(values: Sequence[float | None]) -> np.ndarray:
    """A float64 array with ``None`` turned into NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def per_class_accuracy_plot(
    counts: Sequence[int] | np.ndarray,
    per_class: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    title: str = "",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Per-class test accuracy against training count (x log scale), one line per method.

    Args:
        counts: ``(C,)`` training images per class.
        per_class: ``{method: (C,) accuracies}``, fractions in ``[0, 1]`` (``None`` / NaN for a
            class without test examples, left out).
        path: PNG to write (atomically).
        title: figure title.
        colors: ``{method: matplotlib colour}``; others take the default palette.

    With up to 100 classes every class is a marker, joined in order of training count; with more,
    markers are faint and the line is the mean accuracy of classes in log-spaced count bins.
    """
    plt = _plt()
    counts = np.asarray(counts, dtype=np.float64)
    order = np.argsort(counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    many = len(counts) > 100
    for i, (name, acc) in enumerate(per_class.items()):
        y = _nan_array(acc)
        if y.shape != counts.shape:
            raise ValueError(f"{name}: {y.shape[0]} per-class accuracies for {len(counts)} classes")
        c = _color(name, i, colors)
        ok = order[~np.isnan(y[order])]
        if not many:
            ax.plot(counts[ok], y[ok], "o-", c=c, ms=4, lw=1.2, alpha=0.85, label=name)
            continue
        ax.scatter(counts[ok], y[ok], s=4, c=c, alpha=0.15, lw=0)
        edges = np.geomspace(counts.min(), counts.max() * (1 + 1e-9), 16)
        idx = np.clip(np.searchsorted(edges, counts[ok], side="right") - 1, 0, len(edges) - 2)
        mids, means = [], []
        for b in range(len(edges) - 1):
            sel = idx == b
            if sel.any():
                mids.append(float(np.exp(np.log(counts[ok][sel]).mean())))
                means.append(float(y[ok][sel].mean()))
        ax.plot(mids, means, "o-", c=c, ms=4, lw=1.5, label=name)
    ax.set_xscale("log")
    _plain_log_xticks(ax)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy of the class")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "per-class test accuracy against training count")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return savefig_atomic(fig, path)


def weight_norm_plot(
    counts: Sequence[int] | np.ndarray,
    norms: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Classifier weight norm ``||w_i||`` per class, classes sorted by training count (Kang et al.).

    Args:
        counts: ``(C,)`` training images per class.
        norms: ``{method: (C,) L2 norms of the (effective) class weight vectors}``.
        path: PNG to write (atomically).
        title: figure title.
        colors: ``{method: matplotlib colour}``; others take the default palette.

    Classes are ordered from the largest training count (head, left) to the smallest (tail,
    right); ties keep label order. Joint training's norms typically follow class size, re-balanced
    classifiers flatten them.
    """
    plt = _plt()
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    marker = "o-" if len(counts) <= 100 else "-"
    for i, (name, w) in enumerate(norms.items()):
        w = _nan_array(w)
        if w.shape != counts.shape:
            raise ValueError(f"{name}: {w.shape[0]} weight norms for {len(counts)} classes")
        ax.plot(x, w[order], marker, c=_color(name, i, colors), ms=3, lw=1.3, label=name)
    ax.set_xlabel("class, sorted by training count (head → tail)")
    ax.set_ylabel("classifier weight norm ‖w‖")
    if len(counts) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels(
            [str(int(counts[j])) for j in order], fontsize=7, rotation=0 if len(x) <= 20 else 90
        )
        ax.set_xlabel("class, sorted by training count (tick: images)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "classifier weight norm per class")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return savefig_atomic(fig, path)


def reliability_diagrams(
    bins: Mapping[str, Mapping[str, Sequence[float | None]]],
    path: str | os.PathLike,
    titles: Mapping[str, str] | None = None,
    ncols: int = 4,
) -> Path:
    """Reliability diagrams, one panel per method, in one figure.

    Args:
        bins: ``{method: {"count": (B,), "accuracy": (B,), "confidence": (B,)}}`` for ``B``
            equal-width confidence bins over ``[0, 1]`` (as from
            :func:`longtail.evaluate.metrics.reliability_bins`; ``None`` / NaN for empty bins).
        path: PNG to write (atomically).
        titles: panel title per method (e.g. with its ECE); default the method name.
        ncols: panels per row.

    Each panel shows the accuracy of each bin as a blue bar, the bin's mean confidence as a dark
    red tick with the gap between the two hatched in red (above the bar: over-confident, inside
    it: under-confident), the diagonal of perfect calibration, and the share of examples per bin
    as a grey step line.
    """
    plt = _plt()
    names = list(bins)
    if not names:
        raise ValueError("no method to draw a reliability diagram for")
    ncols = max(1, min(ncols, len(names)))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.0 * ncols, 3.1 * nrows), squeeze=False, sharex=True, sharey=True
    )
    for ax, name in zip(axes.flat, names, strict=False):
        b = bins[name]
        count = _nan_array(b["count"])
        acc, conf = _nan_array(b["accuracy"]), _nan_array(b["confidence"])
        n = len(count)
        edges = np.linspace(0.0, 1.0, n + 1)
        left, width = edges[:-1], 1.0 / n
        full = count > 0
        ax.bar(
            left[full],
            acc[full],
            width,
            align="edge",
            color="#4C72B0",
            ec="white",
            lw=0.5,
            label="accuracy",
        )
        gap = conf - acc
        ax.bar(
            left[full],
            gap[full],
            width,
            bottom=acc[full],
            align="edge",
            fc=(0.77, 0.31, 0.32, 0.25),
            ec="#C44E52",
            lw=0.8,
            hatch="///",
            label="gap to mean confidence",
        )
        ax.hlines(conf[full], left[full], left[full] + width, colors="#7a1f22", lw=1.2)
        ax.plot([0, 1], [0, 1], "--", c="0.3", lw=1)
        total = np.nansum(count)
        if total > 0:
            share = np.where(full, count, 0) / total
            ax.step(
                edges,
                np.append(share, share[-1]),
                where="post",
                c="0.55",
                lw=0.9,
                label="share of examples",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title((titles or {}).get(name, name), fontsize=9)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return savefig_atomic(fig, path)


def training_curves(
    runs: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
    path: str | os.PathLike,
    swa_start: Sequence[int | None] | None = None,
) -> Path:
    """Stage-1 loss, accuracy and learning rate against epoch, SWA start marked.

    Args:
        runs: ``(label, columns)`` per run; ``columns`` maps ``metrics.csv`` column names to
            per-epoch values: ``epoch`` (1-based, the end of that epoch) and any of
            ``train_loss``, ``val_nll``, ``train_acc``, ``val_acc``, ``lr``.
        path: PNG to write (atomically).
        swa_start: per run, the 0-based first SWA epoch (``run.json``'s ``swa_start_epoch``) or
            ``None``; drawn as a vertical line at ``x = swa_start`` (the start of that epoch).

    Loss is on a log scale (an early validation NLL can be orders of magnitude above the training
    loss). Training curves are solid, validation curves dashed.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.6))
    panels = (
        (axes[0], (("train_loss", "train loss"), ("val_nll", "val NLL")), "loss (log)"),
        (axes[1], (("train_acc", "train acc"), ("val_acc", "val acc")), "accuracy"),
        (axes[2], (("lr", "learning rate"),), "learning rate"),
    )
    several = len(runs) > 1
    for i, (label, cols) in enumerate(runs):
        x = _nan_array(cols["epoch"])
        for ax, series, _ in panels:
            for j, (key, text) in enumerate(series):
                if key not in cols:
                    continue
                y = _nan_array(cols[key])
                if np.isnan(y).all():
                    continue
                ax.plot(
                    x,
                    y,
                    "--" if j else "-",
                    c=f"C{i % 10}",
                    lw=1.4,
                    marker="o",
                    ms=2.5,
                    label=f"{text} ({label})" if several else text,
                )
    starts = sorted({s for s in (swa_start or []) if s is not None})
    for ax, _, ylabel in panels:
        for k, s in enumerate(starts):
            ax.axvline(s, c="0.25", ls=":", lw=1.2, label="SWA start" if k == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].set_title("stage 1: loss")
    axes[1].set_title("stage 1: accuracy")
    axes[2].set_title("stage 1: learning rate")
    fig.tight_layout()
    return savefig_atomic(fig, path)
