"""SRepr: classifier re-training on stochastic representations with self-distillation.

This project's reading of Nam, Jang & Lee (ICLR 2023), see docs/METHODS.md:
``z0 = f(x; theta_SWA)`` and ``z_m = f(x; theta_m)`` for M SWAG samples. A fresh linear head
``g`` is trained with class-balanced sampling on

    (1 - alpha) * CE(g(z_m), y)  with m drawn per example            (stochastic representations)
  + alpha * T^2 * KL( stopgrad(mean_m softmax(g(z_m) / T)) || softmax(g(z0) / T) )
                                                                    (SWAG average -> SWA student)

optionally weighting each example's distillation term by the teacher's confidence. At test time
the prediction is ``softmax(g(z0))``: one pass of the SWA backbone. :class:`BMAHead` is the
reference it is compared with: the same ``g`` averaged over the M SWAG feature banks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longtail.classify.heads import LinearHead, train_head
from longtail.evaluate.bootstrap import bootstrap_gaps

SREPR_RULE = (
    "lowest validation NLL among the (α, T) whose validation balanced accuracy is within one "
    "bootstrap sd of the best grid point's"
)


def srepr_loss(
    head: LinearHead,
    z0: torch.Tensor,
    bank: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    temperature: float,
    weighting: str = "none",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batch loss. ``z0`` ``(B, d)``, ``bank`` ``(M, B, d)``, ``y`` ``(B,)``; a scalar."""
    m, b, _ = bank.shape
    logits_m = head(bank.reshape(m * b, -1)).view(m, b, -1)  # (M, B, C)
    pick = torch.randint(0, m, (b,), generator=generator)
    ce = F.cross_entropy(logits_m[pick, torch.arange(b)], y)
    if alpha == 0:
        return ce
    t = temperature
    with torch.no_grad():
        teacher = F.softmax(logits_m / t, dim=-1).mean(0)  # (B, C) SWAG model average
    student = F.log_softmax(head(z0) / t, dim=-1)
    kl = (teacher * (teacher.clamp_min(1e-12).log() - student)).sum(1)  # (B,)
    if weighting == "confidence":
        w = teacher.max(1).values
        kl = kl * (w / w.mean())
    return (1 - alpha) * ce + alpha * t * t * kl.mean()


def train_srepr(
    z0: torch.Tensor,
    bank: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    alpha: float = 0.5,
    temperature: float = 2.0,
    weighting: str = "none",
    epochs: int = 10,
    lr: float = 0.2,
    weight_decay: float = 5e-4,
    batch_size: int = 512,
    seed: int = 0,
) -> LinearHead:
    """Train SRepr's head on SWA features ``z0`` ``(N, d)`` and SWAG banks ``(M, N, d)``."""
    head = LinearHead.fresh(z0.shape[1], num_classes, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def loss(h, idx, yb):
        return srepr_loss(
            h, z0[idx].float(), bank[:, idx].float(), yb, alpha, temperature, weighting, g
        )

    return train_head(
        head,
        list(head.parameters()),
        loss,
        y,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )


def choose_alpha_temperature(
    sweep: list[dict], labels: np.ndarray, num_classes: int, seed: int = 0
) -> dict:
    """The grid point :data:`SREPR_RULE` picks.

    Args:
        sweep: one row per grid point with ``alpha``, ``temperature``, ``val_nll`` and ``pred``
            (the head's predicted labels ``(N,)`` on the validation images); ``pred`` is
            removed, and ``val_gap`` / ``val_gap_sd`` (balanced-accuracy gap to the best grid
            point and its sd over the stratified paired bootstrap, fractions) and ``eligible``
            are added, in place.
        labels: ``(N,)`` validation labels.
        num_classes: ``C``.
        seed: the bootstrap's seed.

    Returns:
        The chosen row: the lowest ``val_nll`` among the eligible ones (``val_gap <=
        val_gap_sd``; the best itself always is), ties to the smaller α.
    """
    preds = {i: r.pop("pred") for i, r in enumerate(sweep)}
    gaps = bootstrap_gaps(preds, labels, num_classes, seed=seed)
    for i, r in enumerate(sweep):
        r["val_gap"], r["val_gap_sd"] = gaps[i]
        r["eligible"] = bool(r["val_gap"] <= r["val_gap_sd"])
    return min((r for r in sweep if r["eligible"]), key=lambda r: (r["val_nll"], r["alpha"]))


def bma_logits(head: torch.nn.Module, bank: torch.Tensor) -> torch.Tensor:
    """SWAG Bayesian model average: ``log mean_m softmax(head(z_m))``, ``(N, C)``."""
    with torch.no_grad():
        probs = torch.stack([F.softmax(head(bank[i].float()), -1) for i in range(bank.shape[0])])
        return probs.mean(0).clamp_min(1e-12).log()


class BMAHead(torch.nn.Module):
    """A head averaged over SWAG samples: banks ``(M, N, d)`` -> :func:`bma_logits` ``(N, C)``.

    Not deployable (it needs M backbone passes per image); ``weight`` is the inner head's, for
    the weight-norm figures.
    """

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        """The inner head's (effective) weights ``(C, d)``."""
        return self.head.weight

    def forward(self, bank: torch.Tensor) -> torch.Tensor:
        return bma_logits(self.head, bank)
