"""Batched model inference: logits or features of a whole split, in eval mode, no gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def collect_outputs(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    what: str = "logits",
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``batches`` of ``(x (B, C, H, W), y (B,))``.

    Returns ``(out, labels)`` on CPU: ``out`` float32 ``(N, num_classes)`` for
    ``what="logits"`` or ``(N, feature_dim)`` for ``what="features"``; ``labels`` ``(N,)``.
    """
    was_training = model.training
    model.eval()
    fn = model.features if what == "features" else model
    outs, labels = [], []
    for x, y in batches:
        with autocast or contextlib.nullcontext():
            out = fn(x)
        outs.append(out.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)
