"""The layout of a run directory, defined once.

``longtail train`` (stage 1) and ``longtail classify`` (stage 2) write one folder per run::

    config.yaml             resolved config (written first, with run.json)
    run.json                provenance: git revision, command, device, precision, classes, data
    metrics.csv, tb/        one row per epoch; TensorBoard logs
    ckpt-EPOCH-STEP.pt      training checkpoints (+ .sha256), the newest two kept
    branch.pt               the state at the end of epoch ``swa.start`` (+ .sha256), where the
                            lr leaves the recipe's schedule: the SGD baseline branches off here
    model_final.pt          the last SGD weights                          } stage 1's outputs,
    model_swa.pt, swag.pt   SWA weights (BN re-estimated), SWAG posterior } in this order;
    stage1.json             test (and val) metrics of those models        } stage1.json last
    features/               stage 2's cached features and SWAG feature banks
    results.json            stage 2's results (``results-<backbone>.json`` for an explicit
                            ``stage2.backbone``); schema: :mod:`longtail.evaluate.results`

Every other module asks :class:`RunDir` for these paths, and for whether a run is
:attr:`~RunDir.finished` or :attr:`~RunDir.resumable`, instead of spelling the names itself.
This module sits at the bottom of the package, beside :mod:`longtail.core.io` and
:mod:`longtail.core.errors`: it imports nothing from ``train``, ``classify`` or ``evaluate``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from longtail.config import load_config
from longtail.core.errors import LongtailError

__all__ = ["RunDir"]

_CKPT = re.compile(r"ckpt-(\d+)-(\d+)\.pt$")


class RunDir:
    """A stage-1 / stage-2 run directory: the path of every file in it, and its state.

    Nothing is created or read on construction; ``RunDir(p)`` is cheap and ``p`` need not
    exist yet.
    """

    CONFIG = "config.yaml"
    INFO = "run.json"
    METRICS = "metrics.csv"
    TENSORBOARD = "tb"
    BRANCH = "branch.pt"
    STAGE1 = "stage1.json"
    SWAG = "swag.pt"
    FEATURES = "features"
    RESULTS = "results.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        """``config.yaml``: the resolved config, written when the run starts."""
        return self.path / self.CONFIG

    @property
    def info_path(self) -> Path:
        """``run.json``: provenance of the run (git revision, command, device, data, ...)."""
        return self.path / self.INFO

    @property
    def metrics_path(self) -> Path:
        """``metrics.csv``: one row per training epoch."""
        return self.path / self.METRICS

    @property
    def tensorboard_dir(self) -> Path:
        """``tb/``: TensorBoard logs of the same rows."""
        return self.path / self.TENSORBOARD

    @property
    def branch_path(self) -> Path:
        """``branch.pt``: the training state at the end of epoch ``swa.start`` (only with SWA),
        kept so that a run which follows the same schedule without SWA (the SGD baseline of
        ``longtail sweep``) continues from it instead of retraining the shared epochs."""
        return self.path / self.BRANCH

    @property
    def stage1_path(self) -> Path:
        """``stage1.json``: stage 1's test metrics, the last file stage 1 writes."""
        return self.path / self.STAGE1

    @property
    def swag_path(self) -> Path:
        """``swag.pt``: the SWAG posterior (only with SWA)."""
        return self.path / self.SWAG

    @property
    def features_dir(self) -> Path:
        """``features/``: stage 2's feature caches."""
        return self.path / self.FEATURES

    def model_path(self, backbone: str) -> Path:
        """``model_<backbone>.pt``: the ``final`` (last SGD) or ``swa`` weights."""
        return self.path / f"model_{backbone}.pt"

    def feature_path(self, tag: str) -> Path:
        """``features/<tag>.pt``: one cached feature set (the tag names what was computed)."""
        return self.features_dir / f"{tag}.pt"

    def results_path(self, backbone: str = "auto") -> Path:
        """Where stage 2 writes its results: ``results.json`` for the default backbone choice
        (``auto``), ``results-<backbone>.json`` when ``stage2.backbone`` is set explicitly."""
        return self.path / (self.RESULTS if backbone == "auto" else f"results-{backbone}.json")

    def checkpoint_path(self, epoch: int, step: int) -> Path:
        """``ckpt-<epoch>-<step>.pt``, zero-padded so the names sort in training order."""
        return self.path / f"ckpt-{epoch:04d}-{step:07d}.pt"

    def checkpoints(self) -> list[Path]:
        """The checkpoints in the directory, oldest first (by epoch, then step)."""
        found = []
        for p in self.path.glob("ckpt-*.pt"):
            m = _CKPT.search(p.name)
            if m:
                found.append(((int(m.group(1)), int(m.group(2))), p))
        return [p for _, p in sorted(found)]

    # ------------------------------------------------------------------ contents
    def config(self, overrides: list[str] | None = None) -> DictConfig:
        """The run's resolved config, with ``overrides`` (``key=value``) applied.

        Raises:
            LongtailError: the directory has no ``config.yaml``, so it is not a run.
        """
        if not self.config_path.is_file():
            raise LongtailError(
                f"{str(self.path)!r} is not a stage-1 run directory (no {self.CONFIG})"
            )
        return load_config(self.config_path, overrides)

    def info(self) -> dict:
        """The contents of ``run.json``.

        Raises:
            LongtailError: ``run.json`` is missing or not readable JSON.
        """
        return self._read_json(self.info_path)

    def stage1(self) -> dict:
        """The contents of ``stage1.json`` (``final``, ``swa``, ``*_val`` metrics).

        Raises:
            LongtailError: ``stage1.json`` is missing (stage 1 has not finished) or unreadable.
        """
        return self._read_json(self.stage1_path)

    def results(self, backbone: str = "auto") -> dict:
        """Stage 2's results for ``backbone`` (see :meth:`results_path`), as the JSON dict;
        :func:`longtail.evaluate.results.load_results` reads them typed and version-checked.

        Raises:
            LongtailError: the file is missing, not readable JSON, or holds no method results.
        """
        path = self.results_path(backbone)
        if not path.is_file():
            raise LongtailError(
                f"{str(self.path)!r} has no {path.name}: run `longtail classify {self.path}` first"
            )
        results = self._read_json(path, "; rerun `longtail classify`")
        if not isinstance(results, dict) or not results.get("methods"):
            raise LongtailError(
                f"{path} holds no method results; rerun `longtail classify {self.path}`"
            )
        return results

    @staticmethod
    def _read_json(path: Path, hint: str = "") -> Any:
        if not path.is_file():
            raise LongtailError(f"{path} not found")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LongtailError(f"{path} is not readable JSON ({e}){hint}") from e

    # ------------------------------------------------------------------ state
    @property
    def started(self) -> bool:
        """A training run has been started here: ``config.yaml`` or a checkpoint exists (a new
        run must not be written into it)."""
        return self.config_path.is_file() or bool(self.checkpoints())

    @property
    def resumable(self) -> bool:
        """There is a checkpoint to continue from (what ``--resume`` loads).

        It does not look at :attr:`finished`: resuming a finished run only redoes its final
        step, so callers that skip finished runs check that first. ``--resume`` also needs
        ``config.yaml``, and says so when it is missing.
        """
        return bool(self.checkpoints())

    @property
    def stopped_before_first_checkpoint(self) -> bool:
        """Started here but stopped before its first checkpoint (and not finished): there is
        nothing to resume and nothing to lose, so ``demo`` and ``sweep`` start it again from
        scratch (and ``train --resume`` restarts it from step 0 in place)."""
        return self.started and not self.resumable and not self.finished

    @property
    def finished(self) -> bool:
        """Stage 1 ran to its end: ``stage1.json`` (written last) is there, readable, and so is
        every model it reports: ``model_final.pt``, plus ``model_swa.pt`` and ``swag.pt`` when
        it has SWA metrics. A run missing any of them is not finished (and resuming it from
        its last checkpoint writes them again)."""
        if not (self.stage1_path.is_file() and self.model_path("final").is_file()):
            return False
        try:
            stage1 = json.loads(self.stage1_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(stage1, dict):
            return False
        if "swa" in stage1:
            return self.model_path("swa").is_file() and self.swag_path.is_file()
        return True
