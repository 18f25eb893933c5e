"""Whole-batch augmentation of uint8 image tensors, on the device that trains.

No per-sample Python: a batch ``(B, C, H, W)`` is padded once, cropped with one gather, and
flipped with one ``where``; normalisation happens in the same pass that casts to float.
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
    b, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(dev)
        rows = (oy + torch.arange(h, device=dev)).unsqueeze(2)  # (B, H, 1)
        cols = (ox + torch.arange(w, device=dev)).unsqueeze(1)  # (B, 1, W)
        batch = torch.arange(b, device=dev).view(b, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(dev).view(b, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


def normalize(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in 0..255 -> float32 ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are ``(C,)`` in ``[0, 1]`` units, on ``x``'s device.
    """
    out = (x.float() * (1.0 / 255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
