"""The papers' claims on a finished ``longtail sweep`` folder, as paired per-seed differences.

    python benchmarks/sweep_claims.py SWEEP_DIR [--rare 3] [--table]

For each seed the difference is taken within the seed (same subset, same stage 1), then
averaged: mean ± sample std over seeds, and every seed's value. Printed:

- SWA features vs the SGD baseline's (``seed<N>`` vs ``seed<N>-sgd``), per stage-2 method,
  accuracy (points) and NLL;
- every re-trained or re-scored head vs the joint classifier on the same features: accuracy,
  medium-shot accuracy and the mean accuracy of the ``--rare`` classes with the fewest
  training images (points);
- SRepr vs cRT (accuracy, NLL, ECE) and SRepr vs its CE-only ablation.

``--table`` prints instead the markdown table of docs/RESULTS.md: the SGD baseline's joint
classifier, then every method on the SWA features, mean ± std over seeds of each metric, raw
and after the validation temperature (TS).

It reads only ``results.json`` files (:func:`longtail.evaluate.results.load_results`); it trains
nothing. docs/RESULTS.md quotes its output for issue 18's tables.
"""

from __future__ import annotations

import argparse
import re
import statistics as st
from pathlib import Path

from longtail.evaluate.results import Results, load_results


def seeds_of(root: Path) -> list[int]:
    """The seeds with a finished stage 2 in ``root`` (``seed<N>/results.json``), sorted."""
    return sorted(
        int(p.name[4:])
        for p in root.glob("seed*")
        if re.fullmatch(r"seed\d+", p.name) and (p / "results.json").is_file()
    )


def rare_mean(res: Results, method: str, k: int) -> float:
    """Mean test accuracy (%) of the ``k`` classes with the fewest training images."""
    order = sorted(range(len(res.train_counts)), key=lambda c: res.train_counts[c])[:k]
    per_class = res.methods[method].test.per_class
    return 100 * sum(per_class[c] for c in order) / k


def line(label: str, values: list[float], fmt: str = "+.2f") -> str:
    """``label  mean ± std  (per seed ...)`` for paired differences over seeds."""
    sd = st.stdev(values) if len(values) > 1 else 0.0
    each = " ".join(format(v, fmt) for v in values)
    return f"{label:48s} {st.fmean(values):{fmt}} ± {sd:.2f}   per seed {each}"


COLUMNS = (  # (header, metric, Metrics source, scale)
    ("accuracy %", "accuracy", None, 100),
    ("many %", "many", None, 100),
    ("medium %", "medium", None, 100),
    ("few %", "few", None, 100),
    ("NLL", "nll", None, 1),
    ("ECE %", "ece", None, 100),
    ("Brier", "brier", None, 1),
    ("NLL (TS)", "nll", "ts", 1),
    ("ECE % (TS)", "ece", "ts", 100),
    ("Brier (TS)", "brier", "ts", 1),
)


def cell(values: list[float | None], scale: float) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (2 decimals for %, 3 otherwise); ``-``
    when a seed lacks the metric."""
    if any(v is None for v in values):
        return "-"
    v = [scale * x for x in values]
    digits = 2 if scale == 100 else 3
    sd = st.stdev(v) if len(v) > 1 else 0.0
    return f"{st.fmean(v):.{digits}f} ± {sd:.{digits}f}"


def table(swa: list[Results], sgd: list[Results], rare: int) -> str:
    """The markdown table (``--table``): one row per method, mean ± std over the seeds."""
    head = [
        "method",
        *(c[0] for c in COLUMNS[:4]),
        f"{rare} rarest %",
        *(c[0] for c in COLUMNS[4:]),
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("joint, SGD baseline (own run, lr annealed to 0)", sgd, "joint")] if sgd else []
    rows += [
        (f"{m}, SWA features" if m != "joint" else "joint (SWA)", swa, m) for m in swa[0].methods
    ]
    for label, runs, m in rows:
        cells = [cell([r.methods[m].metric(k, src) for r in runs], sc) for _, k, src, sc in COLUMNS]
        rare_cell = cell([rare_mean(r, m, rare) / 100 for r in runs], 100)
        out.append("| " + " | ".join([label, *cells[:4], rare_cell, *cells[4:]]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--rare", type=int, default=3, help="how many of the rarest classes")
    ap.add_argument("--table", action="store_true", help="the markdown table instead")
    args = ap.parse_args()
    seeds = seeds_of(args.sweep)
    swa = [load_results(args.sweep / f"seed{s}") for s in seeds]
    sgd = [
        load_results(args.sweep / f"seed{s}-sgd")
        for s in seeds
        if (args.sweep / f"seed{s}-sgd" / "results.json").is_file()
    ]
    if args.table:
        print(table(swa, sgd if len(sgd) == len(swa) else [], args.rare))
        return
    print(f"{args.sweep}: seeds {seeds}")

    def acc(r: Results, m: str, key: str = "accuracy") -> float:
        return 100 * r.methods[m].metric(key)

    def nll(a: Results, b: Results, m: str, n: str | None = None) -> float:
        return a.methods[m].metric("nll") - b.methods[n or m].metric("nll")

    if len(sgd) == len(swa):
        print("\nSWA features - SGD baseline features (same method), accuracy points / NLL:")
        for m in [m for m in swa[0].methods if m in sgd[0].methods]:
            pairs = list(zip(swa, sgd, strict=True))
            print(line(f"{m}, accuracy", [acc(a, m) - acc(b, m) for a, b in pairs]))
            print(line(f"{m}, NLL", [nll(a, b, m) for a, b in pairs], "+.3f"))
    print(f"\nmethod - joint on the SWA features (points; rare = the {args.rare} rarest classes):")
    for m in [m for m in swa[0].methods if m != "joint"]:
        print(line(f"{m}, accuracy", [acc(r, m) - acc(r, "joint") for r in swa]))
        if swa[0].methods[m].metric("medium") is not None:
            medium = [acc(r, m, "medium") - acc(r, "joint", "medium") for r in swa]
            print(line(f"{m}, medium-shot", medium))
        rare = [rare_mean(r, m, args.rare) - rare_mean(r, "joint", args.rare) for r in swa]
        print(line(f"{m}, rare", rare))
    if {"srepr", "crt"} <= set(swa[0].methods):
        print("\nSRepr - cRT:")
        print(line("accuracy (points)", [acc(r, "srepr") - acc(r, "crt") for r in swa]))
        print(line("NLL", [nll(r, r, "srepr", "crt") for r in swa], "+.3f"))
        ece = [acc(r, "srepr", "ece") - acc(r, "crt", "ece") for r in swa]
        print(line("ECE (points)", ece))
    if {"srepr", "srepr_ce"} <= set(swa[0].methods):
        print(
            line(
                "SRepr - SRepr CE-only, accuracy",
                [acc(r, "srepr") - acc(r, "srepr_ce") for r in swa],
            )
        )


if __name__ == "__main__":
    main()
