"""The results schema (``longtail.evaluate.results``): what stage 2 writes and every reader reads,
the one aggregator over seeds, and the one comparison table in its three renderings.

Stage 2 runs once, on a private copy of the shared SWA run of conftest.py (three methods).
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch.nn.functional as F

from longtail.classify.run import Stage2, results_table
from longtail.core.errors import LongtailError
from longtail.evaluate.calibration import fit_temperature
from longtail.evaluate.report import write_report
from longtail.evaluate.results import (
    SCHEMA_VERSION,
    Results,
    load_results,
    mean_std,
)
from longtail.evaluate.tables import (
    comparison_table,
    render_html,
    render_markdown,
    render_text,
)
from longtail.fit.select import score_methods
from longtail.sweep import summarize
from test_cli import assert_one_line_error, run_main

METHODS = ["joint", "ncm", "tau"]


@pytest.fixture(scope="module")
def staged(swa_run, tmp_path_factory):
    """Stage 2 (joint, NCM, τ-norm) on a copy of the SWA run: the Stage2 object, what it
    returned and what it wrote."""
    run = Path(shutil.copytree(swa_run.dir, tmp_path_factory.mktemp("results") / "run"))
    s2 = Stage2(run, log=lambda *a: None)
    returned = s2.run(METHODS)
    saved = json.loads((run / "results.json").read_text())
    return SimpleNamespace(run=run, s2=s2, returned=returned, saved=saved)


def _copy_with(staged, tmp_path: Path, results: dict) -> Path:
    """A run directory holding ``results`` as its results.json (and the run's other files)."""
    other = tmp_path / "other"
    other.mkdir()
    for f in ("metrics.csv", "run.json", "config.yaml"):
        shutil.copy(staged.run / f, other / f)
    (other / "results.json").write_text(json.dumps(results))
    return other


def test_classify_output_round_trips_through_the_schema(staged):
    """Writing and reading give equal objects: the file is ``to_json`` of the typed results
    Stage2 kept, and reading it back gives them again. Guards: a field written but not read
    (or read under another name), and a file that is not what classify returned."""
    typed = staged.s2.results
    assert staged.saved == staged.returned == typed.to_json()
    assert staged.saved["schema_version"] == SCHEMA_VERSION
    loaded = load_results(staged.run)
    assert loaded == typed
    assert Results.from_json(loaded.to_json()) == loaded
    assert list(loaded.methods) == METHODS
    tau = loaded.methods["tau"]
    assert tau.info["tau"] == staged.saved["methods"]["tau"]["info"]["tau"]
    assert tau.ts.temperature == staged.saved["methods"]["tau"]["ts"]["temperature"] > 0
    assert tau.val.accuracy == staged.saved["methods"]["tau"]["val"]["accuracy"]
    assert len(tau.test.per_class) == len(loaded.train_counts) == 10


def test_unversioned_results_of_the_current_layout_load_to_the_same_numbers(
    staged, tmp_path, capsys
):
    """A results.json without ``schema_version`` (every file ``longtail classify`` wrote
    before it had one: the same keys) reads to the same numbers, table and report; one missing
    a metric is refused with a message naming the key and ``longtail classify``."""
    old = {k: v for k, v in staged.saved.items() if k != "schema_version"}
    other = _copy_with(staged, tmp_path, old)
    loaded = load_results(other)
    assert loaded == load_results(staged.run)
    assert results_table(old) == results_table(staged.saved)
    assert main_report(other, tmp_path / "out", capsys) == 0

    broken = json.loads(json.dumps(old))
    del broken["methods"]["ncm"]["accuracy"]
    (other / "results.json").write_text(json.dumps(broken))
    with pytest.raises(LongtailError, match=r"method 'ncm' has no 'accuracy'.*longtail classify"):
        load_results(other)


def main_report(run: Path, out: Path, capsys) -> int:
    code, _, err = run_main(["report", str(run), "--out", str(out)], capsys)
    assert "Traceback" not in err, err
    return code


def test_a_future_schema_version_fails_clearly(staged, tmp_path, capsys):
    """A file of a newer schema than this code reads is refused (library and CLI), naming the
    version and both ways out. Guards: reading a future layout as if it were today's."""
    future = dict(staged.saved, schema_version=SCHEMA_VERSION + 1)
    other = _copy_with(staged, tmp_path, future)
    with pytest.raises(LongtailError, match=f"schema version {SCHEMA_VERSION + 1}") as e:
        load_results(other)
    assert "upgrade longtail" in str(e.value) and "longtail classify" in str(e.value)
    line = assert_one_line_error(*run_main(["report", str(other)], capsys))
    assert f"schema version {SCHEMA_VERSION + 1}" in line
    for bad in ("2", 0, True):
        with pytest.raises(LongtailError, match="not a positive integer"):
            Results.from_json(dict(staged.saved, schema_version=bad))


def test_the_aggregator_is_mean_and_sample_std_as_numpy(staged, tmp_path):
    """``mean_std`` against numpy (``ddof=1``) on the real per-class accuracies and method
    accuracies; missing values are skipped, one value has no std. The sweep's summary over two
    runs uses it. Guards: a population std, or a missing value counted as 0."""
    res = load_results(staged.run)
    samples = [[m.test.accuracy for m in res.methods.values()]] + [
        [a for a in m.test.per_class if a is not None] for m in res.methods.values()
    ]
    for values in samples:
        s = mean_std(values)
        assert s.n == len(values)
        assert s.mean == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)
        assert s.std == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-15)
    assert mean_std([0.5, None, float("nan")]) == mean_std([0.5])
    assert mean_std([0.5]).std is None and mean_std([None]) is None

    shifted = json.loads(json.dumps(staged.saved))
    shifted["methods"]["joint"]["accuracy"] += 0.1
    other = _copy_with(staged, tmp_path, shifted)
    summary = summarize([staged.run, other])
    a = [staged.saved["methods"]["joint"]["accuracy"], shifted["methods"]["joint"]["accuracy"]]
    assert summary["joint"]["n"] == 2
    assert summary["joint"]["accuracy"] == pytest.approx(np.mean(a), rel=1e-12)
    assert summary["joint"]["accuracy_std"] == pytest.approx(np.std(a, ddof=1), rel=1e-9)
    assert summary["ncm"]["nll_std"] == 0.0


