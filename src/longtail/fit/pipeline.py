"""``longtail fit``: a user's folder or CSV in, a calibrated, deployable model bundle out.

1. data (:mod:`longtail.fit.ingest`): read, check, profile, split and materialise the images as
   the ``user`` dataset in ``OUT/data``;
2. stage 1 (:class:`longtail.train.Stage1`) in ``OUT/run`` with SWA / SWAG and the recipe
   of :mod:`longtail.fit.plan` (regularisation scaled to the data size), then every stage-2
   method (:class:`longtail.classify.run.Stage2`) on the cached SWA features;
3. calibrate each method on validation, choose one (:mod:`longtail.fit.select`);
4. bundle it (:mod:`longtail.fit.bundle`) in ``OUT/bundle`` with ``model.onnx`` and ``model.ts``
   (:mod:`longtail.fit.export`), write ``OUT/report.html`` / ``report.md`` and ``OUT/fit.json``.

``OUT/run`` is an ordinary run directory: ``longtail classify OUT/run`` and ``longtail report
OUT/run`` work on it (its config says ``data.dataset=user data.root=OUT/data``).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import longtail
from longtail.classify.heads import head_spec
from longtail.classify.run import Stage2, results_table
from longtail.config import load_config
from longtail.data.build import check_batch_size
from longtail.errors import LongtailError
from longtail.evaluate.report import write_report
from longtail.fit.bundle import Bundle, DeployedClassifier, save_bundle
from longtail.fit.images import decode
from longtail.fit.ingest import UserData, read_user_data, save_user_data
from longtail.fit.plan import recipe, recipe_summary
from longtail.fit.select import MethodScore, choose, score_methods, selection_table
from longtail.io import atomic_write_json
from longtail.runtime import world_size_from_env
from longtail.train import Stage1
from longtail.train.schedules import swa_collect_from

CHECK_IMAGES = 32  # validation images the export check runs on


@dataclass
class FitResult:
    """What one fit produced.

    Attributes:
        out: the output folder; ``bundle``: the loaded model bundle.
        chosen: the deployed stage-2 method; ``scores``: every deployable method's figures.
        data: the materialised data; ``results``: stage 2's ``results.json`` dict.
    """

    out: Path
    bundle: Bundle
    chosen: MethodScore
    scores: list[MethodScore]
    data: UserData
    results: dict


# keys `longtail fit` sets itself (the user dataset it materialises in OUT/data)
FIT_SETS = ("data.dataset", "data.root", "data.imbalance")


def _data_keys(out: Path) -> dict:
    return {"dataset": "user", "root": str(out / "data"), "imbalance": None}


def _resolve_overrides(overrides: list[str], out: Path, epochs: int | None) -> DictConfig:
    """The user's overrides resolved over the defaults and validated, before any file is read or
    written: a mistyped key or a bad value fails here, so ``--out`` stays untouched."""
    extra = [f"optim.epochs={epochs}"] if epochs else []
    cfg = load_config(None, overrides + extra, base={"data": _data_keys(out)})
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
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train, calibrate, choose and bundle a classifier for a user's images.

    Args:
        train: ImageFolder tree ``ROOT/<class>/<image>`` or CSV / list file (``path,label`` or
            ``path label``; label an integer or a class name; paths relative to the file).
        out: a new (or empty) output folder.
        val, test: the user's own validation / test data; held out from ``train`` if absent.
        epochs: stage-1 epochs (default from the data size, see :mod:`longtail.fit.plan`).
        image_size: input side ``S`` (default from the image sizes).
        weights: a local torchvision ResNet state dict to fine-tune from.
        overrides: ``key=value`` config overrides, applied over the plan's choices.
        strict: fail on any unreadable file instead of skipping it.
        log: where progress lines go.

    Returns:
        A :class:`FitResult`; the bundle's network maps images ``(B, C, S, S)`` in ``[0, 1]``
        to calibrated probabilities ``(B, K)``.
    """
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    overrides = list(overrides or [])
    _check_out(out)
    # nothing is written until the whole config is resolved and checked: the overrides alone
    # first (before the images are read), then with the recipe the data implies
    given = _resolve_overrides(overrides, out, epochs)
    epochs = epochs or _given(given, overrides, "optim.epochs")
    image_size = image_size or _given(given, overrides, "data.image_size")
    weights = weights or _given(given, overrides, "model.weights_path")
    seed = _given(given, overrides, "seed") or 0
    data = read_user_data(
        train,
        out / "data",
        val=val,
        test=test,
        image_size=image_size,
        weights_path=weights,
        model=_given(given, overrides, "model.name"),
        strict=strict,
        seed=seed,
        log=log,
    )
    plan, n_train = data.plan, len(data.splits["train"])
    base = recipe(
        n_train,
        plan,
        epochs=epochs,
        batch_size=_given(given, overrides, "optim.batch_size"),
        swa_start=_given(given, overrides, "swa.start") or 0.75,
    )
    base["seed"] = seed
    base["data"] = {
        **_data_keys(out),
        "image_size": plan.size,
        "padding": max(1, round(plan.size / 8)),
    }
    base["model"] = {"name": plan.model, "weights_path": plan.weights_path}
    cfg = load_config(None, overrides + ([f"optim.epochs={epochs}"] if epochs else []), base=base)
    if not cfg.stage2.calibrate:
        log("note: stage2.calibrate=false ignored: fit always calibrates on validation")
        cfg.stage2.calibrate = True
    swa_collect_from(cfg)  # swa.start / anneal_epochs against the epochs, before any write
    check_batch_size(cfg.optim.batch_size, world_size_from_env(), n_train)  # what stage 1 checks
    log("recipe: " + recipe_summary(cfg, n_train))
    save_user_data(data)

    run_dir = out / "run"
    log(f"stage 1: {cfg.model.name} with SWA / SWAG -> {run_dir}")
    Stage1(cfg, run_dir).fit()
    log("stage 2: every classifier-learning method on the cached SWA features")
    s2 = Stage2(run_dir, log=log)
    results = s2.run()
    log(results_table(results))
    d = cfg.data
    # the temperatures stage 2 fitted on validation (fit forces stage2.calibrate), not refitted
    scores = score_methods(
        s2.heads,
        s2.features(),
        s2.counts,
        many=d.many_shot,
        few=d.few_shot,
        results=s2.results,
    )
    best = choose(scores)
    log(selection_table(scores, best.name))

    backbone = copy.deepcopy(s2.model).float().cpu().to(memory_format=torch.contiguous_format)
    head = copy.deepcopy(s2.heads[best.name]).float().cpu()
    prep = data.preprocessing
    model = DeployedClassifier(backbone, head, best.temperature, prep.mean, prep.std)
    spec = {
        "backbone": cfg.model.name,
        "num_classes": len(data.classes),
        "channels": prep.channels,
        "feature_dim": int(backbone.feature_dim),
        "head": head_spec(head),
    }
    meta = {
        "classes": data.classes,
        "preprocessing": prep.to_json(),
        "temperature": best.temperature,
        "method": best.name,
        "backbone": {"name": cfg.model.name, "weights": "swa", "pretrained": plan.weights_path},
        "selection": "best validation balanced accuracy, ties by validation NLL after "
        "temperature scaling; temperature fitted on validation",
        "metrics": {"validation": best.val, "test": best.test},
        "methods": {s.name: {k: v for k, v in s.to_json().items() if k != "name"} for s in scores},
        "data": {
            "sizes": {k: len(v) for k, v in data.splits.items()},
            "origins": data.origins,
            "train_counts": data.splits["train"].counts().tolist(),
            "excluded_classes": data.excluded,
            "skipped_files": len(data.skipped),
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "longtail_version": longtail.__version__,
        "torch_version": torch.__version__,
    }
    bundle = save_bundle(
        out / "bundle", model, spec=spec, meta=meta, check_inputs=_check_inputs(data), log=log
    )
    checked = [
        f"{r['file']} matches to {r['max_abs_diff']:.2g}"
        for r in bundle.meta["exports"].values()
        if "file" in r
    ]
    log(
        f"bundle: {bundle.dir} (method {best.name}, T = {best.temperature:.3g}); "
        + ("; ".join(checked) or "no exported files")
    )
    html_path, _ = write_report([run_dir], out)
    log(f"report: {html_path}")
    summary = {
        "train": str(train),
        "val": str(val) if val is not None else None,
        "test": str(test) if test is not None else None,
        "input_plan": plan.reasons,
        "recipe": recipe_summary(cfg, n_train),
        "chosen": best.name,
        "scores": [s.to_json() for s in scores],
        "bundle": str(bundle.dir),
        "report": str(html_path),
        "run_dir": str(run_dir),
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / "fit.json", summary)
    return FitResult(out, bundle, best, scores, data, results)
