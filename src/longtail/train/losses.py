"""Stage-1 losses: cross-entropy and logit adjustment / Balanced Softmax, optional mixup."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from longtail.core.errors import LongtailError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(
    name: str, train_counts: np.ndarray, tau: float = 1.0, label_smoothing: float = 0.0
) -> LossFn:
    """``loss(logits (B, C), target (B,) int64 or (B, C) soft) -> scalar``.

    ``logit_adjusted`` / ``balanced_softmax`` add ``tau * log(prior)`` to the logits inside the
    loss only (Menon et al. 2021; Ren et al. 2020, equal at tau = 1); predictions stay raw.
    """
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if name not in ("logit_adjusted", "balanced_softmax"):
        raise LongtailError(f"unknown loss {name!r}; known: ce, logit_adjusted, balanced_softmax")
    prior = torch.as_tensor(np.asarray(train_counts, dtype=np.float64) / np.sum(train_counts))
    log_prior = prior.clamp_min(1e-12).log().float()

    def adjusted(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift = (tau * log_prior).to(logits.device)
        return F.cross_entropy(logits.float() + shift, y, label_smoothing=label_smoothing)

    return adjusted


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    alpha: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): ``x (B, ...)`` and one-hot targets ``(B, C)`` mixed with a
    permuted copy by ``lam ~ Beta(alpha, alpha)``."""
    lam = float(
        np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(
            alpha, alpha
        )
    )
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    target = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]
