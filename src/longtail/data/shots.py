"""Many / medium / few-shot class splits (Kang et al., ``shot_acc``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShotSplits:
    """Boolean masks over classes, each of shape ``(num_classes,)``."""

    many: np.ndarray
    medium: np.ndarray
    few: np.ndarray

    def sizes(self) -> dict[str, int]:
        """Number of classes in each split."""
        return {k: int(getattr(self, k).sum()) for k in ("many", "medium", "few")}


def shot_splits(train_counts: np.ndarray, many: int = 100, few: int = 20) -> ShotSplits:
    """Split classes by training count: many ``> many``, few ``< few``, medium otherwise.

    Defaults follow Kang et al.: many-shot > 100 images, few-shot < 20, medium 20..100.
    """
    if few > many:
        raise ValueError(f"few-shot threshold {few} exceeds many-shot threshold {many}")
    counts = np.asarray(train_counts)
    is_many = counts > many
    is_few = counts < few
    return ShotSplits(is_many, ~is_many & ~is_few, is_few)
