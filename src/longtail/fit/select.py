"""Choosing the deployed stage-2 method on the validation split, each one calibrated first.

For every deployable head (the registry's ``deployable``, :mod:`longtail.classify.registry`: all
built-in stage-2 methods but ``swag_bma``, which needs M backbone passes) the temperature that
stage 2 fitted on the validation logits (``ts.temperature`` of its results,
:mod:`longtail.evaluate.results`) is used, or, for heads without stage-2 results, one is fitted
here the same way (:func:`longtail.evaluate.calibration.fit_temperature`); the method
with the best validation **balanced accuracy** (the mean of per-class accuracies, so a
long-tailed validation split counts every class equally) is the reference, and the **simplest**
method whose gap to it is within one standard deviation of a stratified paired bootstrap over
the validation images (:func:`longtail.evaluate.bootstrap.bootstrap_gaps`) is chosen: a validation
split of a few images per rare class cannot tell apart methods closer than that, and the simpler
one then carries less risk. Simplicity order (:data:`SIMPLER_FIRST`): the joint classifier, one
post-hoc scalar (logit adjustment, then tau-normalisation), class means (NCM), re-trained
per-class scales (LWS), a re-trained classifier (cRT, SRepr without distillation, SRepr), then
any other method in registry order.

**Which images decide.** By default the validation split alone, and the test split is only
reported. When ``fit`` re-trains the bundle on every labelled image, the internal test split it
carved out of the training folder is a second hold-out that nothing else needs, so the choice is
made on validation and that split together (``pool_test=True`` of :func:`score_methods`): 3.4
to 4.9 times the images of the validation split alone on the Fashion-MNIST folders of
docs/RESULTS.md, so a smaller bootstrap spread, which matters most for the rare classes (a class
of 20 images has 3 validation and 4 test images). A test split the user gave never chooses.

**Mirror averaging.** When stage 1 trained on left-right flipped images (``data.flip``), the
chosen method is scored a second time on features averaged over each hold-out image and its
mirror image (one more backbone pass per prediction), with its own temperature fitted on
validation; :func:`choose_mirror` keeps it when it loses no balanced accuracy the hold-out
can resolve (its gap to the plain features within one bootstrap sd) and is better on one
measure (a higher balanced accuracy or a lower calibrated NLL). On the Fashion-MNIST folders of
docs/RESULTS.md it added 0.3 to 0.8 points of balanced accuracy to the bundles of ``fit`` before
it was a choice, while 143 validation images ranked it 0.9 points *below* the plain features on
one of them (test folder: +0.5): a strict "higher balanced accuracy" rule would follow that noise.
The rule measures it on each user's own hold-out, since mirror images need not look like the
classes they mirror (text, digits, left / right classes).

**The deployed temperature.** With the re-fit, the chosen score's temperature is fitted again
on validation and internal test together with class-balanced weights
(:func:`balanced_temperature`); the validation temperatures above still serve the choices
(the calibrated NLL that breaks ties and judges mirror averaging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn

from longtail.classify import registry
from longtail.core.errors import LongtailError
from longtail.evaluate.bootstrap import bootstrap_gaps
from longtail.evaluate.calibration import (
    apply_temperature,
    class_balanced_weights,
    fit_temperature,
)
from longtail.evaluate.metrics import evaluate_logits
from longtail.evaluate.results import Results
from longtail.evaluate.tables import Table, render_text

SIMPLER_FIRST = ("joint", "logit_adjust", "tau", "ncm", "lws", "crt", "srepr_ce", "srepr")


@dataclass
class MethodScore:
    """Validation and test figures of one calibrated method.

    Attributes:
        name: the stage-2 method; ``temperature``: ``T`` fitted on validation (stage 2's), or
            by :func:`balanced_temperature`.
        val, test: ``balanced_accuracy``, ``accuracy``, ``nll`` (raw), ``nll_ts``, ``ece_ts``,
            ``brier_ts`` (after dividing the logits by ``T``); test adds ``many`` / ``medium``
            / ``few``. Fractions, NLL in nats.
        holdout_pred: ``(N_h,)`` predicted labels on the images that choose (validation, or
            validation then test with ``pool_test``; for the bootstrap; not saved).
        gap: (gap, std): the best method's hold-out balanced accuracy minus this one's on the
            images that choose, and its sd over the bootstrap (fractions); set by
            :func:`choose`.
        pooled: the same figures as ``val`` on validation and test together, when both choose
            (``pool_test``); ``None``: validation alone chooses.
        logits: ``{"val": (logits (N_v, C), labels (N_v,)), "test": (...)}``, raw (before
            ``T``), for :func:`balanced_temperature` (not saved).
    """

    name: str
    temperature: float
    val: dict
    test: dict
    holdout_pred: np.ndarray | None = field(default=None, repr=False)
    gap: tuple[float, float] = (0.0, 0.0)
    pooled: dict | None = None
    logits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def choice(self) -> dict:
        """The figures that choose: ``pooled`` when validation and test choose, else ``val``."""
        return self.pooled if self.pooled is not None else self.val

    def to_json(self) -> dict:
        """A JSON-ready dict (without ``holdout_pred``)."""
        out = {
            "name": self.name,
            "temperature": self.temperature,
            "val": self.val,
            "test": self.test,
            "gap_to_best": {"gap": self.gap[0], "std": self.gap[1]},
        }
        if self.pooled is not None:
            out["val_and_test"] = self.pooled
        return out


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
    pool_test: bool = False,
) -> list[MethodScore]:
    """Calibrate every deployable head on validation and measure it on validation and test.

    Args:
        heads: method name -> head mapping its input to logits ``(N, C)``; only the methods
            the registry calls ``deployable`` (heads on features ``(N, d)``) are scored.
        feats: ``{"val": (z (N_v, d), y (N_v,)), "test": (z, y)}`` of the deployed backbone.
        train_counts: ``(C,)`` training images per class (shot splits).
        results: stage 2's results for these heads: each method's temperature is the one
            stage 2 fitted (``ts``) instead of being fitted again; ``None``: fitted here.
        pool_test: validation and test together choose (module doc): each score gets
            ``pooled`` figures and its ``holdout_pred`` covers both (validation first).

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
        lt = head(zt).float()
        test = _figures(lt, yt, t, train_counts, many, few)
        if pool_test:
            lh, yh = torch.cat([lv, lt]), torch.cat([yv, yt])
            pooled = _figures(lh, yh, t, train_counts, many, few)
        else:
            lh, pooled = lv, None
        logits = {"val": (lv, yv), "test": (lt, yt)}
        scores.append(
            MethodScore(name, t, val, test, lh.argmax(1).numpy(), pooled=pooled, logits=logits)
        )
    if not scores:
        raise LongtailError("no deployable stage-2 method was fitted")
    return scores


def balanced_temperature(
    score: MethodScore, train_counts: np.ndarray, *, many: int = 100, few: int = 20
) -> MethodScore:
    """``score`` with the temperature the re-fit deploys, and its figures at it.

    ``T`` minimises the **class-balanced** NLL (each class's images weigh ``1 / n_c``,
    :func:`longtail.evaluate.calibration.class_balanced_weights`) of the score's raw logits on
    validation and the internal test split together, the images that chose the recipe and the
    method (``pool_test``; the re-fit trains on both). Why: the bundle aims at balanced
    accuracy, and its probabilities (the logit-adjusted loss, logit adjustment, τ-norm) at the
    balanced distribution, while the hold-outs are as long-tailed as the folder; the plain NLL
    of validation alone lets the head classes set ``T`` on a few images per rare class.
    Measured on 28 ``fit`` bundles of two Fashion-MNIST folders (docs/RESULTS.md, issue 19,
    "The re-fit's temperature"). ``val``, ``test`` and ``pooled`` are recomputed at the new
    ``T``; balanced accuracy and predictions do not depend on it.

    Args:
        score: from :func:`score_methods` (with ``logits``).
        train_counts: ``(C,)`` training images per class (shot splits of the figures).
        many, few: shot thresholds, as for :func:`score_methods`.

    Raises:
        LongtailError: the score has no logits (built by hand).
    """
    if score.logits is None:
        raise LongtailError(f"{score.name}: no hold-out logits to fit a temperature on")
    (lv, yv), (lt, yt) = score.logits["val"], score.logits["test"]
    lh, yh = torch.cat([lv, lt]), torch.cat([yv, yt])
    t = fit_temperature(lh, yh, weights=class_balanced_weights(yh))
    return replace(
        score,
        temperature=t,
        val=_figures(lv, yv, t, train_counts, many, few),
        test=_figures(lt, yt, t, train_counts, many, few),
        pooled=_figures(lh, yh, t, train_counts, many, few) if score.pooled is not None else None,
    )


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
        scores: from :func:`score_methods` (with ``holdout_pred``).
        labels: ``(N_h,)`` labels of the images that choose (validation, or validation then
            test when the scores are ``pooled``); ``None``: no bootstrap, the best hold-out
            balanced accuracy wins (ties, to 1e-9, by the lower calibrated NLL).
        seed: the bootstrap's seed.

    Each score's ``gap`` is filled in.
    """
    best = max(scores, key=lambda s: (round(s.choice["balanced_accuracy"], 9), -s.choice["nll_ts"]))
    if labels is None or any(s.holdout_pred is None for s in scores):
        return best
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    preds = {s.name: s.holdout_pred for s in scores}
    gaps = bootstrap_gaps(preds, y, seed=seed, best=best.name)
    for s in scores:
        s.gap = gaps[s.name]
    close = [s for s in scores if s.gap[0] <= s.gap[1]]
    return min(close, key=lambda s: (_simplicity(s.name), s.gap[0]))


def choose_mirror(
    plain: MethodScore, mirrored: MethodScore, labels: torch.Tensor | np.ndarray, *, seed: int = 0
) -> tuple[bool, tuple[float, float]]:
    """Whether to deploy mirror averaging (module doc), and the evidence.

    Args:
        plain, mirrored: the same head scored on plain and on mirror-averaged hold-out features
            (:func:`score_methods`, with ``holdout_pred``), on the same images.
        labels: ``(N_h,)`` labels of those images (as for :func:`choose`).
        seed: the bootstrap's seed.

    Returns:
        ``(use, (gap, sd))``: ``gap`` = plain minus mirrored hold-out balanced accuracy
        (fractions) and its sd over the stratified paired bootstrap
        (:func:`longtail.evaluate.bootstrap.bootstrap_gaps`). ``use`` when ``gap <= sd`` (no
        loss the hold-out can resolve) and mirror averaging is better on one measure: a higher
        balanced accuracy, or a lower calibrated NLL (:attr:`MethodScore.choice` figures).
    """
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    a, b = plain.holdout_pred, mirrored.holdout_pred
    if a is None or b is None:
        raise LongtailError("choose_mirror needs both scores' hold-out predictions")
    gap, sd = bootstrap_gaps({"plain": a, "mirror": b}, y, seed=seed, best="plain")["mirror"]
    better = gap < -1e-9 or mirrored.choice["nll_ts"] < plain.choice["nll_ts"]
    return bool(gap <= sd and better), (gap, sd)


_SELECTION_WIDTHS = (10, 6, 8, 12, 8, 9, 9, 9, 9)


def selection_table(scores: list[MethodScore], chosen: str) -> str:
    """A text table of every method's validation and test figures, the chosen one starred."""
    pooled = all(s.pooled is not None for s in scores)
    header = [
        "method",
        "T",
        "val bal",
        *(["v+t bal"] if pooled else []),
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
            *([f"{100 * s.pooled['balanced_accuracy']:.2f}"] if s.pooled is not None else []),
            f"{100 * s.gap[0]:.2f} ± {100 * s.gap[1]:.2f}",
            f"{s.val['nll_ts']:.3f}",
            f"{100 * s.test['accuracy']:.2f}",
            f"{100 * s.test['balanced_accuracy']:.2f}",
            f"{s.test['nll_ts']:.3f}",
            f"{100 * s.test['ece_ts']:.2f}",
        ]
        for s in scores
    ]
    widths = _SELECTION_WIDTHS[:3] + ((8,) if pooled else ()) + _SELECTION_WIDTHS[3:]
    table = render_text(Table.plain(header, rows), sep=" ", min_widths=widths)
    on = "validation + test (v+t)" if pooled else "validation"
    return "\n".join(
        [
            f"{on} (choice)"
            + ("" if pooled else " and test (report only)")
            + "; accuracies and ECE in %, NLL after temperature scaling",
            table,
            f"* chosen: {chosen} (the simplest method within one bootstrap standard deviation "
            f"of the best {on} balanced accuracy; gap = best - method)",
        ]
    )
