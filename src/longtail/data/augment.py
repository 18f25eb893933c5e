"""Whole-batch augmentation of uint8 image tensors, on the device that trains.

No per-sample Python: a batch ``(B, C, H, W)`` is padded once, then cropped and flipped by one
gather; normalisation happens in the same pass that casts to float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandomCrop(H, padding) + RandomHorizontalFlip for a whole batch.

    Args:
        x: ``(B, C, H, W)`` images (any dtype; uint8 in the hot loop).
        padding: zero padding on each side before the random ``H x W`` crop, in pixels.
        flip: flip each image left-right with probability 1/2.
        generator: CPU random generator (offsets are drawn on CPU, then moved).
    Returns:
        ``(B, C, H, W)`` tensor of ``x``'s dtype and device.
    """
    b, c, h, w = x.shape
    dev = x.device
    if padding <= 0 and not flip:
        return x
    # Crop and flip are one gather over each channel's flattened padded image, a flip reversing
    # that image's column indices (on a 2-core CPU, 128 x 3 x 32 x 32 uint8: 0.26 ms against
    # 1.07 for an advanced-index crop followed by flip + where). Offsets and flips are drawn on
    # the CPU generator, in this order, and moved.
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if padding > 0:
        rows = rows + torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(dev)
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(dev)
        x = F.pad(x, (padding, padding, padding, padding))
    if flip:
        flipped = (torch.rand(b, generator=generator) < 0.5).to(dev).view(b, 1)
        cols = torch.where(flipped, cols.flip(1), cols)
    hp, wp = h + 2 * max(padding, 0), w + 2 * max(padding, 0)
    flat = (rows.unsqueeze(2) * wp + cols.unsqueeze(1)).view(b, 1, h * w)
    return x.reshape(b, c, hp * wp).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def normalize(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in 0..255 -> float32 ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are ``(C,)`` in ``[0, 1]`` units, on ``x``'s device.
    """
    out = (x.float() * (1.0 / 255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
