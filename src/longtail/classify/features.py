"""Feature banks of a frozen backbone, computed once and cached in the run directory.

``features/<backbone>.pt`` holds ``{split: (z (N, d), y (N,))}`` for train / val / test;
``features/swag-<tag>.pt`` holds M SWAG-sample banks ``(M, N, d)`` per split, each computed
after re-estimating BatchNorm for that sample. Large banks are stored as float16.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from longtail.core.distributed import average_bn_buffers, gather_rows, world
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_torch_save, verified_load
from longtail.core.progress import progress
from longtail.core.runtime import Runtime
from longtail.data.loader import BatchLoader
from longtail.models.inference import collect_outputs
from longtail.train.bn import refresh_bn
from longtail.train.swag import SWAG

FLOAT16_ABOVE = 50_000_000  # elements; larger banks are stored as float16


def _store(t: torch.Tensor) -> torch.Tensor:
    return t.half() if t.numel() > FLOAT16_ABOVE else t.float()


def extract(
    model: nn.Module,
    loaders: dict[str, BatchLoader],
    rt: Runtime,
    splits: tuple[str, ...] = ("train", "val", "test"),
    seconds: dict[str, float] | None = None,
) -> dict:
    """``{split: (features (N, d) float32, labels (N,))}`` for the splits that have loaders.

    ``seconds``, when given, receives the wall time of each split's pass.
    """
    out = {}
    for s in splits:
        if s in loaders:
            t0 = time.perf_counter()
            out[s] = sharded_features(model, loaders[s], rt, desc=f"features ({s})")
            if seconds is not None:
                seconds[f"extract_{s}"] = time.perf_counter() - t0
    return out


class _Mirrored(nn.Module):
    """``features(x)`` of ``model`` on the left-right mirror images ``x.flip(3)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)  # collect_outputs restores this mode onto model afterwards

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x.flip(3))


def mirror_averaged(
    model: nn.Module,
    loaders: dict[str, BatchLoader],
    rt: Runtime,
    plain: dict,
    splits: tuple[str, ...] = ("val", "test"),
) -> dict:
    """``{split: (features (N, d), labels (N,))}``: the mean of each image's features and its
    left-right mirror image's, for the evaluation ``splits`` that have loaders.

    ``plain`` holds the un-mirrored features (:func:`extract`); only the mirror images pass
    through ``model``.
    """
    mirrored = extract(_Mirrored(model), loaders, rt, splits)
    out = {}
    for s, (zm, y) in mirrored.items():
        z, y0 = plain[s]
        if not torch.equal(y, y0):
            raise LongtailError(f"mirror features of {s!r} are not in the cached order")
        out[s] = (0.5 * (z.float() + zm), y)
    return out


def sharded_features(
    model: nn.Module, loader: BatchLoader, rt: Runtime, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, d)`` and labels ``(N,)`` of a whole split; under torchrun each rank
    passes ``1/W`` of the split and the shards are gathered on every rank.

    ``desc``, when given, labels a progress bar over the batches (terminal, rank 0 only).
    """
    rank, ws = world()
    idx = np.arange(len(loader.ds))[rank::ws] if ws > 1 else np.arange(len(loader.ds))
    batches = loader.batches(idx)
    if desc is not None:
        batches = progress(batches, desc=desc, total=loader.num_batches(len(idx)), unit="batch")
    z, y = collect_outputs(model, batches, "features", rt.autocast())
    if ws > 1:
        z, y = gather_rows(z, len(loader.ds)), gather_rows(y, len(loader.ds))
    return z, y


def cached(path: Path, compute, log=print):
    """Load ``path`` if present (checksum verified), else compute, save atomically, return."""
    if path.is_file():
        return verified_load(path)
    t0 = time.perf_counter()
    value = compute()
    if world()[0] == 0:
        atomic_torch_save(value, path)
        log(f"cached {path.name} ({time.perf_counter() - t0:.1f} s)")
    return value


def swag_banks(
    model: nn.Module,
    swag: SWAG,
    loaders: dict[str, BatchLoader],
    rt: Runtime,
    num_samples: int,
    scale: float,
    seed: int,
    bn_images: int,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> dict:
    """Features under ``num_samples`` SWAG weight samples: ``{split: (bank (M, N, d), y)}``.

    BatchNorm is re-estimated for every sample on ``bn_images`` augmented training images
    (all of them when 0), then each split is passed through once.
    """
    net = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(loaders["train"].ds)
    bn_idx = np.random.default_rng(seed).permutation(n_train)
    if bn_images > 0:
        bn_idx = bn_idx[:bn_images]
    rank, ws = world()
    bn_idx = bn_idx[rank::ws]
    banks: dict[str, list] = {s: [] for s in splits if s in loaders}
    labels: dict[str, torch.Tensor] = {}
    bar = progress(range(num_samples), desc="SWAG feature banks", unit="sample")
    for _ in bar:
        swag.sample(net, scale, gen)
        refresh_bn(net, loaders["train_aug"].batches(bn_idx), rt.autocast())
        average_bn_buffers(net)
        for s in banks:
            z, y = sharded_features(net, loaders[s], rt)
            banks[s].append(_store(z))
            labels[s] = y
    return {s: (torch.stack(v), labels[s]) for s, v in banks.items()}
