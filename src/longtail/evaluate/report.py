"""``longtail report RUN_DIR [RUN_DIR ...]``: one HTML and one Markdown report of stage-2 results.

Reads each run directory's ``results.json`` (written by ``longtail classify``), ``metrics.csv``,
``run.json`` and ``config.yaml`` (written by ``longtail train``;
:class:`longtail.core.rundir.RunDir` names them) and writes into the output folder

- ``report.html``: self-contained, every figure embedded as a base64 ``data:image/png`` URI, no
  script;
- ``report.md`` with its figures as PNG files in ``report_figures/`` beside it.

Several run directories (e.g. the same recipe at several seeds) are summarised as mean ± std
(sample standard deviation, ``ddof=1``) per method and metric; their figures show means (per-class
accuracy, weight norms), pooled bins (reliability diagrams) or every run (stage-1 curves). The best
value of each column is bold: highest for accuracies, lowest for NLL, ECE and Brier; values equal
at the printed precision tie.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from longtail.classify import registry
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_text
from longtail.core.rundir import RunDir
from longtail.evaluate import plots, tables
from longtail.evaluate.results import MethodResult, Results, load_results, mean_std, method_names

__all__ = ["RunData", "comparison_table", "load_run", "write_report"]

FIGURE_DIR = "report_figures"


@dataclass
class RunData:
    """What the report reads from one run directory (``results`` may be given as a
    ``results.json`` dict: it is read by the schema, :meth:`Results.from_json`)."""

    dir: Path
    results: Results
    metrics: dict[str, list[float]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.results, dict):  # a results.json dict: read by the schema
            self.results = Results.from_json(self.results, self.dir)

    @property
    def label(self) -> str:
        """A short name for the run: its folder name."""
        return self.dir.name or str(self.dir)


# --------------------------------------------------------------------------- loading


def _read_metrics(path: Path) -> dict[str, list[float]]:
    """``metrics.csv`` as ``{column: [value per row]}``; empty cells and non-numbers are NaN."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            if k is None:
                continue
            try:
                x = float(v) if v not in (None, "") else math.nan
            except ValueError:
                x = math.nan
            cols.setdefault(k, []).append(x)
    return cols


def load_run(run_dir: str | Path) -> RunData:
    """Read the files of one run directory that the report needs.

    Raises:
        LongtailError: the directory does not exist, or has no (readable) ``results.json``.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise LongtailError(f"{str(run_dir)!r} is not a directory: give a run directory")
    if not run.results_path().is_file():
        raise LongtailError(
            f"{str(run_dir)!r} has no {run.RESULTS}: run `longtail classify {run_dir}` first "
            "(stage 2 writes the results the report is made of)"
        )
    results = load_results(run.path)
    info, config = {}, {}
    if run.info_path.is_file():
        try:
            info = run.info()
        except LongtailError:  # not readable JSON: the report just goes without it
            info = {}
    if run.config_path.is_file():
        # the YAML as written, not load_config's: the report shows it and must not fail on it
        try:
            config = yaml.safe_load(run.config_path.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    return RunData(run.path, results, _read_metrics(run.metrics_path), info, config)


# --------------------------------------------------------------------------- aggregation


def _method_names(runs: Sequence[RunData]) -> list[str]:
    """Every method of the runs: registered ones in registry order, then any others (e.g. of a
    plugin not loaded here) in order of appearance."""
    return method_names([r.results for r in runs], registry.available())


def _colors(names: Sequence[str]) -> dict[str, str]:
    """Each registered method's colour (the registry's ``color``)."""
    found = {m: registry.find(m) for m in names}
    return {m: e.color for m, e in found.items() if e is not None and e.color}


_ECE = next(c for c in tables.COLUMNS if c.key == "ece")


def _rows(runs: Sequence[RunData], method: str) -> list[MethodResult]:
    """``method``'s rows of the runs that have it."""
    return [r.results.methods[method] for r in runs if method in r.results.methods]


