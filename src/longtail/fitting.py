"""``longtail fit``: a user's folder or CSV in, a calibrated, deployable model bundle out.

1. data (:mod:`longtail.fit.ingest`): read, check, profile, split (train / validation /
   internal test, unless given) and materialise the images as the ``user`` dataset in
   ``OUT/data``;
2. recipe search (:mod:`longtail.fit.search`): stage 1 (:class:`longtail.train.Stage1`, SWA /
   SWAG, the recipe of :mod:`longtail.fit.plan`) and every deployable stage-2 method
   (:class:`longtail.classify.run.Stage2`) for each candidate recipe in ``OUT/search/<name>``,
   by successive halving within ``budget`` minutes; each candidate's methods calibrated on
   validation and one chosen (:mod:`longtail.fit.select`); the best candidate wins;
3. re-fit: the chosen recipe and method trained again on every labelled image (train +
   validation + internal test, ``OUT/data-all``) in ``OUT/run``, with the hyper-parameters the
   selection run chose on validation pinned and its temperature (the hold-out's predictions);
   ``refit=False`` bundles the selection run instead; mirror averaging (each image's features
   averaged with its left-right mirror image's) when the hold-out chose it
   (:func:`longtail.fit.select.choose_mirror`); the bundle averages the re-fit's and the
   selection run's probabilities (``ensemble=False``: the re-fit alone);
4. bundle (:mod:`longtail.fit.bundle`) in ``OUT/bundle`` with ``model.onnx`` and ``model.ts``
   (:mod:`longtail.fit.export`); ``OUT/report.html`` / ``report.md`` of the selection run
   (hold-out figures) and ``OUT/fit.json`` (every candidate, every method, and which images
   measured what).

This module sits beside :mod:`longtail.sweep` (above ``train``, ``classify`` and ``fit``): it is
the only part of ``fit`` that runs training. Every run directory it makes is an ordinary one:
``longtail classify`` and ``longtail report`` work on it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import longtail
from longtail.classify import registry
from longtail.classify.heads import head_spec
from longtail.classify.run import Stage2
from longtail.config import load_config
from longtail.core.checkpoint import delete_checkpoints
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_json
from longtail.core.runtime import world_size_from_env
from longtail.data.build import check_batch_size
from longtail.evaluate.bootstrap import bootstrap_gaps
from longtail.evaluate.report import write_report
from longtail.fit.bundle import Bundle, DeployedClassifier, DeployedEnsemble, save_bundle
from longtail.fit.images import decode
from longtail.fit.ingest import UserData, pooled_for_refit, read_user_data, save_user_data
from longtail.fit.plan import InputPlan, recipe, recipe_summary
from longtail.fit.search import (
    MIXUP_GRID,
    Candidate,
    candidate_name,
    choose_candidate,
    measured_speed,
    overturns,
    ranked,
    rung1_crowds_out_rung2,
    rung2_next_fits,
    rung2_plan,
    search_default,
    search_table,
    short_epochs,
    survivors,
)
from longtail.fit.select import (
    MethodScore,
    balanced_temperature,
    choose,
    choose_mirror,
    score_methods,
    selection_table,
)
from longtail.train import Stage1
from longtail.train.schedules import swa_collect_from

CHECK_IMAGES = 32  # validation images the export check runs on
BUDGET_MINUTES = 15.0
ENSEMBLE_SEED_OFFSET = 1  # the re-fit's seed is the selection run's plus this when ensembled
# OUT's layout
DATA, REFIT_DATA, SEARCH, RUN, BUNDLE, FIT_JSON = (
    "data",
    "data-all",
    "search",
    "run",
    "bundle",
    "fit.json",
)


@dataclass
class FitResult:
    """What one fit produced.

    Attributes:
        out: the output folder; ``bundle``: the loaded model bundle.
        chosen: the deployed stage-2 method's figures and temperature (mirror-averaged when
            ``mirror``); ``scores``: every deployable method's figures, in the chosen recipe's
            selection run.
        data: the materialised (selection) data; ``results``: the selection run's stage-2
            ``results.json`` dict.
        candidates: every recipe the search tried; ``recipe``: the chosen one.
        refit: whether the bundle was re-trained on every labelled image.
        mirror: whether the bundle averages each image's features with its mirror image's.
        ensemble: whether the bundle averages the re-fit with the selection run.
    """

    out: Path
    bundle: Bundle
    chosen: MethodScore
    scores: list[MethodScore]
    data: UserData
    results: dict
    candidates: list[Candidate]
    recipe: Candidate
    refit: bool
    mirror: bool = False
    ensemble: bool = False


# keys `longtail fit` sets itself (the user dataset it materialises in OUT/data)
FIT_SETS = ("data.dataset", "data.root", "data.imbalance")


def _data_keys(root: Path) -> dict:
    return {"dataset": "user", "root": str(root), "imbalance": None}


def _resolve_overrides(overrides: list[str], out: Path, epochs: int | None) -> DictConfig:
    """The user's overrides resolved over the defaults and validated, before any file is read or
    written: a mistyped key or a bad value fails here, so ``--out`` stays untouched."""
    extra = [f"optim.epochs={epochs}"] if epochs else []
    cfg = load_config(None, overrides + extra, base={"data": _data_keys(out / DATA)})
    for key in FIT_SETS:
        if _given(cfg, overrides, key) is not None:
            raise LongtailError(f"{key} is set by `longtail fit` itself; drop that override")
    return cfg


def _given(cfg: DictConfig, overrides: list[str], key: str) -> Any:
    """``key``'s value in the resolved ``cfg`` when an override sets it, else ``None``."""
    if any(item.split("=", 1)[0].strip() == key for item in overrides if "=" in item):
        return OmegaConf.select(cfg, key)
    return None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LongtailError(
            f"--out {str(out)!r} exists and is not an empty folder; choose a new one "
            "(a fit never overwrites an earlier one)"
        )


