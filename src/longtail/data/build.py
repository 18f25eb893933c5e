"""A run's data from its config: the splits (:func:`build_data`) and their batch loaders
(:func:`make_loaders`, the batch size checked by :func:`check_batch_size`), shared by stage 1
(:mod:`longtail.train.loop`), stage 2 (:mod:`longtail.classify.run`) and ``fit``."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from longtail.core.errors import LongtailError
from longtail.core.runtime import Runtime
from longtail.data.loader import BatchLoader
from longtail.data.prepare import DataSplits, prepare_data


def build_data(cfg: DictConfig) -> DataSplits:
    """The run's train / val / test splits from ``cfg.data``."""
    d = cfg.data
    return prepare_data(
        d.dataset,
        root=d.root,
        imbalance=d.imbalance,
        profile=d.profile,
        seed=d.subset_seed,
        val_per_class=d.val_per_class,
        download=d.download,
        list_dir=d.list_dir,
        n_max=d.n_max,
    )


def check_batch_size(batch_size: int, world_size: int, n_train: int | None = None) -> int:
    """Check stage 1's global batch ``optim.batch_size`` against the ``world_size`` processes
    and, when given, the ``n_train`` training images; returns the per-process batch.

    Each process trains on ``batch_size / world_size`` images per step out of its
    ``ceil(n_train / world_size)`` draws per epoch and drops the last partial batch, so a batch
    larger than that share would give epochs of no steps. Callers run this before writing
    anything (``fit`` before ``OUT/data``, :class:`~longtail.train.Stage1` before the run
    directory). Raises :class:`LongtailError` naming the value and a value that works.
    """
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise LongtailError(
            f"optim.batch_size={batch_size} (the global batch) must be divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
            + (f", e.g. optim.batch_size={lower}" if lower else "")
        )
    per = batch_size // world_size
    if n_train is not None and math.ceil(n_train / world_size) < per:
        most = world_size * math.ceil(n_train / world_size)
        raise LongtailError(
            f"optim.batch_size={batch_size} exceeds the {n_train} training images: an epoch "
            f"would have no full batch; use optim.batch_size={most} or less"
        )
    return per


def make_loaders(
    cfg: DictConfig, splits: DataSplits, rt: Runtime, batch_size: int | None = None
) -> dict[str, BatchLoader]:
    """``train`` (augmented), ``train_eval`` (plain), ``val`` and ``test`` loaders.

    ``train`` batches hold ``batch_size`` images (default: this process's share of
    ``cfg.optim.batch_size``); the evaluation loaders 512.
    """
    d = cfg.data
    common = {
        "device": rt.device,
        "padding": d.padding,
        "flip": d.flip,
        "image_size": d.image_size,
        "num_workers": d.num_workers,
        "channels_last": rt.channels_last,
    }
    bs = batch_size or max(cfg.optim.batch_size // rt.world_size, 1)
    out = {
        "train": BatchLoader(
            splits.train,
            bs,
            train=True,
            seed=cfg.seed,
            color_jitter=d.color_jitter,
            erasing=d.erasing,
            **common,
        ),
        "train_eval": BatchLoader(splits.train, 512, **common),
        "test": BatchLoader(splits.test, 512, **common),
    }
    if splits.val is not None:
        out["val"] = BatchLoader(splits.val, 512, **common)
    return out