def comparison_table(
    runs: Sequence[RunData],
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The comparison table of every method over the runs (:func:`tables.comparison_table`
    in registry order).

    Returns:
        ``(header, rows, best)``: ``rows[i]`` is the method name then one formatted cell per
        column (accuracies and ECE in percent, ``mean ± std`` with several runs); ``best[i][j]``
        says whether cell ``j`` of row ``i`` is the best of its column (ties at the printed
        precision all marked; nothing is marked in a column where every method ties).
    """
    t = tables.comparison_table([r.results for r in runs], order=registry.available())
    return t.header, t.rows, t.best


def _mean_lists(lists: list[list[float | None]]) -> list[float]:
    """Element-wise mean ignoring ``None`` (NaN where every run is missing)."""
    a = np.array([[np.nan if v is None else float(v) for v in x] for x in lists], dtype=float)
    out = np.full(a.shape[1], np.nan)
    ok = ~np.isnan(a).all(axis=0)
    out[ok] = np.nanmean(a[:, ok], axis=0)
    return out.tolist()


def _pooled_bins(entries: list[dict]) -> dict[str, list[float]]:
    """Reliability bins of several runs pooled: counts summed, accuracy / confidence weighted."""
    count = np.zeros(len(entries[0]["count"]))
    acc_sum, conf_sum = np.zeros_like(count), np.zeros_like(count)
    for e in entries:
        n = np.array([0 if v is None else v for v in e["count"]], dtype=float)
        a = np.array([0.0 if v is None else v for v in e["accuracy"]], dtype=float)
        c = np.array([0.0 if v is None else v for v in e["confidence"]], dtype=float)
        count += n
        acc_sum += a * n
        conf_sum += c * n
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / count, np.nan)
        conf = np.where(count > 0, conf_sum / count, np.nan)
    return {"count": count.tolist(), "accuracy": acc.tolist(), "confidence": conf.tolist()}


# --------------------------------------------------------------------------- figures


@dataclass
class _Figure:
    key: str
    title: str
    caption: str
    path: Path | None = None  # None: not drawn, ``caption`` says why


def _shot_thresholds(run: RunData) -> tuple[int, int]:
    data = run.config.get("data") or {}
    return int(data.get("many_shot", 100)), int(data.get("few_shot", 20))


def _figures(runs: Sequence[RunData], fig_dir: Path) -> list[_Figure]:
    first = runs[0]
    counts = np.asarray(first.results.train_counts)
    classes = first.results.classes
    names = _method_names(runs)
    colors = _colors(names)
    many, few = _shot_thresholds(first)
    dataset = (first.info.get("data") or {}).get("dataset", "")
    figs: list[_Figure] = []

    f = _Figure("class_counts", "Training set: images per class", "")
    f.path = plots.class_count_histogram(
        counts,
        fig_dir / "class_counts.png",
        classes=classes,
        title=f"{dataset + ': ' if dataset else ''}{len(counts)} classes, {int(counts.sum()):,} "
        f"training images (max / min {counts.max() / max(counts.min(), 1):.3g})",
        many=many,
        few=few,
    )
    f.caption = (
        f"Log scale; dashed: many-shot threshold (> {many} images), dotted: few-shot (< {few})."
    )
    figs.append(f)

    per_class = {}
    for m in names:
        lists = [x.test.per_class for x in _rows(runs, m) if x.test.per_class]
        if lists:
            per_class[m] = _mean_lists(lists)
    f = _Figure("per_class", "Per-class test accuracy against training count", "")
    if per_class:
        path = fig_dir / "per_class_accuracy.png"
        f.path = plots.per_class_accuracy_plot(counts, per_class, path, colors=colors)
        f.caption = "One line per method; x log scale" + (
            f"; mean over {len(runs)} runs." if len(runs) > 1 else "."
        )
    else:
        f.caption = "No per-class accuracies in results.json."
    figs.append(f)

    norms = {}
    # Kang et al.'s weight-norm figure: the linear classifiers worth comparing (the registry's
    # plot_weight_norms)
    for m in [m for m in names if (e := registry.find(m)) is not None and e.plot_weight_norms]:
        lists = [x.weight_norm for x in _rows(runs, m) if x.weight_norm]
        if lists:
            norms[m] = _mean_lists(lists)
    f = _Figure("weight_norm", "Classifier weight norm per class (Kang et al.)", "")
    if norms:
        f.path = plots.weight_norm_plot(counts, norms, fig_dir / "weight_norms.png", colors=colors)
        f.caption = (
            "L2 norm of each class's (effective) weight vector, classes sorted from the most to "
            "the fewest training images. Joint training's norms follow class size; re-balanced "
            "classifiers flatten them. τ-norm's are ‖w‖^(1−τ)."
        )
    else:
        f.caption = "No linear classifier weights in results.json."
    figs.append(f)

    bins, titles = {}, {}
    for m in names:
        entries = [x.reliability for x in _rows(runs, m) if x.reliability]
        if entries:
            bins[m] = entries[0] if len(entries) == 1 else _pooled_bins(entries)
            ece = mean_std(x.metric("ece") for x in _rows(runs, m))
            titles[m] = f"{m}: ECE {_ECE.cell(ece)}%"
    f = _Figure("reliability", "Reliability diagrams (test set, 15 bins)", "")
    if bins:
        f.path = plots.reliability_diagrams(bins, fig_dir / "reliability.png", titles)
        f.caption = (
            "Blue bars: accuracy per confidence bin; dark red tick: the bin's mean confidence, "
            "the gap hatched in red (above the bar: over-confident, inside it: "
            "under-confident); grey: share of test examples per bin; dashed: perfect "
            "calibration. Raw softmax, before temperature scaling."
            + (f" Bins pooled over {len(runs)} runs." if len(runs) > 1 else "")
        )
    else:
        f.caption = (
            "results.json has no reliability bins (written by an older `longtail classify`); "
            "rerun `longtail classify RUN_DIR` to get them."
        )
    figs.append(f)

    curves = [(r.label, r.metrics) for r in runs if r.metrics.get("epoch")]
    f = _Figure("curves", "Stage 1: training curves", "")
    if curves:
        starts = [r.info.get("swa_start_epoch") for r in runs if r.metrics.get("epoch")]
        f.path = plots.training_curves(curves, fig_dir / "stage1_curves.png", starts)
        f.caption = (
            "Per epoch from metrics.csv; solid: training, dashed: validation. The dotted vertical "
            "line marks the start of SWA (its first epoch begins there)."
            if any(s is not None for s in starts)
            else "Per epoch from metrics.csv; solid: training, dashed: validation. No SWA."
        )
    else:
        f.caption = "No metrics.csv in the run directory."
    figs.append(f)
    return figs


# --------------------------------------------------------------------------- text


def _choices(runs: Sequence[RunData]) -> list[str]:
    """One line per method that reports what it chose on the validation split (the registry's
    ``describe``, given each run's ``info``; the first run decides whether there is a line)."""
    out = []
    for name in _method_names(runs):
        method = registry.find(name)
        if method is None or method.describe is None:
            continue
        if name not in runs[0].results.methods:
            continue
        infos = [r.results.methods[name].info if name in r.results.methods else {} for r in runs]
        text = method.describe(infos)
        if text:
            out.append(f"{method.label}: {text}")
    return out


def _summary(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    first = runs[0]
    data = first.info.get("data") or {}
    counts = first.results.train_counts
    many, few = _shot_thresholds(first)
    c = np.asarray(counts)
    items = [
        ("runs", ", ".join(str(r.dir) for r in runs)),
        (
            "dataset",
            f"{data.get('dataset', '?')} (imbalance factor {_num(data.get('imbalance'))}, "
            f"profile {data.get('profile', '?')})",
        ),
        ("model", str((first.config.get("model") or {}).get("name", "?"))),
        ("stage-2 backbone", first.results.backbone),
        (
            "classes",
            f"{len(counts)}: many-shot (> {many}) {int((c > many).sum())}, medium "
            f"{int(((c >= few) & (c <= many)).sum())}, few-shot (< {few}) "
            f"{int((c < few).sum())}",
        ),
        ("training images", f"{int(c.sum()):,}"),
    ]
    if len(runs) > 1:
        items.append(("aggregation", f"mean ± sample std over {len(runs)} runs"))
    return items


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else "?"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(
    title: str, summary, table: tables.Table, choices, figs: list[_Figure], md_dir: Path
) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {_md_cell(v)}" for k, v in summary]
    lines += ["", "## Comparison of classifier-learning methods (test set)", ""]
    lines += [
        "Accuracies and ECE in percent, NLL in nats, Brier in its multi-class sum form (0..2). "
        "Bold: best of the column (higher accuracy, lower NLL / ECE / Brier)."
        + (
            " TS: after temperature scaling fitted on the validation split."
            if "T" in table.header
            else ""
        ),
        "",
        *tables.render_markdown(table),
    ]
    if choices:
        lines += ["", "Chosen on the validation split:", ""] + [f"- {c}" for c in choices]
    for f in figs:
        lines += ["", f"## {f.title}", ""]
        if f.path is not None:
            rel = f.path.relative_to(md_dir).as_posix()
            lines += [f"![{f.title}]({rel})", ""]
        lines.append(f.caption)
    return "\n".join(lines) + "\n"


_CSS = """
.scroll{overflow-x:auto;margin:.6em 0}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.92em;font-variant-numeric:tabular-nums}
th,td{padding:.3em .7em;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
td.best{background:#eaf4ea}img{max-width:100%;height:auto}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}dl{display:grid;
grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
.note{font-size:.9em;color:#555}
"""


def _html_tables(table: tables.Table) -> list[str]:
    """The comparison as HTML tables narrow enough for the page.

    With temperature scaling the columns are split in two tables that share the method
    column: raw (``id="comparison"``), then temperature-scaled (``id="comparison-ts"``).
    """
    header = table.header
    split = header.index("T") if "T" in header else len(header)
    if split == len(header):
        return tables.render_html(table, table_id="comparison")
    ts = "After temperature scaling (T fitted on the validation split)"
    return [
        *tables.render_html(table, table_id="comparison", caption="Raw", columns=range(1, split)),
        *tables.render_html(
            table, table_id="comparison-ts", caption=ts, columns=range(split, len(header))
        ),
    ]


def _html(title: str, summary, table: tables.Table, choices, figs: list[_Figure]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in summary) + "</dl>",
        "<h2>Comparison of classifier-learning methods (test set)</h2>",
        '<p class="note">Accuracies and ECE in percent, NLL in nats, Brier in its multi-class sum '
        "form (0..2). <b>Bold</b>: best of the column (higher accuracy, lower NLL / ECE / Brier)."
        + (
            " TS: after temperature scaling fitted on the validation split."
            if "T" in table.header
            else ""
        )
        + "</p>",
    ]
    out += _html_tables(table)
    if choices:
        out.append(
            '<p class="note">Chosen on the validation split:</p><ul>'
            + "".join(f"<li>{e(c)}</li>" for c in choices)
            + "</ul>"
        )
    for f in figs:
        out.append(f'<h2 id="{f.key}">{e(f.title)}</h2><figure>')
        if f.path is not None:
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            out.append(f'<img src="data:image/png;base64,{data}" alt="{e(f.title)}">')
        out.append(f"<figcaption>{e(f.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- entry point


def write_report(
    run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for one or several run directories.

    Args:
        run_dirs: run directories that ``longtail classify`` has finished (each holds
            ``results.json``); several are summarised as mean ± std per method and metric.
        out_dir: where to write; default the first run directory. ``report.md``'s figures go to
            ``out_dir/report_figures/``; ``report.html`` embeds them and needs nothing else.

    Returns:
        ``(html_path, md_path)``.

    Raises:
        LongtailError: no run directory, a run directory without ``results.json`` (run
            ``longtail classify`` first), or runs with different numbers of classes.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise LongtailError("report needs at least one RUN_DIR")
    runs = [load_run(d) for d in run_dirs]
    n_classes = {len(r.results.train_counts) for r in runs}
    if len(n_classes) > 1:
        raise LongtailError(
            "the run directories have different numbers of classes "
            f"({', '.join(str(len(r.results.train_counts)) for r in runs)}): "
            "report runs of the same dataset together"
        )
    out = Path(out_dir) if out_dir is not None else runs[0].dir
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / FIGURE_DIR

    data = runs[0].info.get("data") or {}
    title = "longtail report" + (
        f": {data['dataset']}-LT, imbalance factor {_num(data.get('imbalance'))}"
        if data.get("dataset")
        else ""
    )
    table = tables.comparison_table([r.results for r in runs], order=registry.available())
    figs = _figures(runs, fig_dir)
    summary = _summary(runs)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    summary.append(("written", stamp))
    choices = _choices(runs)

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, _markdown(title, summary, table, choices, figs, out))
    atomic_write_text(html_path, _html(title, summary, table, choices, figs))
    return html_path, md_path
