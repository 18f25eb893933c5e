"""How much a difference in balanced accuracy on a small hold-out can be trusted.

A stratified paired bootstrap (:func:`bootstrap_gaps`) over the hold-out images: every entry
(a stage-2 method, a recipe, a grid point of a method's hyper-parameters) is scored on the same
resamples, so the spread of its gap to the best is the spread the hold-out can resolve. ``fit``
uses it to prefer the simpler method or recipe within it; SRepr uses it so that its α and T are
not chosen by NLL at a cost in accuracy the hold-out can see.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 1000
"""Resamples of :func:`bootstrap_gaps`."""

__all__ = ["BOOTSTRAP", "balanced_accuracy_of", "bootstrap_gaps"]


def balanced_accuracy_of(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` ``(N,)`` of the accuracy of ``pred`` ``(N,)``."""
    n = np.bincount(labels, minlength=num_classes)
    right = np.bincount(labels, weights=(pred == labels), minlength=num_classes)
    present = n > 0
    return float((right[present] / n[present]).mean()) if present.any() else float("nan")


def bootstrap_gaps(
    preds: dict[str, np.ndarray],
    labels: np.ndarray,
    num_classes: int | None = None,
    *,
    n: int = BOOTSTRAP,
    seed: int = 0,
    best: str | None = None,
) -> dict[str, tuple[float, float]]:
    """Each entry's balanced-accuracy gap to the best one, over a stratified paired bootstrap.

    Every resample draws, within each class, as many validation images as the class has (with
    replacement), and scores every entry on the same images. The gap is the one on the full
    validation split; the resamples give its standard deviation.

    Args:
        preds: name -> predicted labels ``(N,)`` on the validation images.
        labels: ``(N,)`` true labels.
        num_classes: ``C``; default one more than the largest label or prediction.
        best: the reference entry; default the highest balanced accuracy on the full
            validation split (the first of equals).

    Returns:
        name -> (gap, standard deviation): ``best - entry`` in balanced accuracy on the full
        validation split and its standard deviation over the resamples (fractions); ``(0, 0)``
        for the best itself.
    """
    names = list(preds)
    if num_classes is None:
        num_classes = int(max(labels.max(), *(p.max() for p in preds.values()))) + 1
    full = {k: balanced_accuracy_of(preds[k], labels, num_classes) for k in names}
    if best is None:
        best = max(names, key=lambda k: full[k])
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    members = [m for m in members if len(m)]
    correct = np.stack([(preds[k] == labels) for k in names]).astype(np.float32)  # (K, N)
    total = np.zeros((len(names), n))  # (K, n): sum over classes of per-class accuracy
    for m in members:  # one draw matrix per class: (n resamples, n_c images)
        draw = m[rng.integers(0, len(m), (n, len(m)))]
        total += correct[:, draw].mean(axis=2)
    acc = {k: total[i] / len(members) for i, k in enumerate(names)}
    return {
        k: (full[best] - full[k], float((acc[best] - acc[k]).std()) if k != best else 0.0)
        for k in names
    }
