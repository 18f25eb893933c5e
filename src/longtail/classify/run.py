"""``longtail classify RUN_DIR``: stage-2 methods on one cached set of features.

Loads the stage-1 run, caches backbone features (and SWAG-sample banks for the methods that read
them), fits each requested method of :mod:`longtail.classify.registry` on train (choosing tau,
alpha on val), evaluates on test, fits a temperature per method on val, and writes
``results.json`` with one entry per method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from longtail.classify import methods as M
from longtail.classify import registry
from longtail.classify.features import cached, extract, mirror_averaged, swag_banks
from longtail.classify.interface import Stage2Context, Stage2Method
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_json, verified_load
from longtail.core.progress import progress
from longtail.core.rundir import RunDir
from longtail.core.runtime import init_distributed, make_runtime, seed_everything
from longtail.data.build import build_data, make_loaders
from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import evaluate_logits
from longtail.evaluate.results import Calibration, MethodResult, Metrics, Results
from longtail.evaluate.tables import comparison_table, render_text
from longtail.models import autotune, build_model
from longtail.train.swag import SWAG

CONFIG_KEY = "stage2.methods"


def _memo(compute: Callable[[], dict]) -> Callable[[], dict]:
    """``compute`` called once, on first use; later calls return the same value."""
    box: list[dict] = []

    def get() -> dict:
        if not box:
            box.append(compute())
        return box[0]

    return get


class Stage2:
    """A stage-1 run directory opened for classifier learning."""

    def __init__(self, run_dir: str | Path, overrides: list[str] | None = None, log=print):
        self.rundir = RunDir(run_dir)
        self.dir = self.rundir.path
        self.cfg: DictConfig = self.rundir.config(overrides)
        self.log = log
        cfg, s2 = self.cfg, self.cfg.stage2
        self.rt = make_runtime(
            cfg.device, cfg.precision, cfg.channels_last, bf16_faster=autotune.bf16_faster
        )
        self.rt = init_distributed(self.rt)  # rank 0's precision on every rank
        seed_everything(cfg.seed)
        self.splits = build_data(cfg)
        self.counts = self.splits.train.counts()
        self.num_classes = self.splits.train.num_classes
        ld = make_loaders(cfg, self.splits, self.rt, batch_size=cfg.optim.batch_size)
        self.loaders = {"train": ld["train_eval"], "train_aug": ld["train"], "test": ld["test"]}
        if "val" in ld:
            self.loaders["val"] = ld["val"]
        has_swa = self.rundir.model_path("swa").is_file()
        self.backbone = s2.backbone if s2.backbone != "auto" else ("swa" if has_swa else "final")
        weights = self.rundir.model_path(self.backbone)
        if not weights.is_file():
            raise LongtailError(
                f"{weights} not found: stage 1 did not finish"
                + (" or ran without SWA (swa.enabled=false)" if self.backbone == "swa" else "")
            )
        self.model = self._load_model(weights)
        self.timings: dict[str, float] = {}
        # the heads fitted by the last run(), by method: their input (features (N, d), or the
        # SWAG banks (M, N, d), see Stage2Method.inputs) -> logits (N, C)
        self.heads: dict[str, torch.nn.Module] = {}
        self.results: Results | None = None  # what the last run() wrote, typed
        self._swag: Callable[[], dict] | None = None  # the SWAG banks, loaded on first use

    def _load_model(self, weights: Path) -> torch.nn.Module:
        c = self.cfg
        model = build_model(
            c.model.name, self.num_classes, self.splits.train.channels, kernels=c.kernels
        )
        model.load_state_dict(verified_load(weights))
        model.to(self.rt.device).eval()
        if self.rt.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    # ------------------------------------------------------------------ features
    def features(self) -> dict:
        t0 = time.perf_counter()
        feats = cached(
            self.rundir.feature_path(self.backbone),
            lambda: extract(self.model, self.loaders, self.rt, seconds=self.timings),
            self.log,
        )
        self.timings.setdefault("features", time.perf_counter() - t0)
        return feats

    def mirror_features(self) -> dict:
        """Validation / test features averaged with their left-right mirror images'
        (:func:`~longtail.classify.features.mirror_averaged`), cached; ``{split: (z (N, d),
        y (N,))}``."""
        return cached(
            self.rundir.feature_path(f"{self.backbone}-mirror"),
            lambda: mirror_averaged(self.model, self.loaders, self.rt, self.features()),
            self.log,
        )

    def augmented_views(self) -> torch.Tensor | None:
        v = self.cfg.stage2.aug_views
        if v <= 0:
            return None

        def compute():
            loader = self.loaders["train_aug"]
            return torch.stack(
                [
                    extract(self.model, {"train": loader}, self.rt, ("train",))["train"][0]
                    for _ in progress(range(v), desc="augmented feature views", unit="view")
                ]
            )

        return cached(self.rundir.feature_path(f"{self.backbone}-aug{v}"), compute, self.log)

    def swag_features(self) -> dict:
        s2 = self.cfg.stage2
        swag_path = self.rundir.swag_path
        if not swag_path.is_file():
            raise LongtailError(_no_swag("SWAG feature banks need", swag_path))
        swag = SWAG(self.model, 0)
        swag.load_state_dict(verified_load(swag_path))
        # every setting the banks depend on (BN re-estimation images included) names the file
        tag = (
            f"swag-M{s2.srepr_samples}-s{s2.srepr_scale:g}-bn{s2.srepr_bn_images}"
            f"-seed{self.cfg.seed}"
        )
        return cached(
            self.rundir.feature_path(tag),
            lambda: swag_banks(
                self.model,
                swag,
                self.loaders,
                self.rt,
                s2.srepr_samples,
                s2.srepr_scale,
                self.cfg.seed,
                s2.srepr_bn_images,
            ),
            self.log,
        )

    # ------------------------------------------------------------------ methods
    def run(self, methods: Sequence[str] | None = None) -> dict:
        """Fit, evaluate and calibrate the requested methods (``None``: the config's
        ``stage2.methods``; ``all``: every registered one); returns the results dict."""
        chosen = self._plan(methods)
        feats = self.features()
        needs_val = [m.name for m in chosen if m.needs_val]
        if "val" not in feats and needs_val:
            raise LongtailError(
                f"{', '.join(sorted(needs_val))} choose hyper-parameters on a "
                "validation split, and this run has none: set "
                "data.val_per_class > 0 in stage 1"
            )
        ztr, ytr = feats["train"]
        zv, yv = feats.get("val", (None, None))
        views = self.augmented_views() if any(m.uses_views for m in chosen) else None
        heads: dict[str, torch.nn.Module] = {}
        info: dict[str, dict] = {}
        self._swag = _memo(self.swag_features) if self.rundir.swag_path.is_file() else None
        base = Stage2Context(
            train_features=ztr,
            train_labels=ytr,
            num_classes=self.num_classes,
            joint_weight=self.model.classifier.weight.detach().float().cpu(),
            joint_bias=self.model.classifier.bias.detach().float().cpu(),
            config=self.cfg,
            seed=self.cfg.seed,
            val_features=zv,
            val_labels=yv,
            heads=heads,
            log=self.log,
            swag_loader=self._swag,
        )
        for m in chosen:
            t0 = time.perf_counter()
            ctx = replace(base, info={}, views=views if m.uses_views else None)
            heads[m.name] = m.fit(ctx)
            if ctx.info:
                info[m.name] = ctx.info
            self.timings[m.name] = time.perf_counter() - t0
        self.heads = dict(heads)
        return self._evaluate(feats, chosen, heads, info)

    def _plan(self, methods: Sequence[str] | None) -> list[Stage2Method]:
        """The registry entries to run, in order; those that need a SWAG posterior the run
        lacks (and those that require them) left out with a note, or an error when nothing
        else was asked for."""
        if methods is None:
            names = registry.resolve(self.cfg.stage2.methods, CONFIG_KEY)
        else:
            names = registry.resolve(methods)
        chosen = [registry.get(n) for n in names]
        if self.rundir.swag_path.is_file():
            return chosen
        kept = registry.without_swag(names)
        skipped = [n for n in names if n not in kept]
        if skipped and len(skipped) == len(chosen):
            verb = "needs" if len(skipped) == 1 else "need"
            raise LongtailError(_no_swag(f"{', '.join(skipped)} {verb}", self.rundir.swag_path))
        if skipped:
            self.log(
                f"note: skipping {', '.join(skipped)}: this run has no SWAG posterior "
                "(swa.enabled=false)"
            )
        return [m for m in chosen if m.name not in skipped]

    def _logits(
        self, method: Stage2Method, head: torch.nn.Module, split: str, feats: dict
    ) -> torch.Tensor:
        """``(N, C)`` logits of ``split``: the head on its features, or on the SWAG banks for
        a method whose head takes them."""
        with torch.no_grad():
            if method.inputs == "swag":
                return head(self._swag()[split][0]).float()
            return head(feats[split][0]).float()

    def _evaluate(self, feats: dict, chosen: list[Stage2Method], heads: dict, info: dict) -> dict:
        from longtail.evaluate.metrics import reliability_bins

        d, s2 = self.cfg.data, self.cfg.stage2
        results: dict[str, MethodResult] = {}
        for method in chosen:
            name, head = method.name, heads[method.name]
            lt = self._logits(method, head, "test", feats)
            test = evaluate_logits(lt, feats["test"][1], self.counts, d.many_shot, d.few_shot)
            # test reliability bins (15, as ECE) for the report's diagrams; NaN -> None
            rb = reliability_bins(torch.softmax(lt.double(), dim=1), feats["test"][1], 15)
            reliability = {
                k: [None if v != v else (int(v) if k == "count" else float(v)) for v in rb[k]]
                for k in ("count", "accuracy", "confidence")
            }
            val = ts = None
            if "val" in feats:
                lv = self._logits(method, head, "val", feats)
                val = evaluate_logits(lv, feats["val"][1], self.counts, d.many_shot, d.few_shot)
                if s2.calibrate:
                    t = fit_temperature(lv, feats["val"][1])
                    scaled = evaluate_logits(
                        apply_temperature(lt, t),
                        feats["test"][1],
                        self.counts,
                        d.many_shot,
                        d.few_shot,
                    )
                    ts = Calibration(
                        temperature=t, nll=scaled["nll"], ece=scaled["ece"], brier=scaled["brier"]
                    )
            norms = M.weight_norms(head)
            results[name] = MethodResult(
                test=Metrics(**test),
                reliability=reliability,
                val=None if val is None else Metrics(**val),
                ts=ts,
                weight_norm=None if norms is None else [float(x) for x in norms],
                info=info.get(name, {}),
                seconds=self.timings.get(name, 0.0),
            )
        self.results = Results(
            run_dir=str(self.dir),
            backbone=self.backbone,
            train_counts=self.counts.tolist(),
            classes=self.splits.train.classes,
            timings=self.timings,
            methods=results,
        )
        out = self.results.to_json()
        if self.rt.is_main:
            atomic_write_json(self.rundir.results_path(s2.backbone), out)
        return out


def _no_swag(who_needs: str, swag_path: Path) -> str:
    return (
        f"{who_needs} a SWAG posterior, and {swag_path} does not exist: "
        "train stage 1 with swa.enabled=true and swa.swag_rank >= 2"
    )


def results_path(run_dir: str | Path, backbone: str = "auto") -> Path:
    """Where stage 2 writes its results: ``results.json`` for the default backbone choice,
    ``results-<backbone>.json`` when ``stage2.backbone`` is set explicitly
    (:meth:`RunDir.results_path`)."""
    return RunDir(run_dir).results_path(backbone)


def classify(
    run_dir: str | Path,
    methods: Sequence[str] | None = None,
    overrides: list[str] | None = None,
    log=print,
) -> dict:
    """Run stage-2 ``methods`` on a stage-1 run directory; returns what ``results.json`` holds.

    Args:
        methods: registered method names or ``all``; ``None``: the run config's
            ``stage2.methods`` (with ``overrides`` applied).
    """
    # a typo fails before any data is loaded
    if methods is None:
        registry.resolve(RunDir(run_dir).config(overrides).stage2.methods, CONFIG_KEY)
    else:
        registry.resolve(methods)
    return Stage2(run_dir, overrides, log).run(methods)


def results_table(results: dict | Results) -> str:
    """The console comparison table (compact headers) of one run's results, or of a
    ``results.json`` dict."""
    if not isinstance(results, Results):
        results = Results.from_json(results)
    return render_text(comparison_table([results], compact=True))
