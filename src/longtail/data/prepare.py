"""From a dataset name to train / val / test splits ready for training.

Balanced datasets (digits, Fashion-MNIST, CIFAR) get the long-tailed subset of docs/METHODS.md,
"Data", and a class-balanced validation hold-out disjoint from it. Natively long-tailed datasets
keep their own lists; without a val list, a small balanced hold-out is carved from train.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from longtail.core.errors import LongtailError
from longtail.data.datasets import _NATIVE_LT, ImageDataset, load_dataset
from longtail.data.longtail import _check_seed, imbalance_factor, longtail_split


@dataclass
class DataSplits:
    """The three splits and how they were made (``info`` goes into the run directory)."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    info: dict = field(default_factory=dict)


def balanced_holdout(
    labels: np.ndarray, per_class: int, seed: int = 0, max_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, holdout): up to ``per_class`` per class, never more than
    ``max_fraction`` of a class and never a class's last image. Shapes ``(N - V,)``, ``(V,)``."""
    rng = np.random.RandomState(seed)
    keep, hold = [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        v = min(per_class, int(len(idx) * max_fraction))
        hold.append(idx[:v])
        keep.append(idx[v:])
    return np.concatenate(keep), np.concatenate(hold)


def _align_classes(*splits: ImageDataset | None) -> list[ImageDataset | None]:
    """Give list-file splits one class list: the longest of them (labels are indices)."""
    longest = max((s.classes for s in splits if s is not None), key=len)
    return [None if s is None else replace(s, classes=list(longest)) for s in splits]


def _check_disjoint(
    dataset: str, train: ImageDataset, val: ImageDataset | None, test: ImageDataset
) -> None:
    """Refuse file-backed splits that share an image with the test set (a test-set leak).

    A test split whose ``meta["in_training"]`` is true declares its images part of training on
    purpose (``longtail fit``'s re-fit, :mod:`longtail.data.user`) and is let through."""
    if test.paths is None or test.meta.get("in_training"):
        return
    test_paths = set(test.paths)
    for name, split in (("training", train), ("validation", val)):
        if split is None or split.paths is None:
            continue
        shared = test_paths.intersection(split.paths)
        if shared:
            raise LongtailError(
                f"{dataset}: {len(shared)} test image(s) are also in the {name} split, e.g. "
                f"{sorted(shared)[0]}: give the test set its own list (or folder), disjoint "
                f"from the {name} one"
            )


def prepare_data(
    dataset: str,
    *,
    root: str | None = None,
    imbalance: float | None = 100.0,
    profile: str = "exp",
    seed: int = 0,
    val_per_class: int = 20,
    download: bool = False,
    list_dir: str | None = None,
    n_max: int | None = None,
) -> DataSplits:
    """Load ``dataset`` and build its long-tailed train, validation and test splits.

    ``imbalance`` (n_max / n_min) applies to balanced datasets; ``None`` or a natively
    long-tailed dataset keeps the training set as it is.
    """
    seed = _check_seed(seed)
    full = load_dataset(dataset, "train", root, download=download, list_dir=list_dir)
    test = load_dataset(dataset, "test", root, download=download, list_dir=list_dir)
    val = load_dataset(dataset, "val", root, download=download, list_dir=list_dir)
    native = dataset.lower().replace("_", "-") in _NATIVE_LT or dataset in ("folder", "user")
    if dataset.lower().replace("_", "-") in _NATIVE_LT:
        full, val, test = _align_classes(full, val, test)
    counts = full.counts()
    if (counts == 0).any():
        empty = [full.classes[c] for c in np.flatnonzero(counts == 0)]
        raise LongtailError(f"{dataset}: class(es) with no training images: {', '.join(empty)}")
    info: dict = {"dataset": dataset, "seed": seed, "source_train_size": len(full)}
    if imbalance is not None and not native:
        split = longtail_split(
            full.labels.numpy(),
            imbalance,
            profile=profile,
            seed=seed,
            val_per_class=val_per_class,
            n_max=n_max,
        )
        train = full.subset(split.train)
        if val is None and len(split.val):
            val = full.subset(split.val)
        info.update(
            imbalance=float(imbalance),
            profile=profile,
            subset_counts=split.subset_counts.tolist(),
            val_borrowed=split.borrowed.tolist(),
        )
    else:
        train = full
        if val is None and val_per_class > 0:
            keep, hold = balanced_holdout(full.labels.numpy(), val_per_class, seed)
            train, val = full.subset(keep), full.subset(hold)
        info.update(imbalance=imbalance_factor(train.counts()), profile="native")
    _check_disjoint(dataset, train, val, test)
    # every split is normalised with the training source's statistics, never with its own
    val = None if val is None else replace(val, mean=full.mean, std=full.std)
    test = replace(test, mean=full.mean, std=full.std)
    info.update(
        train_counts=train.counts().tolist(),
        val_size=0 if val is None else len(val),
        test_size=len(test),
    )
    return DataSplits(train, val, test, info)
