"""``longtail sweep RECIPE --seeds 0 1 2``: stage 1 per seed, every stage-2 method, one table.

For each seed the run goes to ``OUT/seed<N>`` (resumed if it was stopped, skipped if done, as
:class:`longtail.rundir.RunDir` decides); stage 2 runs on the SWA features (``results.json``) and,
when the run has SWA, also on the final SGD model's features (``results-final.json``) with the
methods that need no SWAG posterior (:func:`longtail.classify.registry.without_swag`), so both
can be compared. The aggregate (mean ± std over seeds) is printed, written to
``OUT/summary.json`` and rendered as ``OUT/report.html``.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from longtail.classify import registry
from longtail.classify.run import CONFIG_KEY, classify
from longtail.config import load_config
from longtail.evaluate.report import comparison_table, load_run, write_report
from longtail.io import atomic_write_json
from longtail.rundir import RunDir
from longtail.train import Stage1

SUMMARY_KEYS = ("accuracy", "many", "medium", "few", "nll", "ece", "brier")


def run_seed(
    recipe: str, seed: int, out: Path, *, overrides: list[str], vary_subset: bool, log=print
) -> Path:
    """Stage 1 of one seed into ``out/seed<seed>`` (resuming a stopped run); returns the dir."""
    run = out / f"seed{seed}"
    extra = [f"seed={seed}"] + ([f"data.subset_seed={seed}"] if vary_subset else [])
    cfg = load_config(recipe, [*overrides, *extra])
    state = RunDir(run)
    if state.finished:
        log(f"seed {seed}: stage 1 already done in {run}")
        return run
    resume = state.resumable
    log(f"seed {seed}: stage 1 -> {run}" + (" (resuming)" if resume else ""))
    Stage1(cfg, run, resume=resume).fit()
    return run


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width plain-text rendering of a header and rows of cells."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summarize(runs: list[Path], backbone: str = "auto") -> dict[str, dict]:
    """``{method: {metric: mean, metric_std: std, n: runs}}`` over the runs' results files for
    ``backbone`` (``auto``: ``results.json``; see :meth:`RunDir.results_path`)."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        res = RunDir(r).results(backbone)
        for m, vals in res["methods"].items():
            for k in SUMMARY_KEYS:
                if vals.get(k) is not None:
                    per.setdefault(m, {}).setdefault(k, []).append(float(vals[k]))
    out: dict[str, dict] = {}
    for m, d in per.items():
        out[m] = {"n": len(next(iter(d.values())))}
        for k, v in d.items():
            out[m][k] = statistics.fmean(v)
            out[m][f"{k}_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
    return out


def sweep(
    recipe: str,
    seeds: list[int],
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    methods: tuple[str, ...] | None = None,
    vary_subset: bool = False,
    log=print,
) -> dict:
    """Run the whole protocol for every seed and aggregate; returns the summary dict.

    ``methods``: stage-2 method names or ``all``; ``None``: each run's ``stage2.methods``.
    """
    out = Path(out)
    overrides = list(overrides or [])
    runs = []
    for seed in seeds:
        run = run_seed(recipe, seed, out, overrides=overrides, vary_subset=vary_subset, log=log)
        rd = RunDir(run)
        if not rd.results_path().is_file():
            classify(run, methods, log=log)
        if rd.model_path("swa").is_file() and not rd.results_path("final").is_file():
            if methods is None:
                names = registry.resolve(rd.config().stage2.methods, CONFIG_KEY)
            else:
                names = registry.resolve(methods)
            sgd = registry.without_swag(names)
            if sgd:
                classify(run, sgd, ["stage2.backbone=final"], log=log)
        runs.append(run)
    summary = {
        "recipe": recipe,
        "seeds": list(seeds),
        "overrides": overrides,
        "swa_features": summarize(runs),
    }
    loaded = [load_run(r) for r in runs]
    log(f"\nstage 2 on {loaded[0].results['backbone']} features, {len(runs)} seed(s):")
    header, rows, _ = comparison_table(loaded)
    log(text_table(header, rows))
    if all(RunDir(r).results_path("final").is_file() for r in runs):
        summary["sgd_features"] = summarize(runs, "final")
        sgd_runs = [replace(r, results=RunDir(r.dir).results("final")) for r in loaded]
        header, rows, _ = comparison_table(sgd_runs)
        log("\nstage 2 on the final SGD model's features:")
        log(text_table(header, rows))
    atomic_write_json(out / "summary.json", summary)
    html, _ = write_report(runs, out)
    log(f"\nsummary: {out / 'summary.json'}\nreport: {html}")
    return summary
