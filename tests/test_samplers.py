"""Samplers of Kang et al. (docs/METHODS.md, "Data").

Class frequencies, Kang's class-balanced rule, sharding.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from longtail.core.errors import LongtailError
from longtail.data.samplers import SAMPLERS, class_probabilities, make_sampler

# a long-tailed set of N = 1393 images (odd and not a multiple of 3: sharding pads)
COUNTS = np.array([499, 323, 209, 135, 87, 56, 36, 23, 15, 10])
N = int(COUNTS.sum())
LABELS = np.random.RandomState(0).permutation(np.repeat(np.arange(10), COUNTS))


def class_freq(draws: list[np.ndarray]) -> np.ndarray:
    idx = np.concatenate(draws)
    assert idx.min() >= 0 and idx.max() < N
    return np.bincount(LABELS[idx], minlength=10)


def assert_matches(observed: np.ndarray, p: np.ndarray, sigmas: float = 5.0) -> None:
    """Observed class counts agree with probabilities ``p`` within ``sigmas`` binomial stds."""
    m = observed.sum()
    expected = m * p
    tol = sigmas * np.sqrt(m * p * (1 - p)) + 1
    assert (np.abs(observed - expected) <= tol).all(), (observed, expected.round(1), tol.round(1))


# ------------------------------------------------------------------ class_probabilities
def test_class_probabilities_closed_forms():
    c = np.array([100, 25, 4, 0])
    assert np.allclose(class_probabilities(c, 1.0), [100 / 129, 25 / 129, 4 / 129, 0])
    assert np.allclose(class_probabilities(c, 0.0), [1 / 3, 1 / 3, 1 / 3, 0])
    assert np.allclose(class_probabilities(c, 0.5), [10 / 17, 5 / 17, 2 / 17, 0])
    w = np.array([100, 25, 4]) ** 0.3
    assert np.allclose(class_probabilities(c, 0.3)[:3], w / w.sum())
    assert class_probabilities(c, 0.3)[3] == 0
    for q in (0.0, 0.3, 1.0, 2.0):
        assert np.isclose(class_probabilities(COUNTS, q).sum(), 1.0)


# ------------------------------------------------------------------ frequencies
EPOCHS = range(8)


def test_instance_sampler_is_a_permutation_each_epoch():
    s = make_sampler("instance", LABELS, seed=3)
    for e in EPOCHS:
        idx = s.epoch_indices(e)
        assert idx.dtype == np.int64
        assert np.array_equal(np.sort(idx), np.arange(N))
    assert class_freq([s.epoch_indices(e) for e in EPOCHS]).tolist() == (8 * COUNTS).tolist()


@pytest.mark.parametrize(
    "name, q, extra",
    [
        ("sqrt", 0.5, {}),
        ("q", 0.5, {"q": 0.5}),
        ("q", 0.3, {"q": 0.3}),
        ("q", 1.0, {"q": 1.0}),
        ("q", 0.0, {"q": 0.0}),
        ("q", 1.5, {"q": 1.5}),
        ("class_balanced", 0.0, {}),
    ],
)
def test_empirical_frequencies_match_q(name, q, extra):
    s = make_sampler(name, LABELS, seed=1, **extra)
    draws = [s.epoch_indices(e) for e in EPOCHS]
    assert all(len(d) == N for d in draws)  # an epoch is N samples whatever the sampler
    observed = class_freq(draws)
    p = class_probabilities(COUNTS, q)
    assert_matches(observed, p)
    # and it is NOT instance-balanced unless q = 1 (head class share differs by far)
    if q != 1.0:
        assert abs(observed[0] / observed.sum() - COUNTS[0] / N) > 0.05


def test_sqrt_and_q_half_are_the_same_sampler():
    a = make_sampler("sqrt", LABELS, seed=4).epoch_indices(2)
    b = make_sampler("q", LABELS, seed=4, q=0.5).epoch_indices(2)
    assert np.array_equal(a, b)


def test_images_cycle_within_each_class():
    """Each class cycles its own shuffled list: per-image use differs by at most one."""
    for name in ("class_balanced", "sqrt", "progressive"):
        s = make_sampler(name, LABELS, seed=2, total_epochs=4)
        idx = s.epoch_indices(2)
        uses = np.bincount(idx, minlength=N)
        per_class = np.split(uses[np.argsort(LABELS, kind="stable")], np.cumsum(COUNTS)[:-1])
        for c, u in enumerate(per_class):
            assert len(u) == COUNTS[c]
            assert u.max() - u.min() <= 1, (name, c, u.min(), u.max())


# ------------------------------------------------------------------ progressive
T = 10


def _progressive_freq(epoch: int, seeds=range(8)) -> np.ndarray:
    draws = [
        make_sampler("progressive", LABELS, seed=s, total_epochs=T).epoch_indices(epoch)
        for s in seeds
    ]
    return class_freq(draws)


def test_progressive_probabilities():
    s = make_sampler("progressive", LABELS, total_epochs=T)
    ib, cb = class_probabilities(COUNTS, 1.0), class_probabilities(COUNTS, 0.0)
    assert np.allclose(s.probabilities(0), ib)
    assert np.allclose(s.probabilities(T), cb)
    assert np.allclose(s.probabilities(2 * T), cb)  # clamped after T
    assert np.allclose(s.probabilities(T // 2), 0.5 * ib + 0.5 * cb)
    assert np.allclose(s.probabilities(3), 0.7 * ib + 0.3 * cb)


@pytest.mark.parametrize("epoch, t", [(0, 0.0), (T // 2, 0.5), (T, 1.0)])
def test_progressive_empirical(epoch, t):
    p = (1 - t) * class_probabilities(COUNTS, 1.0) + t * class_probabilities(COUNTS, 0.0)
    assert_matches(_progressive_freq(epoch), p)


def test_progressive_moves_from_ib_to_cb():
    head = [_progressive_freq(e, seeds=range(3))[0] for e in (0, T // 2, T)]
    tail = [_progressive_freq(e, seeds=range(3))[9] for e in (0, T // 2, T)]
    assert head[0] > head[1] > head[2]
    assert tail[0] < tail[1] < tail[2]


# ------------------------------------------------------------------ Kang's class-balanced rule
def test_class_balanced_groups_of_four_cycling_classes():
    s = make_sampler("class_balanced", LABELS, seed=5)
    for e in (0, 1):
        idx = s.epoch_indices(e)
        cls = LABELS[idx]
        full = (N // 4) * 4
        groups = cls[:full].reshape(-1, 4)
        assert (groups == groups[:, :1]).all()  # 4 consecutive images of one class
        assert len(set(cls[full:].tolist())) <= 1  # the partial last group too
        visits = cls[::4]
        cycles = visits[: (len(visits) // 10) * 10].reshape(-1, 10)
        for cyc in cycles:  # every cycle visits each class once, in a shuffled order
            assert sorted(cyc.tolist()) == list(range(10))
        assert len({tuple(c) for c in cycles.tolist()}) > 1
        # hence per-epoch class counts are within one visit of N / C
        assert (np.abs(np.bincount(cls, minlength=10) - N / 10) <= 4).all()


def test_class_balanced_per_class_order_is_a_shuffled_cycle():
    s = make_sampler("class_balanced", LABELS, seed=6)
    idx = s.epoch_indices(0)
    members9 = np.flatnonzero(LABELS == 9)
    seq = idx[LABELS[idx] == 9]  # class 9 (10 images) is drawn ~139 times
    assert len(seq) > 100
    for k in range(len(seq) // 10):
        assert sorted(seq[10 * k : 10 * k + 10].tolist()) == members9.tolist()
    assert not np.array_equal(seq[:10], seq[10:20])  # reshuffled on wrap


def test_class_balanced_ignores_empty_classes():
    labels = np.array([0] * 50 + [2] * 5)
    idx = make_sampler("class_balanced", labels, seed=0).epoch_indices(0)
    assert len(idx) == 55
    counts = np.bincount(labels[idx], minlength=3)
    assert counts[1] == 0 and abs(int(counts[0]) - int(counts[2])) <= 4


# ------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("name", SAMPLERS)
def test_reproducible_per_seed_and_epoch(name):
    a = make_sampler(name, LABELS, seed=9, total_epochs=5)
    b = make_sampler(name, LABELS, seed=9, total_epochs=5)
    assert np.array_equal(a.epoch_indices(3), b.epoch_indices(3))
    assert np.array_equal(a.epoch_indices(3), a.epoch_indices(3))
    assert not np.array_equal(a.epoch_indices(3), a.epoch_indices(4))
    c = make_sampler(name, LABELS, seed=10, total_epochs=5)
    assert not np.array_equal(a.epoch_indices(3), c.epoch_indices(3))


# ------------------------------------------------------------------ distributed
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", SAMPLERS)
def test_shards_partition_the_single_process_draw(name, world_size):
    epoch = 2
    single = make_sampler(name, LABELS, seed=7, total_epochs=4).epoch_indices(epoch)
    ranks = [
        make_sampler(name, LABELS, seed=7, total_epochs=4, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    shards = [s.shard(epoch) for s in ranks]
    length = -(-N // world_size)
    assert all(len(sh) == length == len(s) for sh, s in zip(shards, ranks, strict=True))
    # interleaving the shards gives back the global draw, padded by wrap-around
    padded = np.empty(length * world_size, dtype=np.int64)
    for r, sh in enumerate(shards):
        padded[r::world_size] = sh
    assert np.array_equal(padded[:N], single)
    pad = length * world_size - N
    assert pad > 0 and np.array_equal(padded[N:], single[:pad])
    # as multisets: union of the shards minus the padding == the single-process draw
    union = Counter(np.concatenate(shards).tolist())
    union.subtract(Counter(single[:pad].tolist()))
    assert +union == Counter(single.tolist())


def test_single_process_shard_is_the_draw():
    s = make_sampler("sqrt", LABELS, seed=1)
    assert len(s) == N
    assert np.array_equal(s.shard(0), s.epoch_indices(0))


def test_unknown_sampler():
    with pytest.raises(LongtailError, match="'balanced'") as exc:
        make_sampler("balanced", LABELS)
    for name in SAMPLERS:
        assert name in str(exc.value)
