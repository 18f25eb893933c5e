"""Stage-2 options: augmented feature views, SGD-feature backbone, confidence weighting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from longtail.classify.run import classify, results_path
from longtail.core.io import verified_load


@pytest.fixture
def run(swa_run, tmp_path) -> Path:
    """A private copy of the shared SWA run, so these calls never touch its results.json."""
    return Path(shutil.copytree(swa_run.dir, tmp_path / "run"))


def test_augmented_views_are_cached_and_used(run) -> None:
    res = classify(run, ["crt", "ncm"], ["stage2.aug_views=2"], log=lambda *_: None)
    views = verified_load(run / "features" / "swa-aug2.pt")
    plain = verified_load(run / "features" / "swa.pt")["train"][0]
    assert views.shape == (2, *plain.shape)
    assert not torch.equal(views[0], views[1])  # two different augmentations
    assert not torch.equal(views[0], plain)
    assert res["methods"]["crt"]["accuracy"] > 0.3


def test_final_backbone_writes_its_own_results_file(run, swa_run) -> None:
    res = classify(run, ["joint", "tau"], ["stage2.backbone=final"], log=lambda *_: None)
    assert res["backbone"] == "final"
    path = results_path(run, "final")
    assert path.name == "results-final.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["methods"]["joint"]["accuracy"] == res["methods"]["joint"]["accuracy"]
    # the joint classifier of the final model reproduces stage 1's own test accuracy
    assert abs(res["methods"]["joint"]["accuracy"] - swa_run.results["final"]["accuracy"]) < 0.02


def test_confidence_weighting_changes_srepr(run) -> None:
    quiet = lambda *_: None  # noqa: E731
    base = ["stage2.srepr_alpha_grid=[0.5]"]
    plain = classify(run, ["srepr"], base, log=quiet)["methods"]["srepr"]
    weighted = classify(run, ["srepr"], [*base, "stage2.srepr_weighting=confidence"], log=quiet)[
        "methods"
    ]["srepr"]
    assert plain["info"]["alpha"] == weighted["info"]["alpha"] == 0.5
    assert plain["weight_norm"] != weighted["weight_norm"]


@pytest.mark.parametrize(
    ("override", "name"), [("auto", "results.json"), ("final", "results-final.json")]
)
def test_classify_prints_the_results_file_it_wrote(run, override, name, capsys) -> None:
    """``stage2.backbone=auto`` given explicitly still writes (and names) ``results.json``; a
    named backbone writes ``results-<backbone>.json``. Guards the printed path naming another
    file than the one written."""
    from longtail.cli import main

    target = run / name
    target.unlink(missing_ok=True)
    assert main(["classify", str(run), f"stage2.backbone={override}", "--method", "joint"]) == 0
    out = capsys.readouterr().out
    assert target.is_file() and f"results: {target}\n" in out
