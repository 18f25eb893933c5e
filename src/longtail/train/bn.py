"""BatchNorm re-estimation for averaged or sampled weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn


def refresh_bn(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: torch.autocast | None = None,
) -> None:
    """Recompute BN running statistics with one pass over ``batches`` of ``(x, y)``.

    Like ``torch.optim.swa_utils.update_bn``, but the running mean and variance average the
    batch statistics weighted by batch size: ``update_bn`` gives a last partial batch of a few
    images the same weight as a full one. ``x`` is ``(B, C, H, W)``; the model is left in eval
    mode with every BN layer's ``momentum`` restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
            for x, _ in batches:
                b = int(x.shape[0])
                for m in bns:  # running = (seen * running + b * batch) / (seen + b)
                    m.momentum = b / (seen + b)
                model(x)
                seen += b
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
    model.eval()
