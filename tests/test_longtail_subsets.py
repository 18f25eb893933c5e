"""Long-tailed subsets of balanced datasets (docs/METHODS.md, "Data"; Cao et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longtail.core.errors import LongtailError
from longtail.data.datasets import FASHION_MNIST_ROOT, channel_stats, load_fashion_mnist
from longtail.data.longtail import (
    imbalance_factor,
    longtail_counts,
    longtail_indices,
    longtail_split,
)
from longtail.data.prepare import prepare_data

CIFAR10_TOTALS = {10: 20431, 50: 13996, 100: 12406, 200: 11203}
CIFAR100_TOTALS = {10: 19573, 50: 12608, 100: 10847, 200: 9502}
CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def reference_indices(labels: np.ndarray, counts, seed: int) -> np.ndarray:
    """Cao et al.'s ``imbalance_cifar.py`` selection, verbatim in spirit: global numpy RNG."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        picked = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            picked.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(picked)


def balanced_labels(num_classes: int, per_class: int, shuffle_seed: int | None = None):
    labels = np.repeat(np.arange(num_classes), per_class)
    if shuffle_seed is not None:
        labels = np.random.RandomState(shuffle_seed).permutation(labels)
    return labels


# ------------------------------------------------------------------ profiles
@pytest.mark.parametrize("imbalance, total", sorted(CIFAR10_TOTALS.items()))
def test_cifar10_exp_totals(imbalance, total):
    counts = longtail_counts(5000, 10, imbalance)
    assert counts.dtype == np.int64
    assert counts.shape == (10,)
    assert int(counts.sum()) == total


@pytest.mark.parametrize("imbalance, total", sorted(CIFAR100_TOTALS.items()))
def test_cifar100_exp_totals(imbalance, total):
    counts = longtail_counts(500, 100, imbalance)
    assert counts.shape == (100,)
    assert int(counts.sum()) == total


def test_cifar10_if100_counts():
    counts = longtail_counts(5000, 10, 100)
    assert counts.tolist() == CIFAR10_IF100
    assert imbalance_factor(counts) == 100.0


@pytest.mark.parametrize("imbalance", [1, 10, 100, 200])
def test_exp_profile_head_tail_and_monotone(imbalance):
    counts = longtail_counts(500, 100, imbalance)
    assert counts[0] == 500
    assert counts[-1] == int(500 / imbalance)
    assert (np.diff(counts) <= 0).all()


def test_balanced_when_imbalance_is_one():
    assert longtail_counts(5000, 10, 1).tolist() == [5000] * 10
    assert longtail_counts(7, 1, 100).tolist() == [7]


def test_step_profile():
    assert longtail_counts(5000, 10, 100, "step").tolist() == [5000] * 5 + [50] * 5
    assert longtail_counts(500, 100, 10, "step").tolist() == [500] * 50 + [50] * 50
    assert int(longtail_counts(500, 100, 100, "step").sum()) == 50 * 500 + 50 * 5
    # odd class count: floor(C / 2) head classes, the rest tail
    assert longtail_counts(600, 5, 3, "step").tolist() == [600, 600, 200, 200, 200]


def test_unknown_profile():
    with pytest.raises(LongtailError, match="'linear'"):
        longtail_counts(5000, 10, 100, "linear")


# ------------------------------------------------------------------ selection rule
@pytest.mark.parametrize("seed", [0, 1, 1234])
@pytest.mark.parametrize("imbalance, profile", [(10, "exp"), (100, "exp"), (100, "step")])
def test_matches_reference_rule_cifar10(seed, imbalance, profile):
    labels = balanced_labels(10, 5000, shuffle_seed=7)
    counts = longtail_counts(5000, 10, imbalance, profile)
    got = longtail_indices(labels, imbalance, profile=profile, seed=seed)
    ref = reference_indices(labels, counts, seed)
    assert np.array_equal(got, ref)  # same indices in the same order
    assert np.bincount(labels[got], minlength=10).tolist() == counts.tolist()


def test_matches_reference_rule_cifar100():
    labels = balanced_labels(100, 500, shuffle_seed=3)
    got = longtail_indices(labels, 100, seed=0)
    ref = reference_indices(labels, longtail_counts(500, 100, 100), 0)
    assert np.array_equal(got, ref)
    assert len(got) == CIFAR100_TOTALS[100]
    assert len(np.unique(got)) == len(got)


