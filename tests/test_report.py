"""``longtail report``: HTML / Markdown reports of classified runs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.cli import main
from longtail.core.errors import LongtailError
from longtail.evaluate import plots
from longtail.evaluate.report import FIGURE_DIR, write_report

N_FIGURES = 5  # counts, per-class accuracy, weight norms, reliability, stage-1 curves

DIGITS_FAST = [
    "optim.epochs=4",
    "swa.start=2",
    "swa.anneal_epochs=1",
    "swa.every_steps=2",
    "swa.swag_rank=4",
    "precision=fp32",
    "stage2.srepr_samples=2",
    "stage2.epochs=3",
    "stage2.srepr_epochs=3",
    "stage2.lws_epochs=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real digits-LT run: stage 1 (4 epochs, SWA/SWAG) and every stage-2 method."""
    from longtail.classify.run import classify
    from longtail.config import load_config
    from longtail.train.loop import Stage1

    d = tmp_path_factory.mktemp("digits") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and fair to other processes
    try:
        Stage1(load_config("digits_lt", DIGITS_FAST), d).fit()
        classify(d, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.fixture(scope="module")
def report(run_dir) -> tuple[Path, Path]:
    return write_report([run_dir])


class _Page(HTMLParser):
    """Collects ``<img>`` sources and the comparison table's cells (text, bold).

    The comparison is one table (``id="comparison"``) or, with temperature scaling, two that
    share the method column (``comparison`` then ``comparison-ts``); ``rows`` joins them
    back into one row per method, the method column once.
    """

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.rows: list[list[tuple[str, bool]]] = []
        self.tables: list[str] = []
        self._cell: list[str] | None = None
        self._bold = False
        self._in_table = False
        self._row = self._col = -1

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "table" and a.get("id") in ("comparison", "comparison-ts"):
            self._in_table, self._row = True, -1
            self.tables.append(a["id"])
        elif self._in_table and tag == "tr":
            self._row, self._col = self._row + 1, -1
            if len(self.tables) == 1:
                self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell, self._bold, self._col = [], False, self._col + 1
        elif self._cell is not None and tag == "b":
            self._bold = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif self._in_table and tag in ("td", "th") and self._cell is not None:
            if len(self.tables) == 1 or self._col > 0:  # later tables repeat the method column
                self.rows[self._row].append(("".join(self._cell).strip(), self._bold))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_path: Path) -> _Page:
    page = _Page()
    page.feed(html_path.read_text(encoding="utf-8"))
    page.close()
    return page


def _results(run_dir: Path) -> dict:
    def no_nan(x):
        raise AssertionError(f"non-strict JSON constant {x}")

    return json.loads((run_dir / "results.json").read_text(), parse_constant=no_nan)


def test_results_json_holds_reliability_bins(run_dir):
    res = _results(run_dir)
    n_test = None
    for name, m in res["methods"].items():
        rb = m["reliability"]
        assert set(rb) == {"count", "accuracy", "confidence"}
        assert all(len(v) == 15 for v in rb.values())
        n = sum(rb["count"])
        n_test = n_test or n
        assert n == n_test, name
        # the bins reproduce the stored ECE
        ece = sum(
            abs(a - c) * k
            for a, c, k in zip(rb["accuracy"], rb["confidence"], rb["count"], strict=True)
            if k
        )
        assert ece / n == pytest.approx(m["ece"], abs=1e-9), name
        assert all(
            (a is None) == (k == 0) for a, k in zip(rb["accuracy"], rb["count"], strict=True)
        )


def test_html_embeds_one_decodable_png_per_figure(report):
    html_path, _ = report
    assert html_path.name == "report.html"
    page = _parse(html_path)
    assert len(page.imgs) == N_FIGURES
    for src in page.imgs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix) :], validate=True)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
            assert im.size[0] > 0 and im.size[1] > 0
            im.verify()
    text = html_path.read_text()
    assert "<script" not in text and 'src="http' not in text  # self-contained


def test_table_lists_every_method_and_marks_the_best(run_dir, report):
    page = _parse(report[0])
    assert page.tables == ["comparison", "comparison-ts"]  # raw and TS split to fit the page
    header = [c for c, _ in page.rows[0]]
    assert header[:8] == ["method", "acc", "many", "medium", "few", "NLL", "ECE", "Brier"]
    assert "NLL (TS)" in header and "ECE (TS)" in header  # temperature scaling present
    body = {r[0][0]: r for r in page.rows[1:]}
    methods = _results(run_dir)["methods"]
    assert set(body) == set(methods)
    acc = {m: round(100 * r["accuracy"], 2) for m, r in methods.items()}
    best = max(acc.values())
    for name, row in body.items():
        cell, bold = row[1]
        assert float(cell) == pytest.approx(acc[name])
        assert bold == (acc[name] == best and len(set(acc.values())) > 1), (name, cell)
    # lower is better for NLL
    nll = {m: round(r["nll"], 3) for m, r in methods.items()}
    for name, row in body.items():
        assert row[header.index("NLL")][1] == (nll[name] == min(nll.values()))


