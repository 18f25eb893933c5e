"""Evaluation: accuracy (overall, per class, many/medium/few shot), NLL, ECE, Brier, and
temperature scaling (docs/METHODS.md, "Evaluation")."""

from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import (
    accuracy,
    brier,
    evaluate_logits,
    expected_calibration_error,
    nll,
    per_class_accuracy,
    reliability_bins,
    shot_accuracy,
)

__all__ = [
    "accuracy",
    "apply_temperature",
    "brier",
    "evaluate_logits",
    "expected_calibration_error",
    "fit_temperature",
    "nll",
    "per_class_accuracy",
    "reliability_bins",
    "shot_accuracy",
]