def _check_inputs(data: UserData) -> torch.Tensor:
    """Up to 32 validation images as float ``(B, C, S, S)`` in ``[0, 1]``."""
    val = data.splits["val"]
    if val.images is not None:
        return val.images[:CHECK_IMAGES].float().div(255.0)
    prep = data.preprocessing
    pix = [decode(p, prep) for p in (val.paths or [])[:CHECK_IMAGES]]
    pix = [p for p in pix if isinstance(p, torch.Tensor)]
    if not pix:
        return torch.rand(4, prep.channels, prep.size, prep.size)
    return torch.stack(pix).float().div(255.0)


def _config(
    data: UserData,
    root: Path,
    overrides: list[str],
    *,
    n_train: int,
    epochs: int,
    mixup_alpha: float,
    seed: int,
    given: DictConfig,
) -> DictConfig:
    """One candidate's full config: the plan's recipe for ``n_train`` images, ``epochs`` and
    ``mixup_alpha``, the user's overrides on top (``epochs`` last: ``--epochs`` wins over an
    ``optim.epochs`` override); validated as stage 1 will (nothing written)."""
    plan: InputPlan = data.plan
    base = recipe(
        n_train,
        plan,
        epochs=epochs,
        batch_size=_given(given, overrides, "optim.batch_size"),
        swa_start=_given(given, overrides, "swa.start") or 0.75,
    )
    base["loss"]["mixup_alpha"] = mixup_alpha
    base["seed"] = seed
    base["data"] = {
        **_data_keys(root),
        "image_size": plan.size,
        "padding": max(1, round(plan.size / 8)),
    }
    base["model"] = {"name": plan.model, "weights_path": plan.weights_path}
    cfg = load_config(None, [*overrides, f"optim.epochs={epochs}"], base=base)
    cfg.stage2.calibrate = True  # fit always calibrates on validation (a note says so)
    swa_collect_from(cfg)  # swa.start / anneal_epochs against the epochs
    check_batch_size(cfg.optim.batch_size, world_size_from_env(), n_train)  # stage 1's check
    return cfg


@dataclass
class _Selection:
    """One candidate's run: its config, its scored methods, and (for the best so far only)
    its stage 2, which bundling needs; the others' are released."""

    candidate: Candidate
    config: DictConfig
    stage2: Stage2 | None
    scores: list[MethodScore]
    chosen: MethodScore
    results: dict
    holdout_labels: torch.Tensor


def _deployable_methods(overrides: list[str]) -> list[str] | None:
    """Every deployable stage-2 method, or ``None`` when the user chose ``stage2.methods``."""
    if any(o.split("=", 1)[0].strip() == "stage2.methods" for o in overrides):
        return None
    return [m for m in registry.available() if registry.get(m).deployable]


