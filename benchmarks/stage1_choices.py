"""Compare stage-1 settings by what they do to stage 2, validation first.

    python benchmarks/stage1_choices.py RUN [RUN ...] [--methods joint crt lws srepr ...]

Each RUN is a classified ``longtail train`` folder (``results.json``). For every run and
method it prints the validation balanced accuracy (the hold-out that chooses, with its sd over
the project's stratified bootstrap of the validation images: :func:`bootstrap_sd`), then the
test accuracy and the gain over the same run's joint classifier (read only, reported). A
setting is preferred on validation only where its validation accuracy leads by more than that
sd.

docs/RESULTS.md quotes its output for issue 18's weight-decay measurement. It trains nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from longtail.core.errors import LongtailError
from longtail.evaluate.bootstrap import bootstrap_gaps
from longtail.evaluate.results import load_results

DEFAULT_METHODS = ("joint", "ncm", "crt", "lws", "logit_adjust", "srepr", "srepr_ce", "swag_bma")


def bootstrap_sd(per_class: list[float], n_per_class: int) -> float:
    """Sd (points) of the balanced accuracy over the project's stratified bootstrap of the
    validation images (:func:`longtail.evaluate.bootstrap.bootstrap_gaps`, as ``fit`` and SRepr
    judge their hold-outs).

    ``per_class`` holds each class's validation accuracy (0-1) on ``n_per_class`` images; the
    hits are all a class resample needs, so they stand for the predictions. Against the true
    labels (always right) the gap is ``1 - accuracy``, whose sd is the accuracy's.
    """
    hits = np.concatenate([np.arange(n_per_class) < round(a * n_per_class) for a in per_class])
    labels = np.repeat(np.arange(len(per_class)), n_per_class)
    pred = np.where(hits, labels, (labels + 1) % len(per_class))
    gaps = bootstrap_gaps({"head": pred, "labels": labels}, labels, len(per_class), best="labels")
    return 100 * gaps["head"][1]


def main() -> None:
    """Print one block per run: method, validation acc ± sd, test acc, gain over joint."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--val-per-class", type=int, default=20)
    a = ap.parse_args()
    print(f"{'run':28s} {'method':13s} {'val %':>6s} {'± sd':>5s} {'test %':>7s} {'vs joint':>8s}")
    for run in a.runs:
        try:
            res = load_results(run)
        except LongtailError as e:
            raise SystemExit(f"stage1_choices: {e}") from None
        joint = 100 * res.methods["joint"].test.accuracy
        for name in a.methods:
            if name not in res.methods:
                continue
            m = res.methods[name]
            val = 100 * m.val.accuracy if m.val else float("nan")
            sd = bootstrap_sd(m.val.per_class, a.val_per_class) if m.val else float("nan")
            test = 100 * m.test.accuracy
            print(
                f"{run.name:28s} {name:13s} {val:6.1f} {sd:5.1f} {test:7.2f} {test - joint:+8.2f}"
            )
        print()


if __name__ == "__main__":
    main()