def test_indices_are_valid_and_unique():
    labels = balanced_labels(10, 5000)
    idx = longtail_indices(labels, 100, seed=0)
    assert idx.min() >= 0 and idx.max() < len(labels)
    assert len(np.unique(idx)) == len(idx) == CIFAR10_TOTALS[100]
    assert np.bincount(labels[idx]).tolist() == CIFAR10_IF100


def test_nested_across_imbalance_factors():
    labels = balanced_labels(10, 5000, shuffle_seed=11)
    subsets = {f: longtail_indices(labels, f, seed=0) for f in (1, 10, 50, 100, 200)}
    order = [1, 10, 50, 100, 200]
    for big, small in zip(order, order[1:], strict=False):
        assert set(subsets[small].tolist()) < set(subsets[big].tolist())
    # per class, the smaller subset is a prefix of the larger one's pick
    for c in range(10):
        a = subsets[10][labels[subsets[10]] == c]
        b = subsets[200][labels[subsets[200]] == c]
        assert np.array_equal(a[: len(b)], b)


def test_seed_changes_selection():
    labels = balanced_labels(10, 5000)
    a = longtail_indices(labels, 100, seed=0)
    b = longtail_indices(labels, 100, seed=1)
    assert len(a) == len(b)
    assert set(a.tolist()) != set(b.tolist())
    # head class is whole in both; the tail picks differ
    assert set(a[labels[a] == 0].tolist()) == set(b[labels[b] == 0].tolist())
    assert set(a[labels[a] == 9].tolist()) != set(b[labels[b] == 9].tolist())


def test_numpy_integer_seed_and_explicit_n_max():
    labels = balanced_labels(10, 500)
    idx = longtail_indices(labels, 10, seed=np.int64(5), n_max=100)
    assert np.bincount(labels[idx]).tolist() == longtail_counts(100, 10, 10).tolist()
    assert np.array_equal(idx, reference_indices(labels, longtail_counts(100, 10, 10), 5))


def test_n_max_defaults_to_smallest_class():
    labels = np.concatenate([np.full(300, 0), np.full(200, 1), np.full(250, 2)])
    idx = longtail_indices(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [200, 100, 50]


# ------------------------------------------------------------------ validation hold-out
def test_split_val_disjoint_balanced_and_borrowed():
    labels = balanced_labels(10, 5000, shuffle_seed=5)
    split = longtail_split(labels, 100, seed=0, val_per_class=20)
    train, val = split.train, split.val
    assert not set(train.tolist()) & set(val.tolist())
    assert len(np.unique(val)) == len(val) == 200
    assert np.bincount(labels[val], minlength=10).tolist() == [20] * 10
    assert split.subset_counts.tolist() == CIFAR10_IF100
    # only the head class (all 5000 images in its quota) lends images to validation
    assert split.borrowed.tolist() == [20] + [0] * 9
    assert np.bincount(labels[train], minlength=10).tolist() == [4980] + CIFAR10_IF100[1:]
    # the train part is the reference subset minus the head's borrowed images
    ref = reference_indices(labels, CIFAR10_IF100, 0)
    assert set(train.tolist()) <= set(ref.tolist())
    assert len(set(ref.tolist()) - set(train.tolist())) == 20


def test_split_val_is_same_across_imbalance_and_nested_train():
    labels = balanced_labels(10, 5000, shuffle_seed=5)
    s10 = longtail_split(labels, 10, seed=3, val_per_class=50)
    s100 = longtail_split(labels, 100, seed=3, val_per_class=50)
    assert np.array_equal(np.sort(s10.val), np.sort(s100.val))
    assert set(s100.train.tolist()) < set(s10.train.tolist())
    assert not set(s10.train.tolist()) & set(s10.val.tolist())


def test_split_step_profile_borrows_from_every_head_class():
    labels = balanced_labels(10, 1000)
    split = longtail_split(labels, 10, profile="step", seed=0, val_per_class=30)
    assert split.borrowed.tolist() == [30] * 5 + [0] * 5
    assert np.bincount(labels[split.train]).tolist() == [970] * 5 + [100] * 5
    assert np.bincount(labels[split.val]).tolist() == [30] * 10
    assert not set(split.train.tolist()) & set(split.val.tolist())


def test_split_without_val_equals_indices():
    labels = balanced_labels(10, 500, shuffle_seed=2)
    split = longtail_split(labels, 50, seed=4)
    assert len(split.val) == 0
    assert split.borrowed.tolist() == [0] * 10
    assert np.array_equal(split.train, longtail_indices(labels, 50, seed=4))


def test_split_rejects_negative_val():
    with pytest.raises(LongtailError, match="-1"):
        longtail_split(balanced_labels(3, 10), 2, val_per_class=-1)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "bad, shown", [(0.5, "0.5"), (0, "0"), (-10, "-10"), (float("nan"), "nan")]
)
def test_bad_imbalance(bad, shown):
    labels = balanced_labels(10, 100)
    with pytest.raises(LongtailError, match=shown) as exc:
        longtail_indices(labels, bad)
    assert "imbalance" in str(exc.value)
    with pytest.raises(LongtailError, match=shown):
        longtail_counts(100, 10, bad)


