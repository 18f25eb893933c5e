"""Long-tailed subsets of balanced datasets (Cao et al. 2019) and validation hold-outs.

``n_i = int(n_max * (1 / IF) ** (i / (C - 1)))`` (exponential) or a step profile; examples are
picked with ``numpy.random.seed(seed)`` then, per class in label order, a shuffle of that class's
indices and the first ``n_i`` kept. Subsets for different imbalance factors at one seed are nested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtail.core.errors import LongtailError

PROFILES = ("exp", "step")


def _check_imbalance(imbalance: float | str) -> float:
    """The imbalance factor as a float >= 1, or a LongtailError naming the value given."""
    given = imbalance
    try:
        imbalance = float(imbalance)
    except (TypeError, ValueError):
        raise LongtailError(f"imbalance factor must be a number >= 1, got {given!r}") from None
    if not 1.0 <= imbalance < float("inf"):  # also rejects NaN
        raise LongtailError(
            f"imbalance factor must be a finite number >= 1 (n_max / n_min), got {given!r}; "
            "use 1 for balanced"
        )
    return imbalance


def _check_seed(seed: object) -> int:
    """The seed as an int in [0, 2**32), or a LongtailError naming the value given."""
    given = seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        if isinstance(seed, str) and seed.strip().lstrip("-").isdigit():
            seed = int(seed)
        else:
            raise LongtailError(f"seed must be a non-negative integer, got {seed!r}")
    if seed < 0 or seed >= 2**32:
        raise LongtailError(f"seed must be a non-negative integer below 2**32, got {given!r}")
    return int(seed)


def longtail_counts(
    n_max: int, num_classes: int, imbalance: float, profile: str = "exp"
) -> np.ndarray:
    """Images per class of a long-tailed profile, shape ``(num_classes,)``, int64.

    ``imbalance`` is n_max / n_min (>= 1). ``profile`` is ``exp`` or ``step``.
    """
    imbalance = _check_imbalance(imbalance)
    c = num_classes
    if profile == "exp":
        if c == 1:
            return np.array([n_max], dtype=np.int64)
        return np.array(
            [int(n_max * (1.0 / imbalance) ** (i / (c - 1))) for i in range(c)], dtype=np.int64
        )
    if profile == "step":
        half = c // 2
        return np.array([n_max] * half + [int(n_max / imbalance)] * (c - half), dtype=np.int64)
    raise LongtailError(f"unknown imbalance profile {profile!r}; known: {', '.join(PROFILES)}")


def _class_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Each class's indices shuffled by the reference rule (one global RNG, label order)."""
    rng = np.random.RandomState(seed)  # the same stream as numpy.random.seed(seed)
    orders = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        orders.append(idx)
    return orders


def longtail_indices(
    labels: np.ndarray,
    imbalance: float,
    *,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
) -> np.ndarray:
    """Indices of the long-tailed subset of a balanced set with integer ``labels`` ``(N,)``.

    ``n_max`` defaults to the smallest class size, so every class can supply its quota.
    """
    return longtail_split(
        labels, imbalance, profile=profile, seed=seed, val_per_class=0, n_max=n_max
    ).train


@dataclass
class LongTailSplit:
    """Indices into the original training set: the long-tailed train subset and a hold-out.

    ``borrowed`` counts, per class, validation images taken from the class's long-tailed quota
    because the class had fewer than ``val_per_class`` images left outside it (only the head
    class at full size); they are removed from ``train``, so the two never overlap.
    """

    train: np.ndarray
    val: np.ndarray
    subset_counts: np.ndarray
    borrowed: np.ndarray


def longtail_split(
    labels: np.ndarray,
    imbalance: float,
    *,
    profile: str = "exp",
    seed: int = 0,
    val_per_class: int = 0,
    n_max: int | None = None,
) -> LongTailSplit:
    """The long-tailed subset plus a class-balanced validation hold-out disjoint from it.

    The hold-out for class ``c`` is the last ``val_per_class`` indices of the class's shuffled
    order, i.e. images the long-tailed subset did not pick whenever the class has that many left.
    """
    labels = np.asarray(labels)
    seed = _check_seed(seed)
    if val_per_class < 0:
        raise LongtailError(f"val_per_class must be >= 0, got {val_per_class}")
    num_classes = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=num_classes)
    if (sizes == 0).any():
        raise LongtailError(f"class(es) {np.flatnonzero(sizes == 0).tolist()} have no images")
    n_max = int(sizes.min()) if n_max is None else int(n_max)
    if n_max > sizes.min():
        c = int(sizes.argmin())
        raise LongtailError(
            f"n_max={n_max} exceeds the {sizes[c]} images of class {c}; use at most {sizes.min()}"
        )
    counts = longtail_counts(n_max, num_classes, imbalance, profile)
    if (counts < 1).any():
        raise LongtailError(
            f"imbalance factor {imbalance:g} leaves class {int(np.argmin(counts))} with no image "
            f"(n_max={n_max}); use an imbalance factor of at most {n_max}"
        )
    orders = _class_orders(labels, num_classes, seed)
    train, val, borrowed = [], [], np.zeros(num_classes, dtype=np.int64)
    for c, (order, n) in enumerate(zip(orders, counts, strict=True)):
        v = val_per_class
        if v >= len(order):
            raise LongtailError(
                f"class {c} has {len(order)} images: too few for a validation hold-out of "
                f"{val_per_class} per class; lower data.val_per_class"
            )
        keep = min(int(n), len(order) - v) if v else int(n)
        borrowed[c] = int(n) - keep
        train.append(order[:keep])
        val.append(order[len(order) - v :] if v else order[:0])
    return LongTailSplit(np.concatenate(train), np.concatenate(val), counts, borrowed)


def imbalance_factor(counts: np.ndarray) -> float:
    """n_max / n_min of per-class ``counts`` (inf when a class is empty)."""
    counts = np.asarray(counts)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
