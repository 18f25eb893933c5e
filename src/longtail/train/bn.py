"""BatchNorm re-estimation for averaged or sampled weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn


def has_bn(model: nn.Module) -> bool:
    """True when the model has BatchNorm layers whose statistics need refreshing."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def refresh_bn(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: torch.autocast | None = None,
) -> None:
    """Recompute BN running statistics with one pass over ``batches`` of ``(x, y)``.

    Uses ``torch.optim.swa_utils.update_bn`` (cumulative average over the pass); the model is
    left in eval mode.
    """
    if not has_bn(model):
        return
    with torch.no_grad():
        if autocast is not None:
            with autocast:
                update_bn(batches, model)
        else:
            update_bn(batches, model)
    model.eval()
