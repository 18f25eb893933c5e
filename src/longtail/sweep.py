"""``longtail sweep RECIPE --seeds 0 1 2``: stage 1 per seed, every stage-2 method, one table.

For each seed the run goes to ``OUT/seed<N>`` (resumed if it was stopped, skipped if done,
as :class:`longtail.core.rundir.RunDir` decides); stage 2 runs on the SWA features
(``results.json``) and, when the run has SWA, also on the features of its last iterate
(``results-final.json``: the model at the constant SWA learning rate, not a converged SGD model)
with the methods that need no SWAG posterior (:func:`longtail.classify.registry.without_swag`).

**The SGD baseline** is its own run per seed, ``OUT/seed<N>-sgd``: the same recipe with SWA off
and the learning rate annealed to 0 (:data:`SGD_BASELINE`: a cosine schedule, which ends at 0;
a step schedule would stop at ``lr * gamma^k``), then the same stage-2 methods on its final
model. "SWA features vs SGD features" compares ``OUT/seed<N>`` with ``OUT/seed<N>-sgd``.
When the recipe's schedule is already the cosine, the two runs train identically up to
``swa.start`` (same seed, data, lr and random streams), so the baseline branches off the SWA
run's state there (``branch.pt``, ``Stage1(branch_from=)``) and trains only the epochs after it:
at ``swa.start`` = 70 % of the epochs that saves 70 % of the baseline's stage 1. Otherwise
(a step schedule) it trains from the start.

The aggregate (mean ± std over seeds) is printed, written to ``OUT/summary.json``
(``swa_features``, ``last_iterate_features``, ``sgd_baseline``) and rendered as
``OUT/report.html`` (the SWA runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from longtail.classify import registry
from longtail.classify.run import CONFIG_KEY, classify
from longtail.config import load_config
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_json
from longtail.core.rundir import RunDir
from longtail.evaluate.report import write_report
from longtail.evaluate.results import Results, load_results, mean_std, method_names
from longtail.evaluate.tables import Table, comparison_table, render_text
from longtail.train import Stage1

SUMMARY_KEYS = ("accuracy", "many", "medium", "few", "nll", "ece", "brier")
# the SGD baseline: the recipe without SWA, its learning rate annealed to 0
SGD_BASELINE = ("swa.enabled=false", "optim.schedule=cosine")


def run_seed(
    recipe: str,
    seed: int,
    out: Path,
    *,
    overrides: list[str],
    vary_subset: bool,
    baseline: bool = False,
    log=print,
) -> Path:
    """Stage 1 of one seed into ``out/seed<seed>`` (``baseline``: the SGD baseline,
    :data:`SGD_BASELINE`, into ``out/seed<seed>-sgd``), resuming a stopped run; returns the dir."""
    run = out / (f"seed{seed}-sgd" if baseline else f"seed{seed}")
    extra = [f"seed={seed}"] + ([f"data.subset_seed={seed}"] if vary_subset else [])
    cfg = load_config(recipe, [*overrides, *extra, *(SGD_BASELINE if baseline else ())])
    state = RunDir(run)
    if state.finished:
        log(f"seed {seed}: stage 1 already done in {run}")
        return run
    if state.stopped_before_first_checkpoint:
        log(f"seed {seed}: {run} stopped before its first checkpoint: starting it again")
        shutil.rmtree(run)
    resume = state.resumable
    what = "SGD baseline (SWA off, lr annealed to 0)" if baseline else "stage 1"
    log(f"seed {seed}: {what} -> {run}" + (" (resuming)" if resume else ""))
    source = RunDir(out / f"seed{seed}")
    if baseline and not resume and source.branch_path.is_file():
        try:  # the epochs before the SWA run's swa.start are the same: start from its end
            trainer = Stage1(cfg, run, branch_from=source.path)
        except LongtailError as e:
            log(f"seed {seed}: the SGD baseline trains from the start ({e})")
        else:
            log(f"seed {seed}: branching off {source.path} at epoch {trainer.epoch}")
            trainer.fit()
            return run
    Stage1(cfg, run, resume=resume).fit()
    return run


def subset_varies(vary_subset: bool | None, overrides: list[str]) -> bool:
    """Whether each seed draws its own long-tailed subset: ``vary_subset`` if given, else yes
    unless an override fixes ``data.subset_seed``."""
    if vary_subset is not None:
        return vary_subset
    return not any(o.split("=", 1)[0].strip() == "data.subset_seed" for o in overrides)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width plain-text rendering of a header and rows of cells
    (:func:`longtail.evaluate.tables.render_text`)."""
    return render_text(Table.plain(header, rows))


