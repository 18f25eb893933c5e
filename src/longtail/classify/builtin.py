"""The built-in stage-2 methods as registry entries (docs/METHODS.md, "Stage 2").

Each entry turns a :class:`Stage2Context` into the arguments of its function in
:mod:`longtail.classify.methods` or :mod:`longtail.classify.srepr`; the registry
(:mod:`longtail.classify.registry`) starts with :data:`BUILTIN`, in this order, which is the order
of ``all`` and of ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from longtail.classify import methods as M
from longtail.classify.heads import LinearHead
from longtail.classify.interface import Stage2Context, Stage2Method
from longtail.classify.srepr import SREPR_RULE, BMAHead, choose_alpha_temperature, train_srepr
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


def _fit_srepr(ctx: Stage2Context, alpha: float, temperature: float | None = None) -> LinearHead:
    s2 = ctx.config.stage2
    return train_srepr(
        ctx.train_features,
        ctx.swag()["train"][0],
        ctx.train_labels,
        ctx.num_classes,
        alpha,
        s2.srepr_temperature if temperature is None else temperature,
        s2.srepr_weighting,
        s2.srepr_epochs,
        s2.lr,
        s2.weight_decay,
        s2.batch_size,
        ctx.seed,
    )


def _srepr(ctx: Stage2Context) -> nn.Module:
    """α and T from ``stage2.srepr_alpha_grid`` x ``srepr_temperature_grid`` (each falling back
    to its single value when empty) by :data:`~longtail.classify.srepr.SREPR_RULE`: NLL decides
    only among the grid points whose accuracy loss the validation images cannot resolve, so
    calibration is never bought with accuracy they can see. The sweep reports, per grid point,
    the validation accuracy, its balanced-accuracy gap to the best (and the bootstrap sd), the
    accuracy on the rarest third of the classes and the NLL."""
    s2 = ctx.config.stage2
    t0 = time.perf_counter()
    ctx.swag()  # computed (or read from the cache) here, so its time is reported
    t_banks = time.perf_counter() - t0
    zv, yv = ctx.val()
    counts = ctx.train_labels.bincount(minlength=ctx.num_classes)
    grid = [
        (float(a), float(t))
        for a in (list(s2.srepr_alpha_grid) or [s2.srepr_alpha])
        for t in (list(s2.srepr_temperature_grid) or [s2.srepr_temperature])
    ]
    rare = counts.argsort()[: max(1, ctx.num_classes // 3)]  # the rarest third of the classes
    in_rare = torch.isin(yv, rare)
    sweep, heads = [], {}
    for a, t in progress(grid, desc="SRepr (α, T grid)", unit="fit"):
        h = heads[(a, t)] = _fit_srepr(ctx, a, t)
        logits = h(zv).detach()
        r = evaluate_logits(logits, yv, counts.numpy())
        right = logits.argmax(1) == yv
        rare_acc = float(right[in_rare].float().mean()) if in_rare.any() else None
        row = {"alpha": a, "temperature": t, "val_acc": r["accuracy"], "val_nll": r["nll"]}
        sweep.append({**row, "val_rare_acc": rare_acc, "pred": logits.argmax(1).numpy()})
    best = choose_alpha_temperature(sweep, yv.numpy(), ctx.num_classes, seed=ctx.seed)
    ctx.info.update(
        alpha=best["alpha"],
        temperature=best["temperature"],
        rule=SREPR_RULE,
        samples=s2.srepr_samples,
        scale=s2.srepr_scale,
        feature_bank_seconds=t_banks,
        sweep=sweep,
    )
    return heads[(best["alpha"], best["temperature"])]


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
    chosen = [i for i in infos if i.get("alpha") is not None]
    pairs = ", ".join(f"{i['alpha']:g} / {i.get('temperature', '?')}" for i in chosen)
    rule = first.get("rule", "validation NLL")
    return (
        f"α / T = {pairs} ({rule}), M = {first.get('samples')} SWAG samples at scale "
        f"{first.get('scale')}"
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
        pins=(
            ("alpha", "stage2.srepr_alpha_grid"),
            ("temperature", "stage2.srepr_temperature_grid"),
        ),
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
