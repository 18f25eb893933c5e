"""The results schema: what ``longtail classify`` writes to ``results.json``, typed and versioned.

Stage 2 (:mod:`longtail.classify.run`) builds a :class:`Results` and writes
:meth:`Results.to_json`; ``longtail report``, ``longtail sweep``, ``longtail fit`` and the
benchmark summarizers read it back with :func:`load_results` (or :meth:`Results.from_json`).
This module is the one place that knows the file's keys; :class:`longtail.core.rundir.RunDir` is the
one place that knows its name.

One file::

    {"schema_version": 1, "run_dir": ..., "backbone": "swa" | "final",
     "train_counts": [C ints], "classes": [C names], "timings": {step: seconds},
     "methods": {name: {accuracy, many, medium, few, nll, ece, brier, per_class,   # test set
                        reliability: {count, accuracy, confidence},  # 15 test bins
                        val: {the same metrics on validation}        # with a val split
                        ts: {temperature, nll, ece, brier},          # with stage2.calibrate
                        weight_norm, info, seconds}}}

Files written before the schema had a version (no ``schema_version`` key) hold exactly these
keys, so they are read as version 1; a file of a newer version than this code knows is refused.

:func:`mean_std` is the one aggregator (mean ± sample standard deviation over seeds) that the
report, the sweep and the benchmark summarizers use.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtail.core.errors import LongtailError
from longtail.core.rundir import RunDir

__all__ = [
    "SCHEMA_VERSION",
    "Calibration",
    "MeanStd",
    "MethodResult",
    "Metrics",
    "Results",
    "load_results",
    "mean_std",
]

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"
_METRIC_KEYS = ("accuracy", "many", "medium", "few", "nll", "ece", "brier")
_REQUIRED = ("accuracy", "nll", "ece", "brier")
_REGENERATE = "rerun `longtail classify RUN_DIR` to write it again"


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise LongtailError(f"{where} has no {key!r}: {_REGENERATE}")
    return d[key]


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Metrics of one set of logits (:func:`longtail.evaluate.metrics.evaluate_logits`).

    Accuracies and ECE are fractions, NLL in nats, Brier in its sum form; a shot split without
    classes is ``None``, so is the accuracy of a class without examples in ``per_class``.
    """

    accuracy: float
    nll: float
    ece: float
    brier: float
    many: float | None = None
    medium: float | None = None
    few: float | None = None
    per_class: list[float | None] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict, where: str = "a metrics entry") -> Metrics:
        """The metrics of a JSON dict; a missing accuracy / NLL / ECE / Brier is an error."""
        if not isinstance(d, dict):
            raise LongtailError(f"{where} is not a JSON object: {_REGENERATE}")
        return cls(
            **{k: float(_need(d, k, where)) for k in _REQUIRED},
            **{k: _float(d.get(k)) for k in ("many", "medium", "few")},
            per_class=[_float(a) for a in d.get("per_class") or []],
        )

    def to_json(self) -> dict:
        """The JSON dict, keys in the order ``evaluate_logits`` returns them."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _METRIC_KEYS}
        out["per_class"] = list(self.per_class)
        return out


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Test metrics after temperature scaling with ``temperature`` fitted on validation."""

    temperature: float
    nll: float
    ece: float
    brier: float

    @classmethod
    def from_json(cls, d: dict, where: str = "a ts entry") -> Calibration:
        """The calibration entry of a JSON dict."""
        if not isinstance(d, dict):
            raise LongtailError(f"{where} is not a JSON object: {_REGENERATE}")
        return cls(**{k: float(_need(d, k, where)) for k in ("temperature", "nll", "ece", "brier")})

    def to_json(self) -> dict:
        """The JSON dict."""
        return {
            "temperature": self.temperature,
            "nll": self.nll,
            "ece": self.ece,
            "brier": self.brier,
        }


