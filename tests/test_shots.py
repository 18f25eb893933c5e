"""Many / medium / few-shot splits (docs/METHODS.md, "Data"; Kang et al. ``shot_acc``)."""

from __future__ import annotations

import numpy as np
import pytest

from longtail.data.longtail import longtail_counts
from longtail.data.shots import ShotSplits, shot_splits

COUNTS = np.array([1000, 101, 100, 99, 50, 21, 20, 19, 1, 0])


def test_default_thresholds_and_boundaries():
    s = shot_splits(COUNTS)
    assert isinstance(s, ShotSplits)
    assert s.many.tolist() == [True, True] + [False] * 8  # > 100
    assert s.medium.tolist() == [False, False, True, True, True, True, True, False, False, False]
    assert s.few.tolist() == [False] * 7 + [True, True, True]  # < 20
    assert s.sizes() == {"many": 2, "medium": 5, "few": 3}


def test_splits_partition_the_classes():
    counts = np.random.RandomState(0).randint(0, 300, size=500)
    s = shot_splits(counts)
    total = s.many.astype(int) + s.medium.astype(int) + s.few.astype(int)
    assert (total == 1).all()
    assert sum(s.sizes().values()) == 500
    assert (counts[s.many] > 100).all() and (counts[s.few] < 20).all()
    assert ((counts[s.medium] >= 20) & (counts[s.medium] <= 100)).all()


def test_configurable_thresholds():
    s = shot_splits(COUNTS, many=50, few=21)
    assert s.many.tolist() == [True, True, True, True] + [False] * 6  # > 50
    assert s.medium.tolist() == [False] * 4 + [True, True] + [False] * 4  # 21..50
    assert s.few.tolist() == [False] * 6 + [True] * 4  # < 21
    # equal thresholds: medium is exactly that count
    e = shot_splits(COUNTS, many=20, few=20)
    assert np.flatnonzero(e.medium).tolist() == [6]
    assert e.sizes() == {"many": 6, "medium": 1, "few": 3}


def test_few_above_many_is_rejected():
    with pytest.raises(ValueError, match="30 exceeds.*10"):
        shot_splits(COUNTS, many=10, few=30)


def test_cifar100_lt_if100_split_sizes():
    # the usual CIFAR-100-LT (IF 100) split: 35 many, 35 medium, 30 few classes
    s = shot_splits(longtail_counts(500, 100, 100))
    assert s.sizes() == {"many": 35, "medium": 35, "few": 30}
    assert np.flatnonzero(s.many).tolist() == list(range(35))
    assert np.flatnonzero(s.few).tolist() == list(range(70, 100))


def test_accepts_lists():
    s = shot_splits([150, 60, 5])
    assert s.many.tolist() == [True, False, False]
    assert s.medium.tolist() == [False, True, False]
    assert s.few.tolist() == [False, False, True]
