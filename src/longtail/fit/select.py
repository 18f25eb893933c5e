"""Choosing the deployed stage-2 method on the validation split, each one calibrated first.

For every deployable head (the registry's ``deployable``, :mod:`longtail.classify.registry`: all
built-in stage-2 methods but ``swag_bma``, which needs M backbone passes) the temperature that
stage 2 fitted on the validation logits (``ts.temperature`` of its results,
:mod:`longtail.evaluate.results`) is used, or, for heads without stage-2 results, one is fitted
here the same way (:func:`longtail.evaluate.calibration.fit_temperature`); the method
with the best validation **balanced accuracy** (the mean of per-class accuracies, so a
long-tailed validation split counts every class equally) is the reference, and the **simplest**
method whose gap to it is within one standard deviation of a stratified paired bootstrap over
the validation images (:func:`longtail.fit.search.bootstrap_gaps`) is chosen: a validation
split of a few images per rare class cannot tell apart methods closer than that, and the simpler
one then carries less risk. Simplicity order (:data:`SIMPLER_FIRST`): the joint classifier, one
post-hoc scalar (logit adjustment, then tau-normalisation), class means (NCM), re-trained
per-class scales (LWS), a re-trained classifier (cRT, SRepr without distillation, SRepr), then
any other method in registry order. The test split is only reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from longtail.classify import registry
from longtail.core.errors import LongtailError
from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import evaluate_logits
from longtail.evaluate.results import Results
from longtail.evaluate.tables import Table, render_text
from longtail.fit.search import bootstrap_gaps

SIMPLER_FIRST = ("joint", "logit_adjust", "tau", "ncm", "lws", "crt", "srepr_ce", "srepr")


@dataclass
class MethodScore:
    """Validation and test figures of one calibrated method.

    Attributes:
        name: the stage-2 method; ``temperature``: ``T`` fitted on validation.
        val, test: ``balanced_accuracy``, ``accuracy``, ``nll`` (raw), ``nll_ts``, ``ece_ts``,
            ``brier_ts`` (after dividing the logits by ``T``); test adds ``many`` / ``medium``
            / ``few``. Fractions, NLL in nats.
        val_pred: ``(N_v,)`` predicted labels on validation (for the bootstrap; not saved).
        gap: (gap, std): the best method's validation balanced accuracy minus this one's on
            the validation split, and its sd over the bootstrap (fractions); set by
            :func:`choose`.
    """

    name: str
    temperature: float
    val: dict
    test: dict
    val_pred: np.ndarray | None = field(default=None, repr=False)
    gap: tuple[float, float] = (0.0, 0.0)

    def to_json(self) -> dict:
        """A JSON-ready dict (without ``val_pred``)."""
        return {
            "name": self.name,
            "temperature": self.temperature,
            "val": self.val,
            "test": self.test,
            "gap_to_best": {"gap": self.gap[0], "std": self.gap[1]},
        }


def balanced_accuracy(per_class: list[float | None]) -> float:
    """Mean of the per-class accuracies of the classes that have examples."""
    vals = [a for a in per_class if a is not None and not math.isnan(a)]
    return float(np.mean(vals)) if vals else float("nan")


def _figures(
    logits: torch.Tensor, labels: torch.Tensor, t: float, counts: np.ndarray, many: int, few: int
) -> dict:
    raw = evaluate_logits(logits, labels, counts, many, few)
    ts = evaluate_logits(apply_temperature(logits, t), labels, counts, many, few)
    return {
        "balanced_accuracy": balanced_accuracy(raw["per_class"]),
        "accuracy": raw["accuracy"],
        "many": raw["many"],
        "medium": raw["medium"],
        "few": raw["few"],
        "nll": raw["nll"],
        "nll_ts": ts["nll"],
        "ece_ts": ts["ece"],
        "brier_ts": ts["brier"],
    }


@torch.no_grad()
def score_methods(
    heads: dict[str, nn.Module],
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    train_counts: np.ndarray,
    *,
    many: int = 100,
    few: int = 20,
    results: Results | None = None,
) -> list[MethodScore]:
    """Calibrate every deployable head on validation and measure it on validation and test.

    Args:
        heads: method name -> head mapping its input to logits ``(N, C)``; only the methods
            the registry calls ``deployable`` (heads on features ``(N, d)``) are scored.
        feats: ``{"val": (z (N_v, d), y (N_v,)), "test": (z, y)}`` of the deployed backbone.
        train_counts: ``(C,)`` training images per class (shot splits).
        results: stage 2's results for these heads: each method's temperature is the one
            stage 2 fitted (``ts``) instead of being fitted again; ``None``: fitted here.

    Raises:
        LongtailError: no validation split, no deployable head, or ``results`` without a
            temperature for a head (stage 2 ran with ``stage2.calibrate=false``).
    """
    if "val" not in feats:
        raise LongtailError("choosing a method needs a validation split")
    scores = []
    for name, head in heads.items():
        if not registry.get(name).deployable:
            continue
        head.eval()
        zv, yv = feats["val"]
        lv = head(zv).float()
        t = fit_temperature(lv, yv) if results is None else _stage2_temperature(results, name)
        val = _figures(lv, yv, t, train_counts, many, few)
        zt, yt = feats["test"]
        test = _figures(head(zt).float(), yt, t, train_counts, many, few)
        scores.append(MethodScore(name, t, val, test, lv.argmax(1).numpy()))
    if not scores:
        raise LongtailError("no deployable stage-2 method was fitted")
    return scores


def _stage2_temperature(results: Results, name: str) -> float:
    """The temperature stage 2 fitted on validation for ``name``."""
    m = results.methods.get(name)
    if m is None or m.ts is None:
        raise LongtailError(
            f"stage 2's results have no temperature for {name!r}: run stage 2 with "
            "stage2.calibrate=true (and a validation split) before choosing a method"
        )
    return m.ts.temperature


def _simplicity(name: str) -> int:
    order = list(SIMPLER_FIRST) + [m for m in registry.available() if m not in SIMPLER_FIRST]
    return order.index(name) if name in order else len(order)


def choose(
    scores: list[MethodScore], labels: torch.Tensor | None = None, *, seed: int = 0
) -> MethodScore:
    """The simplest method within one bootstrap standard deviation of the best (module doc).

    Args:
        scores: from :func:`score_methods` (with ``val_pred``).
        labels: ``(N_v,)`` validation labels; ``None``: no bootstrap, the best validation
            balanced accuracy wins (ties, to 1e-9, by the lower calibrated NLL).
        seed: the bootstrap's seed.

    Each score's ``gap`` is filled in.
    """
    best = max(scores, key=lambda s: (round(s.val["balanced_accuracy"], 9), -s.val["nll_ts"]))
    if labels is None or any(s.val_pred is None for s in scores):
        return best
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    k = int(max(y.max(), *(s.val_pred.max() for s in scores))) + 1
    gaps = bootstrap_gaps({s.name: s.val_pred for s in scores}, y, k, seed=seed, best=best.name)
    for s in scores:
        s.gap = gaps[s.name]
    close = [s for s in scores if s.gap[0] <= s.gap[1]]
    return min(close, key=lambda s: (_simplicity(s.name), s.gap[0]))


_SELECTION_WIDTHS = (10, 6, 8, 12, 8, 9, 9, 9, 9)


def selection_table(scores: list[MethodScore], chosen: str) -> str:
    """A text table of every method's validation and test figures, the chosen one starred."""
    header = [
        "method",
        "T",
        "val bal",
        "gap ± sd",
        "val NLL",
        "test acc",
        "test bal",
        "test NLL",
        "test ECE",
    ]
    rows = [
        [
            s.name + ("*" if s.name == chosen else " "),
            f"{s.temperature:.2f}",
            f"{100 * s.val['balanced_accuracy']:.2f}",
            f"{100 * s.gap[0]:.2f} ± {100 * s.gap[1]:.2f}",
            f"{s.val['nll_ts']:.3f}",
            f"{100 * s.test['accuracy']:.2f}",
            f"{100 * s.test['balanced_accuracy']:.2f}",
            f"{s.test['nll_ts']:.3f}",
            f"{100 * s.test['ece_ts']:.2f}",
        ]
        for s in scores
    ]
    table = render_text(Table.plain(header, rows), sep=" ", min_widths=_SELECTION_WIDTHS)
    return "\n".join(
        [
            "validation (choice) and test (report only); accuracies and ECE in %, NLL after "
            "temperature scaling",
            table,
            f"* chosen: {chosen} (the simplest method within one bootstrap standard deviation "
            "of the best validation balanced accuracy; gap = best - method)",
        ]
    )
