"""Does the validation temperature help on the test set? The joint classifier of each run.

    python benchmarks/temperature_check.py RUN_DIR [RUN_DIR ...] [--backbone swa|final]

For each run (after ``longtail classify``, which caches the features) the backbone's own linear
classifier scores the cached validation and test features. Printed per run: the test NLL and
ECE at ``T = 1`` and at the temperature fitted on the whole validation split (what stage 2's
"TS" columns and ``fit`` use), and what a cross-validated rule would do: over 50 random
class-stratified halvings of the validation split, fit ``T`` on one half and compare the other
half's NLL at that ``T`` against ``T = 1``; the rule keeps the fitted ``T`` only when the mean
held-out gain is positive by more than one standard error. Nothing here is chosen on the test
set: the test columns are read only.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from longtail.core.io import verified_load
from longtail.core.rundir import RunDir
from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import expected_calibration_error, nll


def halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets, each holding half of every class of ``labels`` ``(N,)``."""
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    return np.concatenate(a), np.concatenate(b)


def held_out_gain(z: torch.Tensor, y: torch.Tensor, rounds: int = 50) -> tuple[float, float]:
    """Mean and standard error of ``NLL(T=1) - NLL(T fitted on the other half)`` (nats per
    image) over ``rounds`` stratified halvings, both directions.

    ``z``: validation logits ``(N, C)``; ``y``: labels ``(N,)``.
    """
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(rounds):
        a, b = halves(y.numpy(), rng)
        for fit_on, test_on in ((a, b), (b, a)):
            t = fit_temperature(z[fit_on], y[fit_on])
            zt, yt = z[test_on], y[test_on]
            gains.append(nll(zt, yt) - nll(apply_temperature(zt, t), yt))
    g = np.asarray(gains)
    return float(g.mean()), float(g.std(ddof=1) / np.sqrt(rounds))


def check(run_dir: str, backbone: str) -> None:
    """Print one run's line (see the module docstring)."""
    run = RunDir(run_dir)
    feats = verified_load(run.feature_path(backbone))
    state = verified_load(run.model_path(backbone))
    w, b = state["classifier.weight"].double(), state["classifier.bias"].double()
    (zv, yv), (zt, yt) = feats["val"], feats["test"]
    lv, lt = zv.double() @ w.T + b, zt.double() @ w.T + b
    t = fit_temperature(lv, yv)
    gain, se = held_out_gain(lv, yv)
    keep = gain > se

    def test_metrics(temp: float) -> str:
        z = apply_temperature(lt, temp)
        ece = expected_calibration_error(z.softmax(1), yt)
        return f"NLL {nll(z, yt):.4f} ECE {100 * ece:5.2f}"

    print(
        f"{run_dir}: T {t:.3f}; test at T=1: {test_metrics(1.0)}; at T: {test_metrics(t)}; "
        f"held-out gain {gain:+.4f} ± {se:.4f} -> rule {'keeps T' if keep else 'keeps T=1'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--backbone", default="swa", choices=("swa", "final"))
    a = ap.parse_args()
    for d in a.run_dirs:
        check(d, a.backbone)


if __name__ == "__main__":
    main()
