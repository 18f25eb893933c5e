"""Datasets, long-tailed subsets, shot splits, samplers and batch augmentation."""

from longtail.data.datasets import ImageDataset, available_datasets, load_dataset
from longtail.data.longtail import longtail_counts, longtail_indices, longtail_split
from longtail.data.samplers import make_sampler
from longtail.data.shots import ShotSplits, shot_splits

__all__ = [
    "ImageDataset",
    "ShotSplits",
    "available_datasets",
    "load_dataset",
    "longtail_counts",
    "longtail_indices",
    "longtail_split",
    "make_sampler",
    "shot_splits",
]
