"""Tables of the CPU-scale benchmark (benchmarks/cpu_scale.sh) for docs/RESULTS.md.

python benchmarks/summarize_cpu_scale.py runs/cpu-scale
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

SEEDS = (0, 1, 2)
ROWS = [  # (label, sweep, results file, method)
    ("joint CE (SGD)", "ce", "results-final.json", "joint"),
    ("joint logit-adjusted (SGD)", "la", "results.json", "joint"),
    ("NCM (SGD features)", "ce", "results-final.json", "ncm"),
    ("cRT (SGD features)", "ce", "results-final.json", "crt"),
    ("τ-norm (SGD features)", "ce", "results-final.json", "tau"),
    ("LWS (SGD features)", "ce", "results-final.json", "lws"),
    ("joint CE (SWA)", "ce", "results.json", "joint"),
    ("NCM (SWA features)", "ce", "results.json", "ncm"),
    ("cRT (SWA features)", "ce", "results.json", "crt"),
    ("τ-norm (SWA features)", "ce", "results.json", "tau"),
    ("LWS (SWA features)", "ce", "results.json", "lws"),
    ("SRepr CE only (SWA + SWAG)", "ce", "results.json", "srepr_ce"),
    ("SRepr", "ce", "results.json", "srepr"),
    ("SWAG-BMA", "ce", "results.json", "swag_bma"),
]


def rare3(r: dict, counts: list[int]) -> float:
    """Mean test accuracy of the three classes with the fewest training images."""
    order = sorted(range(len(counts)), key=lambda c: counts[c])[:3]
    return st.mean(float(r["per_class"][c]) for c in order)


def cell(values: list[float], scale: float, digits: int) -> str:
    v = [x * scale for x in values]
    return f"{st.mean(v):.{digits}f} ± {st.stdev(v):.{digits}f}"


def table(root: Path, imbalance: int) -> None:
    print(f"### IF {imbalance}\n")
    print("| method | accuracy % | 3 rarest classes % | NLL | ECE % |")
    print("|---|---|---|---|---|")
    for label, sweep, name, method in ROWS:
        rs = []
        for s in SEEDS:
            p = root / f"if{imbalance}-{sweep}" / f"seed{s}" / name
            if p.is_file():
                res = json.loads(p.read_text())
                rs.append((res["methods"][method], res["train_counts"]))
        if len(rs) < len(SEEDS):
            print(f"| {label} | not run yet ({len(rs)} of {len(SEEDS)} seeds) | | | |")
            continue
        print(
            f"| {label} | {cell([r['accuracy'] for r, _ in rs], 100, 2)} | "
            f"{cell([rare3(r, c) for r, c in rs], 100, 2)} | "
            f"{cell([r['nll'] for r, _ in rs], 1, 3)} | "
            f"{cell([r['ece'] for r, _ in rs], 100, 2)} |"
        )
    print()


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-scale")
    for imbalance in (100, 10):
        table(root, imbalance)
