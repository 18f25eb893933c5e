"""Evaluation metrics: accuracy (overall, per class, many/medium/few shot), NLL, ECE, Brier.

Conventions (docs/METHODS.md, "Evaluation"):

- ``logits`` are raw classifier outputs of shape ``(N, C)``; ``probs`` are softmax probabilities of
  shape ``(N, C)`` (each row non-negative, summing to 1); ``labels`` are integer class indices of
  shape ``(N,)`` in ``[0, C)``.
- Every accuracy is a fraction in ``[0, 1]``, never a percentage.
- NLL is in nats (natural log), averaged over examples.
- ECE uses ``n_bins`` equal-width confidence bins; a sample with confidence ``c`` falls in the bin
  ``(lo, hi]``, as in MiSLAS and Nam et al.'s evaluation code.
- The prediction is ``argmax`` over classes; ties go to the lowest class index (``torch.argmax``).

All computation happens on the CPU in float64, whatever the input dtype (float16 and bfloat16 are
accepted) or device. Inputs are detached, so the functions are safe to call on tensors that require
grad. Empty inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from longtail.data.shots import shot_splits

__all__ = [
    "accuracy",
    "brier",
    "evaluate_logits",
    "expected_calibration_error",
    "nll",
    "per_class_accuracy",
    "reliability_bins",
    "shot_accuracy",
]

# Tolerance for "each row of probs sums to 1": loose enough for float16 softmax outputs over many
# classes, tight enough to catch logits passed where probabilities were expected.
_PROB_SUM_TOL = 1e-2


# --------------------------------------------------------------------------- input checks


def _as_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    """Return ``labels`` as a CPU int64 tensor of shape ``(n,)``, checked to lie in ``[0, C)``."""
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but the scores have {n} rows")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _as_scores(scores: Tensor, name: str) -> Tensor:
    """Return a 2-D ``(N, C)`` score tensor as a finite CPU float64 tensor (N > 0, C > 0)."""
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    scores = scores.detach().to("cpu", torch.float64)
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0): nothing to evaluate")
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no classes (C = 0)")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


def _check_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validated float64 ``(N, C)`` logits and int64 ``(N,)`` labels, both on the CPU."""
    z = _as_scores(logits, "logits")
    return z, _as_labels(labels, z.shape[0], z.shape[1])


def _check_probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validated float64 ``(N, C)`` probabilities and int64 ``(N,)`` labels, both on the CPU."""
    p = _as_scores(probs, "probs")
    if bool((p < -1e-6).any()) or bool((p > 1 + 1e-6).any()):
        raise ValueError(
            "probs must lie in [0, 1]; did you pass logits? Apply softmax(logits, dim=1) first"
        )
    worst = float((p.sum(dim=1) - 1).abs().max())
    if worst > _PROB_SUM_TOL:
        raise ValueError(
            f"each row of probs must sum to 1 (largest deviation {worst:.3g}); "
            "did you pass logits? Apply softmax(logits, dim=1) first"
        )
    return p, _as_labels(labels, p.shape[0], p.shape[1])


# --------------------------------------------------------------------------- accuracy


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities: only the argmax matters).
        labels: ``(N,)`` int64 class indices in ``[0, C)``.

    Returns:
        Fraction of examples whose argmax equals the label, in ``[0, 1]``.
    """
    z, y = _check_logits(logits, labels)
    return float((z.argmax(dim=1) == y).double().mean())


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class over that class's test examples (recall per class).

    Args:
        logits: ``(N, C)`` scores with ``C == num_classes``.
        labels: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        float64 array of shape ``(num_classes,)``, fractions in ``[0, 1]``; NaN for a class with no
        test example.
    """
    z = _as_scores(logits, "logits")
    if z.shape[1] != num_classes:
        raise ValueError(f"logits have {z.shape[1]} classes but num_classes={num_classes}")
    y = _as_labels(labels, z.shape[0], num_classes)
    correct = (z.argmax(dim=1) == y).double()
    totals = torch.bincount(y, minlength=num_classes).double()
    hits = torch.bincount(y, weights=correct, minlength=num_classes)
    out = np.full(num_classes, np.nan, dtype=np.float64)
    seen = (totals > 0).numpy()
    out[seen] = (hits[totals > 0] / totals[totals > 0]).numpy()
    return out


def _nanmean_or_nan(values: np.ndarray) -> float:
    """Mean of the non-NaN entries of ``values``, or NaN if there are none (no warning)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def shot_accuracy(
    per_class: np.ndarray, train_counts: np.ndarray, many: int = 100, few: int = 20
) -> dict[str, float]:
    """Many / medium / few-shot accuracy (Kang et al.; docs/METHODS.md, "Data", shot splits).

    Args:
        per_class: ``(C,)`` per-class accuracies in ``[0, 1]`` (NaN for classes without test
            examples), e.g. from :func:`per_class_accuracy`.
        train_counts: ``(C,)`` number of training images of each class.
        many: a class is many-shot if its training count is ``> many``.
        few: a class is few-shot if its training count is ``< few``; the rest
            (``few..many`` inclusive) are medium-shot.

    Returns:
        ``{"many": a, "medium": b, "few": c}``: the unweighted mean of per-class accuracies of
        the classes in each split, fractions in ``[0, 1]``. Classes whose accuracy is NaN are left
        out of the mean; a split with no (non-NaN) class is NaN.
    """
    per_class = np.asarray(per_class, dtype=np.float64)
    train_counts = np.asarray(train_counts)
    if per_class.ndim != 1 or train_counts.shape != per_class.shape:
        raise ValueError(
            f"per_class {per_class.shape} and train_counts {train_counts.shape} must both have "
            "shape (C,)"
        )
    splits = shot_splits(train_counts, many, few)
    return {
        "many": _nanmean_or_nan(per_class[splits.many]),
        "medium": _nanmean_or_nan(per_class[splits.medium]),
        "few": _nanmean_or_nan(per_class[splits.few]),
    }