def test_one_table_three_renderings(staged):
    """The comparison table of real results drawn as text, Markdown and HTML: the same cells
    in each, the compact console headers for ``longtail classify``. Guards: renderers that
    format numbers of their own, or drop the best marks."""
    res = load_results(staged.run)
    table = comparison_table([res, res])  # two runs: mean ± std (0) cells
    assert table.header[:4] == ["method", "acc", "many", "medium"] and "NLL (TS)" in table.header
    text = render_text(table)
    md = "\n".join(render_markdown(table))
    page = "\n".join(render_html(table, table_id="t"))
    for row in table.rows:
        for c in row:
            assert c in text and c.replace("|", "\\|") in md and html.escape(c) in page
    assert table.rows[0][1].endswith(" ± 0.00")
    if any(any(b) for b in table.best):
        assert "**" in md and 'class="best"' in page
    compact = results_table(res).splitlines()[0].split()
    assert compact == ["method", "acc", "many", "med", "few", "NLL", "ECE", "Brier"] + [
        "T",
        "NLL(ts)",
        "ECE(ts)",
        "Brier(ts)",
    ]
    html_path, md_path = write_report([staged.run], staged.run / "report")
    assert res.methods["tau"].test.nll and f"{res.methods['tau'].test.nll:.3f}" in (
        md_path.read_text()
    )


def test_fit_choice_uses_the_temperatures_stage2_fitted(staged):
    """``score_methods`` with stage 2's results takes each head's temperature from them: what
    stage 2 fitted (the value a refit would give: same logits, same fit), and, given other
    temperatures, those, in the figures too; results without one are refused. Guards: fit
    calibrating again on its own, and silently mixing fitted and read temperatures."""
    s2 = staged.s2
    feats = s2.features()
    scores = score_methods(s2.heads, feats, s2.counts, many=40, few=25, results=s2.results)
    assert [s.name for s in scores] == METHODS
    zv, yv = feats["val"]
    for s in scores:
        assert s.temperature == s2.results.methods[s.name].ts.temperature
        assert s.temperature == pytest.approx(
            fit_temperature(s2.heads[s.name](zv).float(), yv), rel=1e-6
        )
    given = {n: 0.5 + i for i, n in enumerate(METHODS)}
    other = replace(
        s2.results,
        methods={
            n: replace(m, ts=replace(m.ts, temperature=given[n]))
            for n, m in s2.results.methods.items()
        },
    )
    for s in score_methods(s2.heads, feats, s2.counts, many=40, few=25, results=other):
        assert s.temperature == given[s.name]
        logits = s2.heads[s.name](zv).float().double() / given[s.name]
        assert s.val["nll_ts"] == pytest.approx(F.cross_entropy(logits, yv).item(), rel=1e-6)
    uncalibrated = replace(
        s2.results, methods={n: replace(m, ts=None) for n, m in s2.results.methods.items()}
    )
    with pytest.raises(LongtailError, match="no temperature for 'joint'.*stage2.calibrate=true"):
        score_methods(s2.heads, feats, s2.counts, results=uncalibrated)
