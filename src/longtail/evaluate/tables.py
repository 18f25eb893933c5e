"""The comparison table of stage-2 results, specified once and rendered three ways.

:data:`COLUMNS` and :data:`TS_COLUMNS` say which metric each column shows, its headers, its
format and which direction is best; :func:`comparison_table` fills a :class:`Table` from one or
several :class:`~longtail.evaluate.results.Results` (mean ± std over several, by
:func:`~longtail.evaluate.results.mean_std`); :func:`render_text`, :func:`render_markdown` and
:func:`render_html` draw any :class:`Table` for the console, ``report.md`` and ``report.html``.
``longtail classify`` prints it (:func:`longtail.classify.run.results_table`, the compact
headers), ``longtail report`` writes it, ``longtail sweep`` prints it and ``longtail fit`` prints
its selection table with the same renderer.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from longtail.evaluate.results import MeanStd, Results, mean_std, method_names

__all__ = [
    "COLUMNS",
    "TS_COLUMNS",
    "Column",
    "Table",
    "comparison_table",
    "render_html",
    "render_markdown",
    "render_text",
]


@dataclass(frozen=True)
class Column:
    """One metric column of the comparison table.

    Attributes:
        key: the metric (:class:`~longtail.evaluate.results.Metrics` or ``Calibration`` field).
        header: the report's header; ``short``: the compact console header of
            ``longtail classify``.
        higher: ``True`` when higher is better, ``False`` lower, ``None``: no best.
        percent: shown times 100.
        sub: ``None`` for the test metrics, ``"ts"`` for those after temperature scaling.
        digits: decimals (default 2 in percent, else 3).
    """

    key: str
    header: str
    short: str
    higher: bool | None
    percent: bool
    sub: str | None = None
    digits: int | None = None

    def cell(self, stat: MeanStd | None, *, missing: str = "–", pm: str = " ± ") -> str:
        """``stat`` formatted: the mean, ``pm`` and the std when there is one; ``missing``
        without a value."""
        if stat is None:
            return missing
        scale = 100.0 if self.percent else 1.0
        d = self.digits if self.digits is not None else (2 if self.percent else 3)
        text = f"{stat.mean * scale:.{d}f}"
        if stat.std is not None:
            text += f"{pm}{stat.std * scale:.{d}f}"
        return text


COLUMNS: tuple[Column, ...] = (
    Column("accuracy", "acc", "acc", True, True),
    Column("many", "many", "many", True, True),
    Column("medium", "medium", "med", True, True),
    Column("few", "few", "few", True, True),
    Column("nll", "NLL", "NLL", False, False),
    Column("ece", "ECE", "ECE", False, True),
    Column("brier", "Brier", "Brier", False, False),
)
# Post-hoc temperature scaling (the ``ts`` entry), shown when any method has it.
TS_COLUMNS: tuple[Column, ...] = (
    Column("temperature", "T", "T", None, False, "ts", 2),
    Column("nll", "NLL (TS)", "NLL(ts)", False, False, "ts"),
    Column("ece", "ECE (TS)", "ECE(ts)", False, True, "ts"),
    Column("brier", "Brier (TS)", "Brier(ts)", False, False, "ts"),
)


@dataclass
class Table:
    """A header, rows of formatted cells (the first one names the row) and which cells are
    the best of their column (``best[i][j]``; all ``False`` when nothing is marked)."""

    header: list[str]
    rows: list[list[str]]
    best: list[list[bool]]

    @classmethod
    def plain(cls, header: list[str], rows: list[list[str]]) -> Table:
        """A table with nothing marked best."""
        return cls(header, rows, [[False] * len(header) for _ in rows])


def comparison_table(
    results: Sequence[Results], *, order: Sequence[str] = (), compact: bool = False
) -> Table:
    """Every method over the results (several: mean ± sample std per cell).

    Args:
        order: method names to put first, in this order (the registry's); others follow in
            order of appearance.
        compact: the console form of ``longtail classify``: short headers, ``-`` for a missing
            value and ``±`` without spaces.

    Accuracies and ECE are in percent; the temperature-scaled columns are added when any method
    has them. Cells are the best of their column when their printed mean is (ties all marked,
    nothing marked in a column where every method ties or with a single value).
    """
    calibrated = any(r.calibrated for r in results)
    columns = [*COLUMNS, *(TS_COLUMNS if calibrated else ())]
    header = ["method"] + [c.short if compact else c.header for c in columns]
    missing, pm = ("-", "±") if compact else ("–", " ± ")
    rows, keys = [], []
    n = len(results)
    for name in method_names(results, order):
        present = [r.methods[name] for r in results if name in r.methods]
        label = name if len(present) == n else f"{name} ({len(present)}/{n} runs)"
        row: list[str] = [label]
        key_row: list[float | None] = [None]
        for c in columns:
            stat = mean_std(m.metric(c.key, c.sub) for m in present)
            cell = c.cell(stat, missing=missing, pm=pm)
            row.append(cell)
            # compare on the printed mean so that printed ties tie
            key_row.append(None if stat is None else float(cell.split(pm)[0]))
        rows.append(row)
        keys.append(key_row)
    best = [[False] * len(header) for _ in rows]
    for j, c in enumerate(columns, start=1):
        vals = [k[j] for k in keys if k[j] is not None]
        if c.higher is None or len(vals) < 2 or min(vals) == max(vals):
            continue  # no best without a comparison (a single value, or all tied)
        target = max(vals) if c.higher else min(vals)
        for i, k in enumerate(keys):
            best[i][j] = k[j] is not None and k[j] == target
    return Table(header, rows, best)


# --------------------------------------------------------------------------- renderers


def render_text(table: Table, *, sep: str = "  ", min_widths: Sequence[int] = ()) -> str:
    """Fixed-width text: the first column left-aligned, the others right-aligned, a rule of
    ``-`` under the header; each column as wide as its widest cell (at least ``min_widths``)."""
    lines = [table.header, *table.rows]
    widths = [
        max([len(r[i]) for r in lines] + list(min_widths[i : i + 1]))
        for i in range(len(table.header))
    ]
    out = [
        sep.join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in lines
    ]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(table: Table) -> list[str]:
    """Markdown table lines: the first column left-aligned, best cells bold."""
    lines = [
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(table.header) - 1)) + "|",
    ]
    for row, b in zip(table.rows, table.best, strict=True):
        cells = [f"**{_md_cell(c)}**" if bb else _md_cell(c) for c, bb in zip(row, b, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_html(
    table: Table,
    *,
    table_id: str,
    caption: str | None = None,
    columns: Sequence[int] | None = None,
) -> list[str]:
    """An HTML table (in a horizontally scrolling ``div``) of the first column and ``columns``
    (default all); row names are ``th``, best cells ``class="best"`` and bold."""
    e = html.escape
    cols = [0, *(columns if columns is not None else range(1, len(table.header)))]
    out = [
        f'<div class="scroll"><table id="{table_id}">'
        + (f"<caption>{e(caption)}</caption>" if caption is not None else "")
        + "<thead><tr>"
        + "".join(f'<th scope="col">{e(table.header[j])}</th>' for j in cols)
        + "</tr></thead><tbody>"
    ]
    for row, b in zip(table.rows, table.best, strict=True):
        cells = []
        for j in cols:
            if j == 0:
                cells.append(f'<th scope="row">{e(row[j])}</th>')
            elif b[j]:
                cells.append(f'<td class="best"><b>{e(row[j])}</b></td>')
            else:
                cells.append(f"<td>{e(row[j])}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out
