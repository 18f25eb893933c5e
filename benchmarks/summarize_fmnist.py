"""Markdown tables from the runs of benchmarks/fmnist_stage1.sh.

python benchmarks/summarize_fmnist.py runs/bench-fmnist [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics as st
from pathlib import Path

from longtail.core.rundir import RunDir
from longtail.evaluate.results import Results, load_results, mean_std

SEEDS = (0, 1, 2)


def ms(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """'mean ± std' (sample std over seeds, :func:`mean_std`) of ``values`` times ``scale``;
    '-' when undefined."""
    if any(x is None for x in values):
        return "-"
    s = mean_std(float(x) * scale for x in values)
    if s is None:
        return "-"
    return f"{s.mean:.{digits}f} ± {s.std or 0.0:.{digits}f}"


def rarest(per_class: list[float | None], counts: list[int], k: int = 3) -> float:
    """Mean test accuracy of the ``k`` classes with the fewest training images."""
    order = sorted(range(len(counts)), key=lambda c: counts[c])[:k]
    return st.mean(float(per_class[c]) for c in order)


def stage1_tables(root: Path) -> None:
    runs = {p: [RunDir(root / f"{p}-s{s}").stage1() for s in SEEDS] for p in ("bf16", "fp32")}
    print("### bf16 vs fp32 (final SGD model, test set)\n")
    print("| precision | seeds | accuracy % | NLL | ECE % |")
    print("|---|---|---|---|---|")
    for p, rs in runs.items():
        print(
            f"| {p} | {len(rs)} | {ms([r['final']['accuracy'] for r in rs])} | "
            f"{ms([r['final']['nll'] for r in rs], 1, 3)} | "
            f"{ms([r['final']['ece'] for r in rs])} |"
        )
    diff = [
        a["final"]["accuracy"] - b["final"]["accuracy"] for a, b in zip(*runs.values(), strict=True)
    ]
    print(
        f"\nbf16 − fp32 accuracy per seed: {', '.join(f'{100 * d:+.2f}' for d in diff)}; "
        f"mean {100 * st.mean(diff):+.2f} points"
    )
    pairs = zip(*runs.values(), strict=True)
    diff = [a["swa"]["accuracy"] - b["swa"]["accuracy"] for a, b in pairs]
    print(
        f"\nsame for the SWA models: {', '.join(f'{100 * d:+.2f}' for d in diff)}; "
        f"mean {100 * st.mean(diff):+.2f} points\n"
    )
    print("### SWA vs the final SGD model of the same run (test set)\n")
    counts = RunDir(root / "bf16-s0").info()["data"]["train_counts"]
    print("| precision | model | accuracy % | 3 rarest classes % | NLL | ECE % |")
    print("|---|---|---|---|---|---|")
    for p, rs in runs.items():
        for r in rs:
            for m in ("final", "swa"):
                r[m]["rare3"] = rarest(r[m]["per_class"], counts)
        for m in ("final", "swa"):
            print(
                f"| {p} | {m} | {ms([r[m]['accuracy'] for r in rs])} | "
                f"{ms([r[m]['rare3'] for r in rs])} | {ms([r[m]['nll'] for r in rs], 1, 3)}"
                f" | {ms([r[m]['ece'] for r in rs])} |"
            )
        da = [r["swa"]["accuracy"] - r["final"]["accuracy"] for r in rs]
        dn = [r["swa"]["nll"] - r["final"]["nll"] for r in rs]
        print(f"| {p} | SWA − final | {ms(da)} | | {ms(dn, 1, 3)} | |")
    print()


def stage2_tables(root: Path, prefix: str = "bf16") -> None:
    res: list[Results] = [load_results(root / f"{prefix}-s{s}") for s in SEEDS]
    names = list(res[0].methods)
    print(f"### Stage 2 on the {prefix} runs ({res[0].backbone} backbone), test set\n")
    print(
        "| method | accuracy % | many % | medium % | 3 rarest % | NLL | ECE % | Brier | "
        "NLL (TS) | ECE % (TS) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        rs = [r.methods[n] for r in res]

        def col(k, scale=100.0, digits=2, rs=rs):
            return ms([getattr(x.test, k) for x in rs], scale, digits)

        rare = [rarest(x.test.per_class, r.train_counts) for x, r in zip(rs, res, strict=True)]

        ts = [x.ts for x in rs]
        print(
            f"| {n} | {col('accuracy')} | {col('many')} | {col('medium')} | {ms(rare)} | "
            f"{col('nll', 1, 3)} | {col('ece')} | {col('brier', 1, 3)} | "
            f"{ms([t.nll for t in ts], 1, 3)} | {ms([t.ece for t in ts])} |"
        )
    alphas = [r.methods["srepr"].info["alpha"] for r in res if "srepr" in r.methods]
    taus = [r.methods["tau"].info["tau"] for r in res if "tau" in r.methods]
    print(f"\nchosen on validation: tau {taus}, srepr alpha {alphas}\n")
    print("### Stage-2 wall time (seconds) per seed\n")
    keys = ["extract_train", "ncm", "crt", "tau", "lws", "srepr"]
    print("| seed | " + " | ".join(keys) + " | (2M+2) x extract_train |")
    print("|---" * (len(keys) + 2) + "|")
    for s, r in zip(SEEDS, res, strict=True):
        t = r.timings
        m = r.methods["srepr"].info["samples"] if "srepr" in r.methods else 0
        bound = (2 * m + 2) * t.get("extract_train", float("nan"))
        print(
            f"| {s} | "
            + " | ".join(f"{t.get(k, float('nan')):.2f}" for k in keys)
            + f" | {bound:.2f} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default="runs/bench-fmnist", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    a = ap.parse_args()
    SEEDS, root = tuple(a.seeds), a.root
    stage1_tables(root)
    stage2_tables(root)
