"""Samplers of Kang et al. (eq. 1-2): instance-, class-balanced, square-root, q, progressive.

Every sampler draws one epoch of ``N`` indices (``N`` = dataset size, whatever the sampler) from a
generator seeded by ``(seed, epoch)``, so a draw is reproducible and resumable. Under distributed
training rank ``r`` of ``W`` takes ``draw[r::W]`` of the same global draw: the shares are disjoint
and their union is the single-process draw.
"""

from __future__ import annotations

import math

import numpy as np

from longtail.core.errors import LongtailError

SAMPLERS = ("instance", "class_balanced", "sqrt", "q", "progressive")


def class_probabilities(counts: np.ndarray, q: float) -> np.ndarray:
    """``p_j = n_j^q / sum_i n_i^q`` over classes, shape ``(C,)``; empty classes get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, np.power(np.maximum(counts, 1e-300), q), 0.0)
    return w / w.sum()


class LongTailSampler:
    """Base class: ``epoch_indices(epoch)`` is one epoch's global draw, ``(N,)`` int64."""

    def __init__(self, labels: np.ndarray, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.counts = np.bincount(self.labels, minlength=self.num_classes)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self._members = [np.flatnonzero(self.labels == c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        """Indices this rank receives per epoch."""
        return math.ceil(len(self.labels) / self.world_size)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch)])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def shard(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's share of the epoch's draw from global position ``start`` on.

        The remainder ``draw[start:]`` is padded by wrap-around to a multiple of the world size
        and rank ``r`` takes every ``W``-th element from ``r``; skipping ``start`` global draws
        is the same for any world size, so a run can resume on a different number of ranks.
        """
        draw = self.epoch_indices(epoch)[start:]
        w = self.world_size
        total = -(-len(draw) // w) * w
        if total > len(draw):
            draw = np.concatenate([draw, draw[: total - len(draw)]])
        return draw[self.rank :: w]

    def _from_class_sequence(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Map a sequence of class ids to images, each class cycling its own shuffled list."""
        out = np.empty(len(classes), dtype=np.int64)
        for c in np.unique(classes):
            pos = np.flatnonzero(classes == c)
            members = self._members[c]
            reps = math.ceil(len(pos) / len(members))
            stream = np.concatenate([rng.permutation(members) for _ in range(reps)])
            out[pos] = stream[: len(pos)]
        return out


class InstanceBalancedSampler(LongTailSampler):
    """q = 1: every image once per epoch, in random order."""

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(len(self.labels))


class ClassBalancedSampler(LongTailSampler):
    """q = 0, Kang's reference: cycle a shuffled class list, ``per_class`` images per visit."""

    def __init__(self, labels: np.ndarray, per_class: int = 4, **kw):
        super().__init__(labels, **kw)
        self.per_class = int(per_class)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        n = len(self.labels)
        present = np.flatnonzero(self.counts > 0)
        groups = math.ceil(n / self.per_class)
        cycles = math.ceil(groups / len(present))
        visits = np.concatenate([rng.permutation(present) for _ in range(cycles)])[:groups]
        classes = np.repeat(visits, self.per_class)[:n]
        return self._from_class_sequence(classes, rng)


class QSampler(LongTailSampler):
    """General q (q = 1/2 square-root): classes drawn i.i.d. from ``p_j ∝ n_j^q``."""

    def __init__(self, labels: np.ndarray, q: float = 0.5, **kw):
        super().__init__(labels, **kw)
        self.q = float(q)

    def probabilities(self, epoch: int) -> np.ndarray:
        return class_probabilities(self.counts, self.q)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        classes = rng.choice(self.num_classes, size=len(self.labels), p=self.probabilities(epoch))
        return self._from_class_sequence(classes, rng)


class ProgressiveSampler(QSampler):
    """``p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB`` over epochs ``t`` of ``T``."""

    def __init__(self, labels: np.ndarray, total_epochs: int, **kw):
        super().__init__(labels, q=1.0, **kw)
        self.total_epochs = max(int(total_epochs), 1)

    def probabilities(self, epoch: int) -> np.ndarray:
        t = min(epoch / self.total_epochs, 1.0)
        return (1 - t) * class_probabilities(self.counts, 1.0) + t * class_probabilities(
            self.counts, 0.0
        )


def make_sampler(
    name: str,
    labels: np.ndarray,
    *,
    seed: int = 0,
    q: float = 0.5,
    total_epochs: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> LongTailSampler:
    """A sampler by name: ``instance``, ``class_balanced``, ``sqrt``, ``q`` or ``progressive``."""
    kw = {"seed": seed, "rank": rank, "world_size": world_size}
    if name == "instance":
        return InstanceBalancedSampler(labels, **kw)
    if name == "class_balanced":
        return ClassBalancedSampler(labels, **kw)
    if name == "sqrt":
        return QSampler(labels, q=0.5, **kw)
    if name == "q":
        return QSampler(labels, q=q, **kw)
    if name == "progressive":
        return ProgressiveSampler(labels, total_epochs=total_epochs, **kw)
    raise LongtailError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