def test_markdown_references_existing_pngs(report):
    html_path, md_path = report
    assert md_path.parent == html_path.parent
    md = md_path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == N_FIGURES
    for ref in refs:
        assert ref.startswith(f"{FIGURE_DIR}/") and ref.endswith(".png")
        png = md_path.parent / ref
        assert png.is_file() and png.stat().st_size > 0
        with Image.open(png) as im:
            assert im.format == "PNG"
    assert re.search(r"\| \*\*\d+\.\d+\*\* \|", md)  # a bold best cell
    assert not list(md_path.parent.glob(f"{FIGURE_DIR}/.*tmp*"))  # atomic writes left no temp


def test_two_runs_give_mean_and_std_through_the_cli(run_dir, tmp_path, capsys):
    other = tmp_path / "seed1"
    other.mkdir()
    for f in ("results.json", "metrics.csv", "run.json", "config.yaml"):
        shutil.copy(run_dir / f, other / f)
    res = _results(run_dir)
    a = res["methods"]["joint"]["accuracy"]
    res["methods"]["joint"]["accuracy"] = a + 0.1
    (other / "results.json").write_text(json.dumps(res))
    out = tmp_path / "out"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    html_path, md_path = out / "report.html", out / "report.md"
    assert f"report: {html_path}" in capsys.readouterr().out
    body = {r[0][0]: r for r in _parse(html_path).rows[1:]}
    mean = 100 * (a + 0.05)
    std = 100 * float(np.std([a, a + 0.1], ddof=1))
    assert body["joint"][1][0] == f"{mean:.2f} ± {std:.2f}"
    assert body["crt"][1][0].endswith("± 0.00")
    assert " ± " in md_path.read_text()
    assert len(_parse(html_path).imgs) == N_FIGURES


def test_run_without_results_is_a_clear_error(tmp_path, capsys):
    d = tmp_path / "stage1_only"
    d.mkdir()
    (d / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(LongtailError, match=r"no results\.json.*longtail classify"):
        write_report([d])
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert "longtail classify" in err and "Traceback" not in err
    with pytest.raises(LongtailError, match="not a directory"):
        write_report([tmp_path / "missing"])


def test_plots_handle_empty_bins_and_many_classes(tmp_path):
    bins = {
        "a": {
            "count": [0, 5, 0, 10],
            "accuracy": [None, 0.2, None, 0.9],
            "confidence": [None, 0.3, None, 0.8],
        },
    }
    p = plots.reliability_diagrams(bins, tmp_path / "rel.png", {"a": "a: ECE 1%"})
    counts = np.geomspace(500, 5, 300).astype(int)
    acc = np.linspace(1, 0, 300).tolist()
    acc[3] = None
    q = plots.per_class_accuracy_plot(counts, {"m": acc}, tmp_path / "pc.png")
    r = plots.weight_norm_plot(counts, {"m": np.ones(300)}, tmp_path / "wn.png")
    for path in (p, q, r):
        with Image.open(path) as im:
            assert im.size[0] > 0


def test_comparison_table_marks_best_per_direction_and_ties():
    from longtail.evaluate.report import RunData, comparison_table

    def m(acc, nll, few=0.5):
        return {
            "accuracy": acc,
            "many": 0.9,
            "medium": 0.7,
            "few": few,
            "nll": nll,
            "ece": 0.1,
            "brier": 0.3,
        }

    run = RunData(
        Path("r"),
        {
            "train_counts": [10, 1],
            "methods": {"a": m(0.8, 1.0), "b": m(0.8, 0.5, None), "c": m(0.7, 2.0)},
        },
    )
    header, rows, best = comparison_table([run])
    assert "T" not in header  # no temperature scaling in these results
    col = {h: j for j, h in enumerate(header)}
    by = {r[0]: (r, b) for r, b in zip(rows, best, strict=True)}
    assert by["a"][1][col["acc"]] and by["b"][1][col["acc"]] and not by["c"][1][col["acc"]]
    assert by["b"][1][col["NLL"]] and not by["a"][1][col["NLL"]]  # lower is better
    assert not any(b[col["many"]] for _, b in by.values())  # all tied: nothing marked
    assert by["b"][0][col["few"]] == "–" and not by["b"][1][col["few"]]
    assert by["a"][0][col["acc"]] == "80.00" and by["a"][0][col["NLL"]] == "1.000"