@dataclass(frozen=True, kw_only=True)
class MethodResult:
    """One stage-2 method's row of ``results.json``.

    Attributes:
        test: test-set metrics (stored flat in the method's entry).
        reliability: 15 test reliability bins ``{count, accuracy, confidence}`` (``None``
            entries for empty bins), or ``None`` in files of an older ``longtail classify``.
        val: validation metrics, with a validation split.
        ts: temperature fitted on validation and the test metrics after scaling by it, with
            ``stage2.calibrate``.
        weight_norm: per-class norms of a linear head's (effective) weights, else ``None``.
        info: what the method chose on validation (``Stage2Context.info``).
        seconds: time to fit the method.
    """

    test: Metrics
    reliability: dict[str, list] | None = None
    val: Metrics | None = None
    ts: Calibration | None = None
    weight_norm: list[float] | None = None
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, key: str, sub: str | None = None) -> float | None:
        """``key`` of the test metrics (``sub=None``), of ``val`` or of ``ts``; ``None`` when
        absent or NaN."""
        src = {None: self.test, "val": self.val, "ts": self.ts}.get(sub)
        v = getattr(src, key, None) if src is not None else None
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    @classmethod
    def from_json(cls, d: dict, where: str = "a method entry") -> MethodResult:
        """The method entry of a JSON dict."""
        if not isinstance(d, dict):
            raise LongtailError(f"{where} is not a JSON object: {_REGENERATE}")
        val, ts = d.get("val"), d.get("ts")
        return cls(
            test=Metrics.from_json(d, where),
            reliability=d.get("reliability"),
            val=None if val is None else Metrics.from_json(val, f"{where}'s val"),
            ts=None if ts is None else Calibration.from_json(ts, f"{where}'s ts"),
            weight_norm=d.get("weight_norm"),
            info=dict(d.get("info") or {}),
            seconds=float(d.get("seconds") or 0.0),
        )

    def to_json(self) -> dict:
        """The JSON dict: test metrics flat, then the optional entries present."""
        out = self.test.to_json()
        if self.reliability is not None:
            out["reliability"] = self.reliability
        if self.val is not None:
            out["val"] = self.val.to_json()
        if self.ts is not None:
            out["ts"] = self.ts.to_json()
        out["weight_norm"] = self.weight_norm
        out["info"] = self.info
        out["seconds"] = self.seconds
        return out


@dataclass(frozen=True, kw_only=True)
class Results:
    """One ``results.json``: every stage-2 method of one run on one backbone, in order."""

    methods: dict[str, MethodResult]
    train_counts: list[int]
    run_dir: str = ""
    backbone: str = "?"
    classes: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def calibrated(self) -> bool:
        """Some method has temperature-scaled metrics (``ts``)."""
        return any(m.ts is not None for m in self.methods.values())

    @classmethod
    def from_json(cls, d: Any, source: str | Path = "results") -> Results:
        """Read a results dict of any known version (one without a version: the layout
        ``longtail classify`` wrote before there was one, which maps one-to-one onto version 1).

        Raises:
            LongtailError: ``source`` is of a newer schema version than this code reads, has
                no methods, or lacks a required key; the message says how to get a readable one.
        """
        if not isinstance(d, dict):
            raise LongtailError(f"{source} is not a results object: {_REGENERATE}")
        version = d.get(VERSION_KEY, 1)  # none: written before versioning, same layout as 1
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise LongtailError(
                f"{source} has {VERSION_KEY} {version!r}, not a positive integer: {_REGENERATE}"
            )
        if version > SCHEMA_VERSION:
            raise LongtailError(
                f"{source} has results schema version {version}, and this longtail reads up "
                f"to version {SCHEMA_VERSION}: upgrade longtail, or {_REGENERATE} with this one"
            )
        methods = d.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise LongtailError(f"{source} holds no method results: {_REGENERATE}")
        return cls(
            methods={
                n: MethodResult.from_json(m, f"{source}: method {n!r}") for n, m in methods.items()
            },
            train_counts=[int(c) for c in _need(d, "train_counts", str(source))],
            run_dir=str(d.get("run_dir", "")),
            backbone=str(d.get("backbone", "?")),
            classes=d.get("classes"),
            timings=dict(d.get("timings") or {}),
            schema_version=SCHEMA_VERSION,
        )

    def to_json(self) -> dict:
        """The JSON dict that ``results.json`` holds (always the current schema version)."""
        return {
            VERSION_KEY: SCHEMA_VERSION,
            "run_dir": self.run_dir,
            "backbone": self.backbone,
            "train_counts": list(self.train_counts),
            "classes": self.classes,
            "timings": self.timings,
            "methods": {n: m.to_json() for n, m in self.methods.items()},
        }


def load_results(run_dir: str | Path, backbone: str = "auto") -> Results:
    """The stage-2 results of ``run_dir`` for ``backbone`` (:meth:`RunDir.results_path`).

    Raises:
        LongtailError: the file is missing, unreadable, of an unknown version or incomplete.
    """
    run = RunDir(run_dir)
    return Results.from_json(run.results(backbone), run.results_path(backbone))


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for one value) of ``n`` values."""

    mean: float
    std: float | None
    n: int


def mean_std(values: Iterable[float | None]) -> MeanStd | None:
    """Mean ± sample std of the values that are not ``None`` or NaN; ``None`` without any.

    The one aggregator over seeds (report, sweep, benchmark summarizers): ``statistics.fmean``
    and ``statistics.stdev``.
    """
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return None
    return MeanStd(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))


def method_names(results: Sequence[Results], order: Sequence[str] = ()) -> list[str]:
    """Every method of the results: those in ``order`` first, in that order, then any others in
    order of appearance."""
    names: list[str] = []
    for r in results:
        names += [m for m in r.methods if m not in names]
    rank = {m: i for i, m in enumerate(order)}
    return sorted(names, key=lambda m: rank.get(m, len(rank)))