def _stage1(cfg: DictConfig, run_dir: Path) -> None:
    """Stage 1 of a candidate or of the re-fit in ``run_dir``, then its training checkpoints
    deleted (``fit`` never resumes a run it finished; a ResNet-32 run's two are 26-66 MB)."""
    stage1 = Stage1(cfg, run_dir)
    stage1.fit()
    if stage1.rt.is_main:
        delete_checkpoints(run_dir)


def _run_candidate(
    cfg: DictConfig,
    run_dir: Path,
    rung: int,
    methods: list[str] | None,
    log: Callable[[str], None],
    *,
    pool_test: bool,
) -> _Selection:
    """Stage 1 and stage 2 of one candidate recipe; its methods scored and one chosen (on
    validation, or on validation and the internal test split with ``pool_test``)."""
    name = candidate_name(float(cfg.loss.mixup_alpha), int(cfg.optim.epochs))
    log(
        f"candidate {name} (rung {rung}): {cfg.optim.epochs} epochs, mixup alpha "
        f"{cfg.loss.mixup_alpha:g} -> {run_dir}"
    )
    t0 = time.perf_counter()
    _stage1(cfg, run_dir)
    t1 = time.perf_counter()
    s2 = Stage2(run_dir, log=log)
    results = s2.run(methods)
    feats = s2.features()
    d = cfg.data
    scores = score_methods(
        s2.heads,
        feats,
        s2.counts,
        many=d.many_shot,
        few=d.few_shot,
        results=s2.results,
        pool_test=pool_test,
    )
    y = torch.cat([feats["val"][1], feats["test"][1]]) if pool_test else feats["val"][1]
    chosen = choose(scores, y, seed=int(cfg.seed))
    for s in scores:  # only the chosen method's hold-out logits can still be needed
        if s is not chosen:
            s.logits = None
    cand = Candidate(
        name,
        float(cfg.loss.mixup_alpha),
        int(cfg.optim.epochs),
        rung,
        str(run_dir),
        chosen.name,
        chosen.val,
        chosen.test,
        time.perf_counter() - t0,
        t1 - t0,
        pooled=chosen.pooled,
    )
    log(
        f"candidate {name}: {chosen.name}, {'validation + test' if pool_test else 'validation'} "
        f"balanced accuracy {100 * cand.score:.2f} % ({cand.seconds:.0f} s)"
    )
    return _Selection(cand, cfg, s2, scores, chosen, results, y)


def _rung2_why(keep: list[Candidate], rung1: list[Candidate], straight: bool = False) -> str:
    """How :func:`survivors` picked ``keep`` from ``rung1`` (``straight``: and the strongest
    mixup, which skipped rung 1, takes the first place), for the log; rung 2 trains the
    strongest mixup, the search's default, first."""
    if straight and not keep:
        return (
            "the strongest mixup, straight from the start, alone: a second run would cost it "
            "epochs; rung 1's best challenges it from the short schedule"
        )
    if straight:
        return "the strongest mixup, straight from the start, and rung 1's best; default first"
    if [c.name for c in keep] == [c.name for c in ranked(rung1)[: len(keep)]]:
        return f"best {len(keep)} of rung 1" + (", the strongest mixup first" if keep[1:] else "")
    return "the strongest mixup, which a short schedule cannot rank, and rung 1's best"


def _better(a: _Selection | None, b: _Selection) -> _Selection:
    """The better of two candidates; the loser's stage 2 (model, features, banks) is freed."""
    if a is None:
        return b
    win, lose = (a, b) if choose_candidate([a.candidate, b.candidate]) is a.candidate else (b, a)
    lose.stage2 = None
    return win


