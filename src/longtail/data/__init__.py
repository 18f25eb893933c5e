"""Datasets, long-tailed subsets, shot splits, samplers and batch augmentation."""

from longtail.data.datasets import ImageDataset, available_datasets, load_dataset
from longtail.data.longtail import longtail_counts, longtail_indices, longtail_split
from longtail.data.samplers import make_sampler
from longtail.data.shots import ShotSplits, shot_splits
from longtail.data.user import load_user_split, save_user_split  # registers dataset 'user'

__all__ = [
    "ImageDataset",
    "ShotSplits",
    "available_datasets",
    "load_dataset",
    "load_user_split",
    "longtail_counts",
    "longtail_indices",
    "longtail_split",
    "make_sampler",
    "save_user_split",
    "shot_splits",
]
