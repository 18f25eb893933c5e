"""File-backed datasets decoded lazily with PIL, for ImageNet-LT-sized data.

Images are decoded and augmented per sample in DataLoader workers (unavoidable for JPEGs) and
returned as uint8 ``(C, S, S)`` tensors; normalisation happens on the training device.
"""

from __future__ import annotations

import torch
from PIL import Image

from longtail.core.errors import LongtailError
from longtail.data.datasets import ImageDataset
from longtail.imaging import exif_orientation, pil_to_rgb  # noqa: F401 - re-exported


def build_transform(train: bool, size: int, channels: int = 3, color_jitter: float = 0.0):
    """torchvision v2 pipeline PIL -> uint8 ``(C, size, size)``.

    Train: RandomResizedCrop + flip (+ ColorJitter). Eval: Resize(size * 8/7) + CenterCrop.
    """
    from torchvision.transforms import v2

    ops = [v2.PILToTensor()]
    if train:
        ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        if color_jitter > 0 and channels == 3:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        ops += [v2.Resize(int(round(size * 8 / 7)), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(ops)


class FileImages(torch.utils.data.Dataset):
    """``dataset[i] -> (uint8 (C, S, S) image, int label)`` for a file-backed ImageDataset."""

    def __init__(self, ds: ImageDataset, transform, channels: int = 3):
        if ds.paths is None:
            raise ValueError("FileImages needs a file-backed ImageDataset")
        self.paths, self.labels = ds.paths, ds.labels.tolist()
        self.transform, self.channels = transform, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.paths[i]) as img:
                img = pil_to_rgb(img, self.channels)
                return self.transform(img), self.labels[i]
        except (OSError, ValueError) as e:
            raise LongtailError(f"cannot read image {self.paths[i]!r}: {e}") from e
