"""Batches of normalised images for a sequence of indices, from memory or from disk.

``BatchLoader.batches(indices)`` yields ``(x, y)`` with ``x`` float32 ``(B, C, H, W)`` (channels
last when asked) on the training device and ``y`` int64 ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from longtail.data.augment import normalize, random_crop_flip, random_erase
from longtail.data.datasets import ImageDataset


class BatchLoader:
    """Index-driven batches; in-memory datasets are augmented a whole batch at a time.

    Args:
        ds: the dataset.
        batch_size: images per batch.
        device: where batches are produced.
        train: apply training augmentation (crop with ``padding`` and flip, or the streaming
            pipeline for file-backed data).
        padding: random-crop padding in pixels (in-memory data).
        flip: random horizontal flip.
        image_size: side of the square crop for file-backed data.
        num_workers: DataLoader workers for file-backed data.
        channels_last: return channels-last tensors (faster convolutions on CPU and GPU).
        seed: seed of the augmentation generator.
        color_jitter: colour jitter strength of the streaming pipeline (RGB files only).
        erasing: random-erasing probability per training image
            (:func:`~longtail.data.augment.random_erase`, after crop and flip; both storages).
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        train: bool = False,
        padding: int = 4,
        flip: bool = True,
        image_size: int = 224,
        num_workers: int = 2,
        channels_last: bool = False,
        seed: int = 0,
        color_jitter: float = 0.0,
        erasing: float = 0.0,
    ):
        self.ds, self.batch_size, self.device = ds, int(batch_size), torch.device(device)
        self.train, self.padding, self.flip, self.erasing = train, padding, flip, erasing
        self.channels_last, self.num_workers = channels_last, num_workers
        self.mean = torch.tensor(ds.mean, device=self.device)
        self.std = torch.tensor(ds.std, device=self.device)
        self.generator = torch.Generator().manual_seed(seed)
        if ds.in_memory:
            self.images = ds.images.to(self.device)
            self.labels = ds.labels.to(self.device)
        else:
            from longtail.data.streaming import FileImages, build_transform

            tf = build_transform(train, image_size, ds.channels, color_jitter)
            self.files = FileImages(ds, tf, ds.channels)

    def num_batches(self, n: int, drop_last: bool = False) -> int:
        """Batches produced for ``n`` indices."""
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def batches(
        self, indices: np.ndarray | None = None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches over ``indices`` (all examples in order when ``None``)."""
        if indices is None:
            indices = np.arange(len(self.ds))
        n = len(indices)
        stop = self.num_batches(n, drop_last) * self.batch_size
        chunks = [indices[i : min(i + self.batch_size, n)] for i in range(0, stop, self.batch_size)]
        if self.ds.in_memory:
            yield from self._memory_batches(chunks)
        else:
            yield from self._file_batches(chunks)

    def _memory_batches(self, chunks):
        for chunk in chunks:
            idx = torch.as_tensor(chunk, device=self.device)
            x = self.images.index_select(0, idx)
            if self.train:
                x = random_crop_flip(x, self.padding, self.flip, self.generator)
                x = random_erase(x, self.erasing, self.generator)
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[idx]

    def _file_batches(self, chunks):
        dl = torch.utils.data.DataLoader(
            self.files,
            batch_sampler=[c.tolist() for c in chunks],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for x, y in dl:
            x = x.to(self.device, non_blocking=True)
            if self.train:
                x = random_erase(x, self.erasing, self.generator)
            yield normalize(x, self.mean, self.std, self.channels_last), y.to(self.device)
