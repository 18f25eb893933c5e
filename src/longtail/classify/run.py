"""``longtail classify RUN_DIR``: every stage-2 method on one cached set of features.

Loads the stage-1 run, caches backbone features (and SWAG-sample banks for SRepr), fits each
method on train (choosing tau, alpha on val), evaluates on test, fits a temperature per method
on val, and writes ``results.json`` with one entry per method.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from longtail.classify import methods as M
from longtail.classify.features import cached, extract, swag_banks
from longtail.classify.heads import LinearHead
from longtail.classify.srepr import bma_logits, train_srepr
from longtail.data.build import build_data, make_loaders
from longtail.errors import LongtailError
from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import evaluate_logits
from longtail.evaluate.tables import format_table
from longtail.io import atomic_write_json, verified_load
from longtail.models import build_model
from longtail.progress import progress
from longtail.rundir import RunDir
from longtail.runtime import init_distributed, make_runtime, seed_everything
from longtail.train.swag import SWAG

METHODS = ("joint", "ncm", "crt", "tau", "lws", "srepr")


def _resolve_methods(requested: list[str] | tuple[str, ...]) -> list[str]:
    out = []
    for m in requested:
        if m == "all":
            out += [x for x in METHODS if x not in out]
        elif m in METHODS:
            out.append(m) if m not in out else None
        else:
            raise LongtailError(f"unknown method {m!r}; choose from {', '.join(METHODS)} or all")
    return out


class Stage2:
    """A stage-1 run directory opened for classifier learning."""

    def __init__(self, run_dir: str | Path, overrides: list[str] | None = None, log=print):
        self.rundir = RunDir(run_dir)
        self.dir = self.rundir.path
        self.cfg: DictConfig = self.rundir.config(overrides)
        self.log = log
        cfg, s2 = self.cfg, self.cfg.stage2
        self.rt = make_runtime(cfg.device, cfg.precision, cfg.channels_last)
        init_distributed(self.rt)
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
        # the heads fitted by the last run(), by method: features (N, d) -> logits (N, C)
        self.heads: dict[str, torch.nn.Module] = {}

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
            raise LongtailError(
                f"srepr needs a SWAG posterior, and {swag_path} does not exist: "
                "train stage 1 with swa.enabled=true and swa.swag_rank >= 2"
            )
        swag = SWAG(self.model, 0)
        swag.load_state_dict(verified_load(swag_path))
        tag = f"swag-M{s2.srepr_samples}-s{s2.srepr_scale:g}-seed{self.cfg.seed}"
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
    def run(self, methods: list[str] | tuple[str, ...] = ("all",)) -> dict:
        """Fit, evaluate and calibrate the requested methods; returns the results dict."""
        methods = _resolve_methods(methods)
        if "srepr" in methods and not self.rundir.swag_path.is_file():
            if methods == ["srepr"]:
                self.swag_features()  # raises the explanatory error
            self.log("note: skipping srepr: this run has no SWAG posterior (swa.enabled=false)")
            methods.remove("srepr")
        needs_val = {"tau", "srepr"} & set(methods)
        feats = self.features()
        if "val" not in feats and needs_val:
            raise LongtailError(
                f"{', '.join(sorted(needs_val))} choose hyper-parameters on a "
                "validation split, and this run has none: set "
                "data.val_per_class > 0 in stage 1"
            )
        ztr, ytr = feats["train"]
        views = self.augmented_views()
        zfit = views if views is not None else ztr
        s2, seed, c = self.cfg.stage2, self.cfg.seed, self.num_classes
        joint_w = self.model.classifier.weight.detach().float().cpu()
        joint_b = self.model.classifier.bias.detach().float().cpu()
        heads: dict[str, torch.nn.Module] = {}
        info: dict[str, dict] = {}
        for m in methods:
            t0 = time.perf_counter()
            if m == "joint":
                heads[m] = LinearHead(joint_w, joint_b)
            elif m == "ncm":
                heads[m] = M.ncm(zfit, ytr, c, s2.ncm_metric)
            elif m == "crt":
                heads[m] = M.crt(
                    zfit, ytr, c, s2.epochs, s2.lr, s2.weight_decay, s2.batch_size, seed
                )
            elif m == "tau":
                zv, yv = feats["val"]
                heads[m], tau, sweep = M.tau_norm(joint_w, zv, yv, list(s2.tau_grid))
                info[m] = {"tau": tau, "sweep": sweep}
            elif m == "lws":
                heads[m] = M.lws(
                    joint_w,
                    joint_b,
                    zfit,
                    ytr,
                    s2.lws_epochs,
                    s2.lr,
                    s2.weight_decay,
                    s2.batch_size,
                    seed,
                )
            elif m == "srepr":
                self._srepr(feats, heads, info)
            self.timings[m] = time.perf_counter() - t0
        self.heads = dict(heads)
        return self._evaluate(feats, heads, info)

    def _srepr(self, feats: dict, heads: dict, info: dict) -> None:
        s2, seed, c = self.cfg.stage2, self.cfg.seed, self.num_classes
        t0 = time.perf_counter()
        banks = self.swag_features()
        t_banks = time.perf_counter() - t0
        z0, y = feats["train"]
        bank = banks["train"][0]
        zv, yv = feats["val"]

        def fit(alpha: float) -> LinearHead:
            return train_srepr(
                z0,
                bank,
                y,
                c,
                alpha,
                s2.srepr_temperature,
                s2.srepr_weighting,
                s2.srepr_epochs,
                s2.lr,
                s2.weight_decay,
                s2.batch_size,
                seed,
            )

        grid = list(s2.srepr_alpha_grid) or [s2.srepr_alpha]
        sweep = []
        for a in progress(grid, desc="SRepr (α grid)", unit="fit"):
            h = fit(a)
            r = evaluate_logits(h(zv).detach(), yv, self.counts)
            sweep.append({"alpha": a, "val_acc": r["accuracy"], "val_nll": r["nll"], "head": h})
        best = min(sweep, key=lambda r: r["val_nll"])
        heads["srepr"] = best["head"]
        heads["srepr_ce"] = fit(0.0)  # ablation: stochastic representations, CE only
        heads["swag_bma"] = heads["srepr"]  # evaluated on the SWAG banks, see _evaluate
        self._banks = banks
        info["srepr"] = {
            "alpha": best["alpha"],
            "temperature": s2.srepr_temperature,
            "samples": s2.srepr_samples,
            "scale": s2.srepr_scale,
            "feature_bank_seconds": t_banks,
            "sweep": [{k: v for k, v in r.items() if k != "head"} for r in sweep],
        }

    def _logits(self, name: str, head: torch.nn.Module, split: str, feats: dict) -> torch.Tensor:
        with torch.no_grad():
            if name == "swag_bma":
                return bma_logits(head, self._banks[split][0])
            return head(feats[split][0]).float()

    def _evaluate(self, feats: dict, heads: dict, info: dict) -> dict:
        from longtail.evaluate.metrics import reliability_bins

        d, s2 = self.cfg.data, self.cfg.stage2
        results: dict[str, dict] = {}
        for name, head in heads.items():
            lt = self._logits(name, head, "test", feats)
            r = evaluate_logits(lt, feats["test"][1], self.counts, d.many_shot, d.few_shot)
            # test reliability bins (15, as ECE) for the report's diagrams; NaN -> None
            rb = reliability_bins(torch.softmax(lt.double(), dim=1), feats["test"][1], 15)
            r["reliability"] = {
                k: [None if v != v else (int(v) if k == "count" else float(v)) for v in rb[k]]
                for k in ("count", "accuracy", "confidence")
            }
            if "val" in feats:
                lv = self._logits(name, head, "val", feats)
                r["val"] = evaluate_logits(
                    lv, feats["val"][1], self.counts, d.many_shot, d.few_shot
                )
                if s2.calibrate:
                    t = fit_temperature(lv, feats["val"][1])
                    ts = evaluate_logits(
                        apply_temperature(lt, t),
                        feats["test"][1],
                        self.counts,
                        d.many_shot,
                        d.few_shot,
                    )
                    r["ts"] = {"temperature": t, **{k: ts[k] for k in ("nll", "ece", "brier")}}
            norms = M.weight_norms(head)
            r["weight_norm"] = None if norms is None else [float(x) for x in norms]
            r["info"] = info.get(name, {})
            r["seconds"] = self.timings.get(name.replace("swag_bma", "srepr"), 0.0)
            results[name] = r
        out = {
            "run_dir": str(self.dir),
            "backbone": self.backbone,
            "train_counts": self.counts.tolist(),
            "classes": self.splits.train.classes,
            "timings": self.timings,
            "methods": results,
        }
        if self.rt.is_main:
            atomic_write_json(self.rundir.results_path(s2.backbone), out)
        return out


def results_path(run_dir: str | Path, backbone: str = "auto") -> Path:
    """Where stage 2 writes its results: ``results.json`` for the default backbone choice,
    ``results-<backbone>.json`` when ``stage2.backbone`` is set explicitly
    (:meth:`RunDir.results_path`)."""
    return RunDir(run_dir).results_path(backbone)


def classify(
    run_dir: str | Path,
    methods: list[str] | tuple[str, ...] = ("all",),
    overrides: list[str] | None = None,
    log=print,
) -> dict:
    """Run stage-2 ``methods`` on a stage-1 run directory; returns what ``results.json`` holds
    (and its ``path``)."""
    _resolve_methods(methods)  # a typo fails before any data is loaded
    return Stage2(run_dir, overrides, log).run(methods)


def results_table(results: dict) -> str:
    """The comparison table of a ``results.json`` dict."""
    return format_table(
        results["methods"], calibrated=any("ts" in r for r in results["methods"].values())
    )
