"""Bring your own data: ``fit`` a folder or CSV into a calibrated model bundle, ``predict``.

Modules, one job each: ``sources`` (which files, which labels), ``images`` (robust decoding and
the shared preprocessing rule), ``plan`` (input size, backbone, recipe), ``prepare`` (checks,
hold-outs, the materialised ``user`` dataset), ``select`` (calibrate and choose a stage-2
method on validation), ``bundle`` (the deployable network and its TorchScript export),
``pipeline`` (:func:`fit`) and ``predict`` (:func:`predict`).
"""

from longtail.fit.bundle import Bundle, DeployedClassifier, load_bundle
from longtail.fit.pipeline import FitResult, fit
from longtail.fit.predict import Prediction, predict

__all__ = [
    "Bundle",
    "DeployedClassifier",
    "FitResult",
    "Prediction",
    "fit",
    "load_bundle",
    "predict",
]