# ------------------------------------------------------------------ likelihood and calibration


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits)``.

    Computed as ``-log_softmax(logits)[n, labels[n]]`` averaged over ``n`` in float64 (stable for
    large logits); equals ``torch.nn.functional.cross_entropy(logits, labels)``.

    Args:
        logits: ``(N, C)`` raw (unnormalised) scores.
        labels: ``(N,)`` int64 class indices in ``[0, C)``.

    Returns:
        Mean NLL in nats, ``>= 0``.
    """
    z, y = _check_logits(logits, labels)
    logp = torch.log_softmax(z, dim=1)
    return float(-logp.gather(1, y[:, None]).mean())


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence among ``n_bins`` equal-width bins ``(lo, hi]`` over ``[0, 1]``.

    Edges are ``np.linspace(0, 1, n_bins + 1)``. A confidence exactly on an inner edge goes to the
    lower bin; 1.0 goes to the last bin. A confidence of exactly 0 (outside every ``(lo, hi]``) is
    put in the first bin so that every sample counts towards ``N``; it cannot occur for a valid
    probability row, whose maximum is at least ``1 / C``.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") returns i with edges[i-1] < c <= edges[i]: c is in bin i - 1.
    idx = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin statistics for ECE and reliability diagrams.

    Confidence is the max probability of each row, the prediction its argmax. Samples are grouped
    into ``n_bins`` equal-width confidence bins ``(lo, hi]`` (see :func:`expected_calibration_error`
    for the edge rules).

    Args:
        probs: ``(N, C)`` probabilities (rows sum to 1).
        labels: ``(N,)`` int64 class indices in ``[0, C)``.
        n_bins: number of bins.

    Returns:
        A dict of numpy arrays:

        - ``"edges"``: ``(n_bins + 1,)`` float64 bin edges, ``0`` to ``1``;
        - ``"count"``: ``(n_bins,)`` int64 number of samples per bin;
        - ``"accuracy"``: ``(n_bins,)`` float64 fraction of correct predictions per bin, in
          ``[0, 1]``, NaN for an empty bin;
        - ``"confidence"``: ``(n_bins,)`` float64 mean confidence per bin, NaN for an empty bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _check_probs(probs, labels)
    conf, pred = p.max(dim=1)
    conf_np = conf.numpy()
    correct = (pred == y).numpy().astype(np.float64)
    idx = _bin_index(conf_np, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    hit_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf_np, minlength=n_bins)
    acc = np.full(n_bins, np.nan)
    mean_conf = np.full(n_bins, np.nan)
    nonempty = count > 0
    acc[nonempty] = hit_sum[nonempty] / count[nonempty]
    mean_conf[nonempty] = conf_sum[nonempty] / count[nonempty]
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count,
        "accuracy": acc,
        "confidence": mean_conf,
    }


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (MiSLAS / Nam et al.).

    ``ECE = sum_b |acc_b - conf_b| * n_b / N`` where, for bin ``b``, ``n_b`` is the number of
    samples whose confidence (max probability) lies in ``(lo_b, hi_b]``, ``acc_b`` the fraction of
    them whose argmax is correct and ``conf_b`` their mean confidence. Edges are
    ``np.linspace(0, 1, n_bins + 1)``: a confidence exactly on an inner edge goes to the lower bin,
    1.0 to the last bin; empty bins contribute nothing. A confidence of exactly 0 (impossible for
    a valid probability row) would be put in the first bin.

    Args:
        probs: ``(N, C)`` probabilities (rows sum to 1), e.g. ``softmax(logits, dim=1)``.
        labels: ``(N,)`` int64 class indices in ``[0, C)``.
        n_bins: number of bins (15 in the reference code).

    Returns:
        ECE as a fraction in ``[0, 1]``.
    """
    bins = reliability_bins(probs, labels, n_bins)
    count = bins["count"]
    nonempty = count > 0
    gap = np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])
    return float((gap * count[nonempty]).sum() / count.sum())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score, sum form: ``mean_n sum_c (probs[n, c] - onehot(labels[n])_c)^2``.

    The squared error is summed over classes (Brier's original definition), not averaged over them,
    so the score lies in ``[0, 2]``: 0 for a confident correct prediction, 2 for a confident wrong
    one. Divide by ``C`` to get the per-class-averaged variant some papers report.

    Args:
        probs: ``(N, C)`` probabilities (rows sum to 1).
        labels: ``(N,)`` int64 class indices in ``[0, C)``.

    Returns:
        Mean Brier score over the ``N`` examples, in ``[0, 2]``.
    """
    p, y = _check_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(y, num_classes=p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


# --------------------------------------------------------------------------- everything at once


def _json_float(x: float) -> float | None:
    """``x`` as a plain float, or ``None`` when it is NaN (strict JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def evaluate_logits(
    logits: Tensor,
    labels: Tensor,
    train_counts: np.ndarray,
    many: int = 100,
    few: int = 20,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All test metrics from one set of logits, as a JSON-ready dict (docs/METHODS.md,
    "Evaluation").

    Args:
        logits: ``(N, C)`` raw classifier outputs on the (balanced) test set.
        labels: ``(N,)`` int64 class indices in ``[0, C)``.
        train_counts: ``(C,)`` number of training images per class (for the shot splits).
        many: many-shot threshold (training count ``> many``).
        few: few-shot threshold (training count ``< few``).
        n_bins: number of ECE bins.

    Returns:
        A dict of plain Python values, serialisable with ``json.dumps(..., allow_nan=False)``:

        - ``"accuracy"``: top-1 accuracy, fraction in ``[0, 1]``;
        - ``"many"``, ``"medium"``, ``"few"``: shot-split accuracies, fractions, or ``None`` when a
          split has no class with test examples;
        - ``"nll"``: mean NLL in nats;
        - ``"ece"``: ECE of ``softmax(logits)``, fraction;
        - ``"brier"``: multi-class Brier score (sum form, in ``[0, 2]``);
        - ``"per_class"``: list of ``C`` per-class accuracies (``None`` for a class with no test
          example).
    """
    z, y = _check_logits(logits, labels)
    num_classes = z.shape[1]
    train_counts = np.asarray(train_counts)
    if train_counts.shape != (num_classes,):
        raise ValueError(
            f"train_counts has shape {train_counts.shape} but the logits have {num_classes} classes"
        )
    probs = torch.softmax(z, dim=1)
    per_class = per_class_accuracy(z, y, num_classes)
    shots = shot_accuracy(per_class, train_counts, many, few)
    return {
        "accuracy": accuracy(z, y),
        "many": _json_float(shots["many"]),
        "medium": _json_float(shots["medium"]),
        "few": _json_float(shots["few"]),
        "nll": nll(z, y),
        "ece": expected_calibration_error(probs, y, n_bins),
        "brier": brier(probs, y),
        "per_class": [_json_float(a) for a in per_class],
    }
