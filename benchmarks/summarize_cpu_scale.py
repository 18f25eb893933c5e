"""Tables of the CPU-scale benchmark (benchmarks/cpu_scale.sh) for docs/RESULTS.md.

python benchmarks/summarize_cpu_scale.py runs/cpu-scale
"""

from __future__ import annotations

import statistics as st
import sys
from pathlib import Path

from longtail.core.rundir import RunDir
from longtail.evaluate.results import MethodResult, load_results, mean_std

SEEDS = (0, 1, 2)
ROWS = [  # (label, sweep, stage-2 backbone (RunDir.results_path), method)
    ("joint CE (SGD)", "ce", "final", "joint"),
    ("joint logit-adjusted (SGD)", "la", "auto", "joint"),
    ("NCM (SGD features)", "ce", "final", "ncm"),
    ("cRT (SGD features)", "ce", "final", "crt"),
    ("τ-norm (SGD features)", "ce", "final", "tau"),
    ("LWS (SGD features)", "ce", "final", "lws"),
    ("joint CE (SWA)", "ce", "auto", "joint"),
    ("NCM (SWA features)", "ce", "auto", "ncm"),
    ("cRT (SWA features)", "ce", "auto", "crt"),
    ("τ-norm (SWA features)", "ce", "auto", "tau"),
    ("LWS (SWA features)", "ce", "auto", "lws"),
    ("SRepr CE only (SWA + SWAG)", "ce", "auto", "srepr_ce"),
    ("SRepr", "ce", "auto", "srepr"),
    ("SWAG-BMA", "ce", "auto", "swag_bma"),
]


def rare3(r: MethodResult, counts: list[int]) -> float:
    """Mean test accuracy of the three classes with the fewest training images."""
    order = sorted(range(len(counts)), key=lambda c: counts[c])[:3]
    return st.mean(float(r.test.per_class[c]) for c in order)


def cell(values: list[float], scale: float, digits: int) -> str:
    """'mean ± std' over seeds (:func:`mean_std`) of ``values`` times ``scale``."""
    s = mean_std(x * scale for x in values)
    return f"{s.mean:.{digits}f} ± {s.std or 0.0:.{digits}f}"


def table(root: Path, imbalance: int) -> None:
    print(f"### IF {imbalance}\n")
    print("| method | accuracy % | 3 rarest classes % | NLL | ECE % |")
    print("|---|---|---|---|---|")
    for label, sweep, backbone, method in ROWS:
        rs = []
        for s in SEEDS:
            run = RunDir(root / f"if{imbalance}-{sweep}" / f"seed{s}")
            if run.results_path(backbone).is_file():
                res = load_results(run.path, backbone)
                rs.append((res.methods[method], res.train_counts))
        if len(rs) < len(SEEDS):
            print(f"| {label} | not run yet ({len(rs)} of {len(SEEDS)} seeds) | | | |")
            continue
        print(
            f"| {label} | {cell([r.test.accuracy for r, _ in rs], 100, 2)} | "
            f"{cell([rare3(r, c) for r, c in rs], 100, 2)} | "
            f"{cell([r.test.nll for r, _ in rs], 1, 3)} | "
            f"{cell([r.test.ece for r, _ in rs], 100, 2)} |"
        )
    print()


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-scale")
    for imbalance in (100, 10):
        table(root, imbalance)
