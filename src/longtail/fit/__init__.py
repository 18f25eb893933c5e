"""Bring your own data: ``fit`` a folder or CSV into a calibrated model bundle, ``predict``.

Modules, one job each: ``sources`` (which files, which labels), ``images`` (robust decoding and
the shared preprocessing rule), ``plan`` (input size, backbone, recipe), ``ingest`` (checks,
hold-outs, the materialised ``user`` dataset), ``select`` (calibrate and choose a stage-2
method on validation), ``search`` (which recipes to try, how to choose among them),
``bundle`` (the deployable network), ``export`` (ONNX, ``torch.export`` and TorchScript files,
each checked against the network), ``predict`` (:func:`predict`) and ``onnx_runtime`` (a
bundle's ``model.onnx`` with onnxruntime, numpy and Pillow only). Nothing here trains: the
``fit`` function that runs stages 1 and 2 is :func:`longtail.fitting.fit`.

The torch-side names are imported on first use, so ``longtail.fit.onnx_runtime`` and
``longtail.fit.predict`` load without torch.
"""

from __future__ import annotations

import importlib

from longtail.fit.predict import Prediction, predict  # torch-free at import

_WHERE = {
    "Bundle": "bundle",
    "DeployedClassifier": "bundle",
    "load_bundle": "bundle",
}
_MOVED = {"fit": "longtail.fitting", "FitResult": "longtail.fitting"}

__all__ = [
    "Bundle",
    "DeployedClassifier",
    "Prediction",
    "load_bundle",
    "predict",
]


def __getattr__(name: str) -> object:
    """Import a torch-side name (``load_bundle``, ...) on first use."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"longtail.fit.{_WHERE[name]}"), name)
    if name in _MOVED:  # ImportError: `from longtail.fit import fit` shows this message
        raise ImportError(
            f"longtail.fit.{name} moved to {_MOVED[name]}.{name}: "
            f"use `from {_MOVED[name]} import {name}`"
        )
    raise AttributeError(f"module 'longtail.fit' has no attribute {name!r}")