def _choose_recipe(
    finalists: list[_Selection], done: list[_Selection], seed: int
) -> tuple[_Selection, str]:
    """The chosen candidate among ``finalists`` (rung 1's best, then rung 2's; each with its
    stage 2) and why: the search's default unless the best hold-out score overturns it
    (:func:`longtail.fit.search.overturns`); every other finalist's stage 2 is freed. ``why``
    is empty when the hold-out's best is chosen without a default to weigh it against. On
    return every candidate of ``done`` holds its gap to the pick (:func:`_bootstrap_candidates`)."""
    top = choose_candidate([s.candidate for s in finalists])
    default = search_default([s.candidate for s in finalists])
    pick = next(s for s in finalists if s.candidate is (default or top))
    _bootstrap_candidates(done, pick, seed)
    why = ""
    if default is not None:
        lead, sd = -100 * top.gap[0], 100 * top.gap[1]
        if top is default:
            why = "the default (rung 2's strongest mixup), also the best hold-out score"
        elif overturns(top):
            pick = next(s for s in finalists if s.candidate is top)
            _bootstrap_candidates(done, pick, seed)  # the table's gaps are to the pick
            why = (
                f"the best hold-out score: it leads the default {default.name} (rung 2's "
                f"strongest mixup) by {lead:.2f} points, more than two bootstrap sds ({sd:.2f})"
            )
        else:
            why = (
                f"the default (rung 2's strongest mixup): {top.name} leads it by {lead:.2f} "
                f"points on the hold-out, within two bootstrap sds ({sd:.2f}); the best of "
                "several noisy scores is biased upwards"
            )
    for s in finalists:
        if s is not pick:
            s.stage2 = None
    return pick, why


def _bootstrap_candidates(sels: list[_Selection], best: _Selection, seed: int) -> None:
    """Fill each candidate's gap to ``best`` over the hold-out bootstrap."""
    preds = {s.candidate.name: s.chosen.holdout_pred for s in sels}
    y = best.holdout_labels.numpy()
    gaps = bootstrap_gaps(preds, y, seed=seed, best=best.candidate.name)
    for s in sels:
        s.candidate.gap = gaps[s.candidate.name]


def _mirror_choice(
    best: _Selection, chosen: MethodScore, *, pool_test: bool, log: Callable[[str], None]
) -> tuple[MethodScore, dict | None]:
    """The chosen method scored again on mirror-averaged hold-out features, and the score to
    deploy (:func:`longtail.fit.select.choose_mirror`) with a record for ``fit.json``;
    ``(chosen, None)`` when stage 1 did not train on mirror images (``data.flip=false``)."""
    if not best.config.data.flip:
        return chosen, None
    s2, d = best.stage2, best.config.data
    assert s2 is not None  # the best keeps its stage 2
    [mirrored] = score_methods(
        {chosen.name: s2.heads[chosen.name]},
        s2.mirror_features(),
        s2.counts,
        many=d.many_shot,
        few=d.few_shot,
        pool_test=pool_test,
    )
    use, (gap, sd) = choose_mirror(
        chosen, mirrored, best.holdout_labels, seed=int(best.config.seed)
    )
    keys = ("balanced_accuracy", "nll_ts", "ece_ts")
    a, b = chosen.choice, mirrored.choice
    log(
        f"mirror averaging ({chosen.name}): hold-out balanced accuracy "
        f"{100 * a['balanced_accuracy']:.2f} -> {100 * b['balanced_accuracy']:.2f} % "
        f"(bootstrap sd {100 * sd:.2f}), calibrated NLL {a['nll_ts']:.3f} -> "
        f"{b['nll_ts']:.3f}: " + ("used" if use else "not used")
    )
    record = {
        "used": use,
        "plain": {k: a[k] for k in keys} | {"temperature": chosen.temperature},
        "mirror": {k: b[k] for k in keys} | {"temperature": mirrored.temperature},
        "gap": gap,
        "gap_sd": sd,
        "rule": "used when the hold-out balanced accuracy drops by no more than one bootstrap "
        "sd and either rises or the calibrated NLL falls",
    }
    return (mirrored if use else chosen), record