def summarize(runs: list[Path], backbone: str = "auto") -> dict[str, dict]:
    """``{method: {metric: mean, metric_std: std, n: runs}}`` over the runs' results files for
    ``backbone`` (``auto``: ``results.json``; see :meth:`RunDir.results_path`); the std of a
    single run is 0. ``n`` counts the runs with the method's first metric."""
    results = [load_results(r, backbone) for r in runs]
    out: dict[str, dict] = {}
    for m in method_names(results):
        rows = [r.methods[m] for r in results if m in r.methods]
        stats = {k: mean_std(x.metric(k) for x in rows) for k in SUMMARY_KEYS}
        stats = {k: s for k, s in stats.items() if s is not None}
        if not stats:
            continue
        out[m] = {"n": next(iter(stats.values())).n}
        for k, s in stats.items():
            out[m][k] = s.mean
            out[m][f"{k}_std"] = s.std if s.std is not None else 0.0
    return out


def _table(results: list[Results]) -> str:
    return render_text(comparison_table(results, order=registry.available()))


def sweep(
    recipe: str,
    seeds: list[int],
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    methods: tuple[str, ...] | None = None,
    vary_subset: bool | None = None,
    sgd_baseline: bool = True,
    log=print,
) -> dict:
    """Run the whole protocol for every seed and aggregate; returns the summary dict.

    ``methods``: stage-2 method names or ``all``; ``None``: each run's ``stage2.methods``.
    ``vary_subset``: draw the long-tailed subset with each seed too (``data.subset_seed`` =
    the seed), so the ± covers which images the tail got, not only the model's initialisation;
    ``None`` (default): yes, unless ``overrides`` fix ``data.subset_seed``.
    ``sgd_baseline``: also train the SGD baseline per seed (module doc) when the recipe has SWA.
    """
    out = Path(out)
    overrides = list(overrides or [])
    vary_subset = subset_varies(vary_subset, overrides)
    runs, baselines = [], []
    for seed in seeds:
        run = run_seed(recipe, seed, out, overrides=overrides, vary_subset=vary_subset, log=log)
        rd = RunDir(run)
        if not rd.results_path().is_file():
            classify(run, methods, log=log)
        if methods is None:
            names = registry.resolve(rd.config().stage2.methods, CONFIG_KEY)
        else:
            names = registry.resolve(methods)
        no_swag = registry.without_swag(names)
        has_swa = rd.model_path("swa").is_file()
        if has_swa and no_swag and not rd.results_path("final").is_file():
            classify(run, no_swag, ["stage2.backbone=final"], log=log)
        if has_swa and sgd_baseline and no_swag:
            base = run_seed(
                recipe,
                seed,
                out,
                overrides=overrides,
                vary_subset=vary_subset,
                baseline=True,
                log=log,
            )
            if not RunDir(base).results_path().is_file():
                classify(base, no_swag, log=log)
            baselines.append(base)
        runs.append(run)
    summary = {
        "recipe": recipe,
        "seeds": list(seeds),
        "overrides": overrides,
        "swa_features": summarize(runs),
    }
    loaded = [load_results(r) for r in runs]
    log(f"\nstage 2 on {loaded[0].backbone} features, {len(runs)} seed(s):")
    log(_table(loaded))
    if all(RunDir(r).results_path("final").is_file() for r in runs):
        summary["last_iterate_features"] = summarize(runs, "final")
        log(
            "\nstage 2 on the last iterate's features (the SWA run's model at the constant SWA lr):"
        )
        log(_table([load_results(r, "final") for r in runs]))
    if baselines and len(baselines) == len(runs):
        summary["sgd_baseline"] = summarize(baselines)
        log("\nstage 2 on the SGD baseline's features (own run: SWA off, lr annealed to 0):")
        log(_table([load_results(r) for r in baselines]))
    atomic_write_json(out / "summary.json", summary)
    html, _ = write_report(runs, out)
    log(f"\nsummary: {out / 'summary.json'}\nreport: {html}")
    return summary