def test_non_numeric_imbalance():
    with pytest.raises(LongtailError, match="'lots'"):
        longtail_counts(100, 10, "lots")


@pytest.mark.parametrize(
    "bad, shown", [(1.5, "1.5"), ("abc", "'abc'"), (None, "None"), (True, "True"), (-1, "-1")]
)
def test_bad_seed(bad, shown):
    labels = balanced_labels(10, 100)
    with pytest.raises(LongtailError, match=shown) as exc:
        longtail_indices(labels, 10, seed=bad)
    assert "seed" in str(exc.value)


def test_seed_out_of_range():
    with pytest.raises(LongtailError, match=str(2**32)):
        longtail_split(balanced_labels(2, 10), 2, seed=2**32)


def test_empty_class_rejected():
    labels = np.array([0, 0, 2, 2])
    with pytest.raises(LongtailError, match=r"\[1\]"):
        longtail_indices(labels, 2)


# ------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def fmnist_full():
    return load_fashion_mnist(FASHION_MNIST_ROOT, "train")


@pytest.mark.fashion_mnist
def test_fashion_mnist_lt_if100(fmnist_full):
    splits = prepare_data("fashion-mnist", imbalance=100, val_per_class=0)
    expected = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert splits.train.counts().tolist() == expected
    assert len(splits.train) == 14886
    assert splits.val is None
    assert splits.train.images.shape == (14886, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8
    assert len(splits.test) == 10000
    assert splits.test.counts().tolist() == [1000] * 10
    assert splits.info["subset_counts"] == expected
    # the subset is the reference rule applied to the real label order
    labels = fmnist_full.labels.numpy()
    assert np.bincount(labels).tolist() == [6000] * 10
    ref = reference_indices(labels, expected, 0)
    assert torch.equal(splits.train.labels, fmnist_full.labels[ref])
    assert torch.equal(splits.train.images, fmnist_full.images[torch.from_numpy(ref)])


@pytest.mark.fashion_mnist
def test_every_split_is_normalised_with_training_statistics() -> None:
    s = prepare_data("fashion-mnist", imbalance=100, val_per_class=20)
    train_mean, train_std = channel_stats(load_fashion_mnist(None, "train").images)
    test_mean, _ = channel_stats(load_fashion_mnist(None, "test").images)
    assert test_mean != train_mean  # the splits' own statistics do differ
    for split in (s.train, s.val, s.test):
        assert split.mean == train_mean and split.std == train_std


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"imbalance": 10, "n_max": 300}, r"n_max=300 exceeds the 100 images of class 3"),
        ({"imbalance": 1000}, r"imbalance factor 1000 leaves class 3 with no image"),
        ({"imbalance": 10, "val_per_class": 100}, r"class 3 has 100 images: too few"),
    ],
)
def test_split_refuses_what_it_cannot_honour(kwargs: dict, message: str) -> None:
    labels = np.repeat(np.arange(5), [200, 200, 200, 100, 200])
    with pytest.raises(LongtailError, match=message):
        longtail_split(labels, **kwargs)
