"""The built-in stage-2 methods as registry entries (docs/METHODS.md, "Stage 2").

Each entry turns a :class:`Stage2Context` into the arguments of its function in
:mod:`longtail.classify.methods` or :mod:`longtail.classify.srepr`; the registry
(:mod:`longtail.classify.registry`) starts with :data:`BUILTIN`, in this order, which is the order
of ``all`` and of ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.nn as nn

from longtail.classify import methods as M
from longtail.classify.heads import LinearHead
from longtail.classify.interface import Stage2Context, Stage2Method
from longtail.classify.srepr import BMAHead, train_srepr
from longtail.core.progress import progress
from longtail.evaluate.metrics import evaluate_logits

__all__ = ["BUILTIN"]


def _joint(ctx: Stage2Context) -> nn.Module:
    return LinearHead(ctx.joint_weight, ctx.joint_bias)


def _ncm(ctx: Stage2Context) -> nn.Module:
    s2 = ctx.config.stage2
    return M.ncm(ctx.train_inputs(), ctx.train_labels, ctx.num_classes, s2.ncm_metric)


def _crt(ctx: Stage2Context) -> nn.Module:
    s2 = ctx.config.stage2
    return M.crt(
        ctx.train_inputs(),
        ctx.train_labels,
        ctx.num_classes,
        s2.epochs,
        s2.lr,
        s2.weight_decay,
        s2.batch_size,
        ctx.seed,
    )


def _tau(ctx: Stage2Context) -> nn.Module:
    zv, yv = ctx.val()
    head, tau, sweep = M.tau_norm(ctx.joint_weight, zv, yv, list(ctx.config.stage2.tau_grid))
    ctx.info.update(tau=tau, sweep=sweep)
    return head


def _logit_adjust(ctx: Stage2Context) -> nn.Module:
    """Joint classifier minus tau * log prior, tau from ``stage2.logit_adjust_grid``."""
    zv, yv = ctx.val()
    counts = ctx.train_labels.bincount(minlength=ctx.num_classes)
    grid = list(ctx.config.stage2.logit_adjust_grid)
    head, tau, sweep = M.logit_adjust(ctx.joint_weight, ctx.joint_bias, counts, zv, yv, grid)
    ctx.info.update(tau=tau, sweep=sweep)
    return head


def _lws(ctx: Stage2Context) -> nn.Module:
    s2 = ctx.config.stage2
    return M.lws(
        ctx.joint_weight,
        ctx.joint_bias,
        ctx.train_inputs(),
        ctx.train_labels,
        s2.lws_epochs,
        s2.lr,
        s2.weight_decay,
        s2.batch_size,
        ctx.seed,
    )


def _fit_srepr(ctx: Stage2Context, alpha: float) -> LinearHead:
    s2 = ctx.config.stage2
    return train_srepr(
        ctx.train_features,
        ctx.swag()["train"][0],
        ctx.train_labels,
        ctx.num_classes,
        alpha,
        s2.srepr_temperature,
        s2.srepr_weighting,
        s2.srepr_epochs,
        s2.lr,
        s2.weight_decay,
        s2.batch_size,
        ctx.seed,
    )


def _srepr(ctx: Stage2Context) -> nn.Module:
    """α from ``stage2.srepr_alpha_grid`` (or ``srepr_alpha``) by validation NLL."""
    s2 = ctx.config.stage2
    t0 = time.perf_counter()
    ctx.swag()  # computed (or read from the cache) here, so its time is reported
    t_banks = time.perf_counter() - t0
    zv, yv = ctx.val()
    counts = ctx.train_labels.bincount(minlength=ctx.num_classes).numpy()
    grid = list(s2.srepr_alpha_grid) or [s2.srepr_alpha]
    sweep = []
    for a in progress(grid, desc="SRepr (α grid)", unit="fit"):
        h = _fit_srepr(ctx, a)
        r = evaluate_logits(h(zv).detach(), yv, counts)
        sweep.append({"alpha": a, "val_acc": r["accuracy"], "val_nll": r["nll"], "head": h})
    best = min(sweep, key=lambda r: r["val_nll"])
    ctx.info.update(
        alpha=best["alpha"],
        temperature=s2.srepr_temperature,
        samples=s2.srepr_samples,
        scale=s2.srepr_scale,
        feature_bank_seconds=t_banks,
        sweep=[{k: v for k, v in r.items() if k != "head"} for r in sweep],
    )
    return best["head"]


def _srepr_ce(ctx: Stage2Context) -> nn.Module:
    """Ablation: stochastic representations, cross-entropy only (α = 0)."""
    return _fit_srepr(ctx, 0.0)


def _swag_bma(ctx: Stage2Context) -> nn.Module:
    """SRepr's head averaged over the M SWAG feature banks."""
    return BMAHead(ctx.heads["srepr"])


def _describe_chosen_tau(prefix: str) -> Callable[[list[dict]], str | None]:
    """The report's line for a method that chose ``tau`` by validation accuracy."""

    def describe(infos: list[dict]) -> str | None:
        if "tau" not in infos[0]:
            return None
        vals = [i["tau"] for i in infos if i.get("tau") is not None]
        return f"{prefix}τ = " + ", ".join(f"{v:g}" for v in vals) + " (validation accuracy)"

    return describe


def _describe_srepr(infos: list[dict]) -> str | None:
    first = infos[0]
    if "alpha" not in first:
        return None
    vals = [i["alpha"] for i in infos if i.get("alpha") is not None]
    return (
        "α = "
        + ", ".join(f"{v:g}" for v in vals)
        + f" (validation NLL), T = {first.get('temperature')}, M = {first.get('samples')} SWAG "
        f"samples at scale {first.get('scale')}"
    )


BUILTIN: tuple[Stage2Method, ...] = (
    Stage2Method("joint", _joint, "joint", plot_weight_norms=True, color="#4C72B0"),
    Stage2Method("ncm", _ncm, "NCM", uses_views=True, color="#8172B2"),
    Stage2Method("crt", _crt, "cRT", uses_views=True, plot_weight_norms=True, color="#55A868"),
    Stage2Method(
        "tau",
        _tau,
        "τ-norm",
        needs_val=True,
        plot_weight_norms=True,
        describe=_describe_chosen_tau(""),
        color="#C44E52",
        pins=(("tau", "stage2.tau_grid"),),
    ),
    Stage2Method("lws", _lws, "LWS", uses_views=True, plot_weight_norms=True, color="#CCB974"),
    Stage2Method(
        "logit_adjust",
        _logit_adjust,
        "logit adjustment",
        needs_val=True,
        describe=_describe_chosen_tau("logit adjustment "),
        color="#64B5CD",
        pins=(("tau", "stage2.logit_adjust_grid"),),
    ),
    Stage2Method(
        "srepr",
        _srepr,
        "SRepr",
        needs_val=True,
        needs_swag=True,
        implies=("srepr_ce", "swag_bma"),
        plot_weight_norms=True,
        describe=_describe_srepr,
        color="#DD8452",
        pins=(("alpha", "stage2.srepr_alpha_grid"),),
    ),
    Stage2Method("srepr_ce", _srepr_ce, "SRepr (CE only)", needs_swag=True, color="#937860"),
    Stage2Method(
        "swag_bma",
        _swag_bma,
        "SWAG model average",
        needs_swag=True,
        inputs="swag",
        deployable=False,
        requires=("srepr",),
        color="#64B5CD",
    ),
)
