"""Learning-rate schedules as a function of fractional epoch (warm-up, step, cosine, SWA)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from longtail.core.errors import LongtailError


def lr_at(
    epoch: float,
    base_lr: float,
    epochs: int,
    *,
    warmup_epochs: float = 0.0,
    schedule: str = "step",
    milestones: list[float] | tuple = (),
    gamma: float = 0.1,
    swa_start: float | None = None,
    swa_lr: float = 0.01,
    swa_anneal_epochs: float = 0.0,
) -> float:
    """Learning rate at fractional ``epoch`` (0 < epoch <= epochs; pass the epoch reached
    after the step, ``e + (step + 1) / steps_per_epoch``).

    Linear warm-up over ``warmup_epochs``; then ``step`` (x ``gamma`` at each milestone epoch),
    ``cosine`` (to 0 at ``epochs``) or ``constant``. From ``swa_start`` on (when given), the lr
    anneals with a cosine from its value at ``swa_start`` to ``swa_lr`` over
    ``swa_anneal_epochs`` and stays there (Izmailov et al.; Nam et al.'s SWA schedule).
    """

    def base(e: float) -> float:
        if warmup_epochs > 0 and e < warmup_epochs:
            return base_lr * max(e, 1e-3) / warmup_epochs
        if schedule == "step":
            return base_lr * gamma ** sum(e >= m for m in milestones)
        if schedule == "cosine":
            span = max(epochs - warmup_epochs, 1e-8)
            return 0.5 * base_lr * (1 + math.cos(math.pi * min((e - warmup_epochs) / span, 1.0)))
        return base_lr

    if swa_start is None or epoch < swa_start:
        return base(epoch)
    start_lr = base(swa_start)
    if swa_anneal_epochs <= 0 or epoch >= swa_start + swa_anneal_epochs:
        return swa_lr
    t = (epoch - swa_start) / swa_anneal_epochs
    return swa_lr + (start_lr - swa_lr) * 0.5 * (1 + math.cos(math.pi * t))


def swa_start_epoch(cfg: DictConfig) -> int | None:
    """First epoch (0-based) whose end adds a snapshot, or ``None`` without SWA."""
    if not cfg.swa.enabled:
        return None
    s = cfg.swa.start
    if s >= 1 and s != int(s):
        raise LongtailError(
            f"swa.start={s}: give a whole epoch number (>= 1) or a fraction of the epochs (< 1)"
        )
    start = int(round(s * cfg.optim.epochs)) if s < 1 else int(s)
    if not 0 <= start < cfg.optim.epochs:
        raise LongtailError(f"swa.start={s} falls outside the {cfg.optim.epochs} training epochs")
    return start


def swa_collect_from(cfg: DictConfig) -> float | None:
    """Fractional epoch from which SWA and SWAG take snapshots, or ``None`` without SWA.

    Snapshots start once the lr has reached ``swa.lr``: ``swa.start + swa.anneal_epochs``, as
    Maddox et al. collect only at the constant SWA lr (snapshots taken while the lr still anneals
    inflate SWAG's variance). A step's snapshot counts when the fractional epoch reached after
    it (the epoch its lr was computed for) is at least this; a per-epoch snapshot, when the
    epoch's end is.
    """
    start = swa_start_epoch(cfg)
    if start is None:
        return None
    anneal = float(cfg.swa.anneal_epochs)
    if anneal < 0:
        raise LongtailError(f"swa.anneal_epochs={anneal}: give 0 or more epochs")
    begin = start + anneal
    if begin >= cfg.optim.epochs:
        raise LongtailError(
            f"swa.start={cfg.swa.start} (epoch {start}) + swa.anneal_epochs={anneal} = {begin}: "
            f"the lr reaches swa.lr only at or after the end of training (optim.epochs="
            f"{cfg.optim.epochs}), so SWA and SWAG would have no snapshot at the constant SWA lr; "
            "lower swa.start or swa.anneal_epochs, or train longer"
        )
    return begin
