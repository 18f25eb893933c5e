"""A run's data from its config: the splits (:func:`build_data`) and their batch loaders
(:func:`make_loaders`), shared by stage 1 (:mod:`longtail.train.loop`), stage 2
(:mod:`longtail.classify.run`) and ``fit``."""

from __future__ import annotations

from omegaconf import DictConfig

from longtail.data.loader import BatchLoader
from longtail.data.prepare import DataSplits, prepare_data
from longtail.runtime import Runtime


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
            splits.train, bs, train=True, seed=cfg.seed, color_jitter=d.color_jitter, **common
        ),
        "train_eval": BatchLoader(splits.train, 512, **common),
        "test": BatchLoader(splits.test, 512, **common),
    }
    if splits.val is not None:
        out["val"] = BatchLoader(splits.val, 512, **common)
    return out