def fit(
    train: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    weights: str | None = None,
    overrides: list[str] | None = None,
    strict: bool = False,
    budget: float = BUDGET_MINUTES,
    refit: bool = True,
    ensemble: bool = True,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Choose a recipe and a method on validation, re-fit on everything, calibrate and bundle.

    Args:
        train: ImageFolder tree ``ROOT/<class>/<image>`` or CSV / list file (``path,label`` or
            ``path label``; label an integer or a class name; paths relative to the file).
        out: a new (or empty) output folder.
        val, test: the user's own validation / test data; held out from ``train`` if absent.
        epochs: stage-1 epochs (then not searched; default: searched, :mod:`longtail.fit.search`).
        image_size: input side ``S`` (default from the image sizes).
        weights: a local torchvision ResNet state dict to fine-tune from.
        overrides: ``key=value`` config overrides, applied over the plan's choices; setting
            ``loss.mixup_alpha`` or ``optim.epochs`` takes that knob out of the search.
        strict: fail on any unreadable file instead of skipping it.
        budget: minutes for the search and the re-fit: the search skips rung-1 candidates and
            sizes its long schedule from what its first run measured so that both fit in it
            (the first candidate always runs; a note says when the budget is too small).
        refit: re-train the chosen recipe and method on every labelled image (train +
            validation + the internal test split; not a test split you gave) for the bundle;
            ``False``: bundle the selection run.
        ensemble: with a re-fit (default), bundle the average of the re-fit's and the
            selection run's calibrated probabilities (the re-fit then starts from another
            seed; twice the prediction time, no extra training); ``False``: the re-fit alone.
            The default rests on benchmarks/fit_folder.py's paired fits, whose figures
            ``fit.json``'s ``measured_on["ensemble"]`` (below) and docs/METHODS.md quote.
        log: where progress lines go.

    Returns:
        A :class:`FitResult`; the bundle's network maps images ``(B, C, S, S)`` in ``[0, 1]``
        to calibrated probabilities ``(B, K)``.
    """
    t0 = time.perf_counter()
    if not (math.isfinite(budget) and budget > 0):
        raise LongtailError(f"--budget {budget:g}: give the minutes the fit may take, a number > 0")
    deadline = t0 + 60.0 * budget
    out = Path(out).expanduser().resolve()
    overrides = list(overrides or [])
    _check_out(out)
    # nothing is written until the whole config is resolved and checked: the overrides alone
    # first (before the images are read), then every rung-1 candidate
    given = _resolve_overrides(overrides, out, epochs)
    epochs = epochs or _given(given, overrides, "optim.epochs")
    image_size = image_size or _given(given, overrides, "data.image_size")
    weights = weights or _given(given, overrides, "model.weights_path")
    seed = _given(given, overrides, "seed") or 0
    data = read_user_data(
        train,
        out / DATA,
        val=val,
        test=test,
        image_size=image_size,
        weights_path=weights,
        model=_given(given, overrides, "model.name"),
        strict=strict,
        seed=seed,
        log=log,
    )
    n_train = len(data.splits["train"])
    pooled = pooled_for_refit(data, out / REFIT_DATA) if refit else None
    # the internal test split chooses too when the bundle trains on it anyway (fit/select.py)
    pool_test = pooled is not None and not data.origins["test"].startswith("given")
    n_all = len(pooled.splits["train"]) if pooled else n_train
    user_mixup = _given(given, overrides, "loss.mixup_alpha")
    grid = [float(user_mixup)] if user_mixup is not None else list(MIXUP_GRID)
    short = int(epochs) if epochs else short_epochs(n_train)

    def config(e: int, alpha: float) -> DictConfig:
        return _config(
            data,
            out / DATA,
            overrides,
            n_train=n_train,
            epochs=e,
            mixup_alpha=alpha,
            seed=seed,
            given=given,
        )

    rung1 = {a: config(short, a) for a in grid}
    if _given(given, overrides, "stage2.calibrate") is False:
        log("note: stage2.calibrate=false ignored: fit always calibrates on validation")
    knobs = [k for k, v in (("mixup", len(grid) > 1), ("epochs", not epochs)) if v]
    log(
        f"recipe search over {', '.join(knobs) or 'nothing (both given)'}; budget {budget:g} "
        "min; base recipe: " + recipe_summary(rung1[grid[0]], n_train)
    )
    save_user_data(data)

    methods = _deployable_methods(overrides)
    done: list[_Selection] = []
    skipped: list[str] = []
    best: _Selection | None = None  # rung 1's best, then the chosen candidate
    rung2: list[_Selection] = []  # rung 2 keeps every stage 2 until the choice (two at most)
    refit_ratio = n_all / n_train if pooled else 0.0
    # the strongest mixup skips rung 1 when a rung 2 fits:
    # survivors() would send it there whatever its short run measured (search.py, step 2)
    strongest = grid[-1] if len(grid) > 1 and not epochs and grid[-1] == max(grid) else None
    # set when it did: rung 2's plan with it, made when rung 1 ended (it is the grid's last)
    straight: tuple[int, int] | None = None
    for alpha, cfg in rung1.items():
        name = candidate_name(alpha, short)
        if alpha == strongest and done:
            plan = rung2_plan(
                candidates=len(done) + 1,
                short=short,
                **measured_speed([s.candidate for s in done]),
                seconds_left=deadline - time.perf_counter(),
                refit_ratio=refit_ratio,
            )
            if plan is not None:
                log(
                    f"rung 1: {name} not trained: the strongest mixup goes straight to rung 2 "
                    f"(a {short}-epoch run cannot rank it, and rung 2 takes it whatever it scores)"
                )
                straight = plan
                continue
        if done:
            first = done[0].candidate
            refit_s = first.stage1_seconds * n_all / n_train + first.seconds - first.stage1_seconds
            if time.perf_counter() + first.seconds + (refit_s if pooled else 0) > deadline:
                log(f"budget: candidate {name} skipped (it would end after the budget)")
                skipped.append(name)
                continue
            if not epochs and rung1_crowds_out_rung2(
                candidates=len(done),
                candidate_seconds=first.seconds,
                short=short,
                **measured_speed([s.candidate for s in done]),
                seconds_left=deadline - time.perf_counter(),
                refit_ratio=refit_ratio,
            ):
                log(
                    f"budget: candidate {name} skipped (with it, no long schedule would fit: "
                    "the time goes to rung 2)"
                )
                skipped.append(name)
                continue
        sel = _run_candidate(cfg, out / SEARCH / name, 1, methods, log, pool_test=pool_test)
        if not done and time.perf_counter() + (sel.candidate.seconds if pooled else 0) > deadline:
            log(
                f"note: the budget ({budget:g} min) is smaller than one candidate "
                f"({sel.candidate.seconds:.0f} s) and the re-fit: the fit will take longer"
            )
        done.append(sel)
        best = _better(best, sel)
    assert best is not None
    if not epochs:
        c1 = [s.candidate for s in done]
        speed = measured_speed(c1)
        per_epoch, stage2_s = speed["seconds_per_epoch"], speed["stage2_seconds"]
        plan = straight or rung2_plan(
            candidates=len(c1),
            short=short,
            **speed,
            seconds_left=deadline - time.perf_counter(),
            refit_ratio=refit_ratio,
        )
        if plan is None:
            log(
                f"budget: no long schedule (measured {per_epoch:.2f} s per epoch, "
                f"{stage2_s:.0f} s per stage 2: fewer than 1.5 x {short} epochs fit)"
            )
        else:
            k, e2 = plan
            keep = survivors(c1, k - 1 if straight else k)
            alphas = [c.mixup_alpha for c in keep] + ([strongest] if straight else [])
            # the search's default (the strongest mixup) first: when the machine slows and the
            # budget guard skips rung 2's second run, it skips a challenger, not the default
            top_alpha = max(alphas)
            alphas.sort(key=lambda a: a != top_alpha)
            log(
                f"rung 2: {', '.join(candidate_name(a, e2) for a in alphas)} "
                f"({_rung2_why(keep, c1, bool(straight))}; measured {per_epoch:.2f} s per epoch, "
                f"{stage2_s:.0f} s per stage 2)"
            )
            for alpha in alphas:
                name = candidate_name(alpha, e2)
                last = done[-1].candidate
                if last.rung == 2 and not rung2_next_fits(
                    candidate_seconds=last.seconds,
                    candidate_stage1_seconds=last.stage1_seconds,
                    seconds_left=deadline - time.perf_counter(),
                    refit_ratio=refit_ratio,
                    budget_seconds=60.0 * budget,
                ):
                    log(
                        f"budget: candidate {name} skipped (rung 2 ran at "
                        f"{last.stage1_seconds / e2:.2f} s per epoch, not {per_epoch:.2f}: "
                        "with it the re-fit would end past the budget)"
                    )
                    skipped.append(name)
                    continue
                run = out / SEARCH / name
                sel = _run_candidate(config(e2, alpha), run, 2, methods, log, pool_test=pool_test)
                done.append(sel)
                rung2.append(sel)
    best, why = _choose_recipe([best, *rung2], done, seed)
    candidates = [s.candidate for s in done]
    chosen_recipe = best.candidate
    log(search_table(candidates, chosen_recipe.name, why))
    chosen = best.chosen
    log(selection_table(best.scores, chosen.name))
    searched = [
        k
        for k, v in (
            ("mixup", len({c.mixup_alpha for c in candidates}) > 1),
            ("epochs", len({c.epochs for c in candidates}) > 1),
        )
        if v
    ]

    assert best.stage2 is not None  # the best keeps its stage 2
    deployed, mirror = _mirror_choice(best, chosen, pool_test=pool_test, log=log)
    t_validation = deployed.temperature
    if pool_test:  # the hold-outs the re-fit trains on, weighted to the balanced target
        d = best.config.data
        deployed = balanced_temperature(
            deployed, best.stage2.counts, many=d.many_shot, few=d.few_shot
        )
        log(
            f"temperature: {deployed.temperature:.3g} (validation + internal test, "
            f"class-balanced NLL; validation alone: {t_validation:.3g})"
        )
    use_mirror = bool(mirror and mirror["used"])
    infos = {n: m.info for n, m in best.stage2.results.methods.items()}
    pins, unpinned = registry.pinned([chosen.name], infos)
    if pooled:
        if unpinned:
            log(
                f"note: {', '.join(unpinned)} choose on validation and cannot be pinned: in the "
                "re-fit they choose on images they trained on"
            )
        save_user_data(pooled)
        # the selection run's recipe exactly (batch, lr, weight decay, SWA), on more images
        cfg = copy.deepcopy(best.config)
        cfg.data.root = str(out / REFIT_DATA)
        run_dir = out / RUN
        log(
            f"re-fit: {chosen_recipe.name} and {chosen.name} on {pooled.origins['train']} "
            f"({n_all:,} images) -> {run_dir}" + (f"; pinned {', '.join(pins)}" if pins else "")
        )
        if ensemble:
            # a second initialisation: the members then differ by more than the re-fit's
            # extra images (Fort et al. 2019: initialisation is an ensemble's main diversity)
            cfg.seed = int(cfg.seed) + ENSEMBLE_SEED_OFFSET
        _stage1(cfg, run_dir)
        s2 = Stage2(run_dir, overrides=pins, log=log)
        s2.run([chosen.name])
        model, head = s2.model, s2.heads[chosen.name]
    else:
        run_dir = Path(chosen_recipe.run_dir)
        model, head = best.stage2.model, best.stage2.heads[chosen.name]
        cfg = best.config

    prep = data.preprocessing

    def deployable(net: torch.nn.Module, head: torch.nn.Module) -> DeployedClassifier:
        backbone = copy.deepcopy(net).float().cpu().to(memory_format=torch.contiguous_format)
        return DeployedClassifier(
            backbone,
            copy.deepcopy(head).float().cpu(),
            deployed.temperature,
            prep.mean,
            prep.std,
            mirror=use_mirror,
        )

    single = deployable(model, head)
    use_ensemble = bool(ensemble and pooled)
    if use_ensemble:
        selection = deployable(best.stage2.model, best.stage2.heads[chosen.name])
        model = DeployedEnsemble([single, selection])
        log(
            f"ensemble: the re-fit and the selection run {chosen_recipe.name}, each "
            f"{chosen.name} at T = {deployed.temperature:.3g}, probabilities averaged"
        )
    else:
        model = single
    sizes = {k: len(v) for k, v in data.splits.items()}
    holdout = (
        f"validation + internal test splits of the selection data ({sizes['val']:,} + "
        f"{sizes['test']:,} images)"
        if pool_test
        else f"validation split of the selection data ({sizes['val']:,} images)"
    )
    measured = {
        "recipe": holdout,
        "method": f"{holdout}, run {chosen_recipe.name}",
        "temperature": (
            "the chosen method's validation + internal test predictions in the selection run, "
            f"class-balanced NLL (T {deployed.temperature:.4g}; validation alone, plain NLL: "
            f"{t_validation:.4g})"
            if pool_test
            else "the chosen method's validation predictions in the selection run"
        ),
        "mirror": f"{holdout}, the chosen method",
        "ensemble": (
            "the default (--no-ensemble: the re-fit alone), not measured per fit (no hold-out "
            "is left once the re-fit trained on it): on benchmarks/fit_folder.py the average beat "
            "the re-fit alone on 32 of 44 paired fits (mean +0.32 points) and lowered its mean "
            "ECE on 11 of 14 folder-benchmarks (docs/RESULTS.md, issue 19)"
            if use_ensemble
            else "not used"
        ),
        "test_figures": (
            f"test split ({sizes['test']:,} images, {data.origins['test']}), selection run"
            + (
                "; it chose the recipe and method too, and the re-fit trained on it"
                if pool_test
                else ""
            )
        ),
        "bundle": (
            f"re-fit on {pooled.origins['train']} ({n_all:,} images)"
            + (f" averaged with the selection run ({n_train:,} images)" if use_ensemble else "")
            if pooled
            else f"selection run ({n_train:,} training images)"
        ),
    }

    def member_spec(m: DeployedClassifier) -> dict:
        return {
            "backbone": cfg.model.name,
            "num_classes": len(data.classes),
            "channels": prep.channels,
            "feature_dim": int(m.backbone.feature_dim),
            "head": head_spec(m.head),
            "mirror": use_mirror,
        }

    spec = member_spec(single)
    if use_ensemble:
        spec = {**spec, "members": [member_spec(m) for m in model.members]}
    meta = {
        "classes": data.classes,
        "preprocessing": prep.to_json(),
        "temperature": deployed.temperature,
        "method": chosen.name,
        "mirror": mirror,
        "recipe": chosen_recipe.name,
        "refit": pooled is not None,
        "ensemble": ["re-fit", "selection run"] if use_ensemble else None,
        "pins": pins,
        "backbone": {
            "name": cfg.model.name,
            "weights": "swa",
            "pretrained": data.plan.weights_path,
        },
        "selection": f"on the {'validation + internal test' if pool_test else 'validation'} "
        "split: recipe: best balanced accuracy (rung 2's best when a rung-1 candidate leads it "
        "by no more than one bootstrap standard deviation); method: the simplest within one "
        "bootstrap standard deviation of the best balanced accuracy; temperature fitted on "
        + ("validation + internal test, class-balanced" if pool_test else "validation"),
        "measured_on": measured,
        "metrics": {"validation": deployed.val, "test": deployed.test},
        "metrics_from": "the selection run " + chosen_recipe.name + " (hold-out figures)",
        "methods": {
            s.name: {k: v for k, v in s.to_json().items() if k != "name"} for s in best.scores
        },
        "data": {
            "sizes": sizes,
            "origins": data.origins,
            "train_counts": data.splits["train"].counts().tolist(),
            "bundle_train_counts": (pooled or data).splits["train"].counts().tolist(),
            "excluded_classes": data.excluded,
            "skipped_files": len(data.skipped),
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "longtail_version": longtail.__version__,
        "torch_version": torch.__version__,
    }
    bundle = save_bundle(
        out / BUNDLE, model, spec=spec, meta=meta, check_inputs=_check_inputs(data), log=log
    )
    checked = [
        f"{r['file']} matches to {r['max_abs_diff']:.2g}"
        for r in bundle.meta["exports"].values()
        if "file" in r
    ]
    log(
        f"bundle: {bundle.dir} (recipe {chosen_recipe.name}, method {chosen.name}, "
        f"T = {deployed.temperature:.3g}{', mirror-averaged' if use_mirror else ''}"
        f"{', re-fitted' if pooled else ''}{', ensemble of 2' if use_ensemble else ''}); "
        + ("; ".join(checked) or "no exported files")
    )
    html_path, _ = write_report([chosen_recipe.run_dir], out)
    log(f"report: {html_path} (the selection run: hold-out figures)")
    summary = {
        "train": str(train),
        "val": str(val) if val is not None else None,
        "test": str(test) if test is not None else None,
        "input_plan": data.plan.reasons,
        "budget_minutes": budget,
        "searched": searched,
        "candidates": [c.to_json() for c in candidates],
        "skipped_candidates": skipped,
        "recipe": chosen_recipe.name,
        "recipe_why": why or "the best hold-out balanced accuracy",
        "recipe_summary": recipe_summary(cfg, n_train),
        "chosen": chosen.name,
        "mirror": mirror,
        "scores": [s.to_json() for s in best.scores],
        "refit": pooled is not None,
        "ensemble": use_ensemble,
        "pins": pins,
        "unpinned": unpinned if pooled else [],
        "measured_on": measured,
        "bundle": str(bundle.dir),
        "report": str(html_path),
        "run_dir": str(run_dir),
        "selection_run_dir": chosen_recipe.run_dir,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / FIT_JSON, summary)
    return FitResult(
        out,
        bundle,
        deployed,
        best.scores,
        data,
        best.results,
        candidates,
        chosen_recipe,
        refit=pooled is not None,
        mirror=use_mirror,
        ensemble=use_ensemble,
    )
