"""``longtail.core.rundir.RunDir``: the one definition of a run directory's layout and state.

Runs here are the shared session runs of conftest.py (read only; copied before any change) and
one tiny digits-LT run interrupted in its final step (test_cli.py's overrides: 2 epochs, CPU).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from longtail.classify.run import classify
from longtail.config import load_config
from longtail.core.checkpoint import save_checkpoint
from longtail.core.errors import LongtailError
from longtail.core.rundir import RunDir
from longtail.sweep import run_seed
from longtail.train import loop
from test_cli import TINY_CLI, assert_one_line_error, run_main


def _copy(src: Path, dst: Path, names: list[str]) -> RunDir:
    """A new run directory holding ``names`` (with their checksums) copied from ``src``."""
    dst.mkdir(parents=True)
    for name in names:
        for f in (src / name, src / f"{name}.sha256"):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
    return RunDir(dst)


def _stage1_files(run: RunDir) -> set[str]:
    """The names RunDir gives every file and folder a finished SWA stage 1 writes (``branch.pt``:
    the state at ``swa.start``, which ``longtail sweep``'s SGD baseline branches off)."""
    named = [
        run.branch_path,
        run.config_path,
        run.info_path,
        run.metrics_path,
        run.stage1_path,
        run.model_path("final"),
        run.model_path("swa"),
        run.swag_path,
        *run.checkpoints(),
    ]
    sums = {f"{p.name}.sha256" for p in named if p.suffix == ".pt"}
    return {p.name for p in named} | sums | {run.tensorboard_dir.name}


def test_rundir_paths_and_readers_match_what_stage1_wrote(swa_run):
    """Over the shared SWA run, against the file names spelled out here: each path RunDir gives
    is a file Stage1 wrote and each reader returns its contents. Guards: a name spelled
    differently in RunDir than users and docs know it (stage 2, the report and the sweep would
    then look in the wrong place)."""
    d = swa_run.dir
    run = RunDir(d)
    assert run.path == d and repr(run) == f"RunDir({str(d)!r})"
    assert run.config() == load_config(d / "config.yaml")
    assert run.config(["stage2.epochs=9"]).stage2.epochs == 9
    assert run.info() == json.loads((d / "run.json").read_text())
    assert run.stage1() == json.loads((d / "stage1.json").read_text())
    assert run.stage1()["swa"]["accuracy"] == swa_run.results["swa"]["accuracy"]
    assert run.metrics_path == d / "metrics.csv" and run.tensorboard_dir == d / "tb"
    assert run.model_path("swa") == d / "model_swa.pt" and run.swag_path == d / "swag.pt"
    assert run.features_dir == d / "features"
    assert run.results_path("final") == d / "results-final.json"
    assert run.checkpoints() == sorted(d.glob("ckpt-*.pt")) and len(run.checkpoints()) == 2
    assert {p.name for p in d.iterdir()} >= _stage1_files(run)
    assert run.finished and run.resumable and run.started
    assert not run.stopped_before_first_checkpoint


def test_finished_needs_stage1_json_and_every_model_it_reports(swa_run, plain_run, tmp_path):
    """A copy of the SWA run without ``model_swa.pt`` is not finished; the SGD-only run is
    finished without one. Guards: a SWA run missing its SWA model counted as done (stage 2's
    ``backbone=auto`` then silently falls back to the final SGD model), and SWA files demanded
    of a run trained with ``swa.enabled=false``."""
    files = ["config.yaml", "run.json", "model_final.pt", "stage1.json"]
    run = _copy(swa_run.dir, tmp_path / "swa", [*files, "swag.pt"])
    assert not run.finished
    shutil.copy2(swa_run.dir / "model_swa.pt", run.model_path("swa"))
    assert run.finished
    run.swag_path.unlink()
    assert not run.finished

    plain = RunDir(plain_run.dir)
    assert "swa" not in plain.stage1() and not plain.model_path("swa").exists()
    assert plain.finished
    run = _copy(plain_run.dir, tmp_path / "plain", files)
    assert run.finished
    run.stage1_path.write_text("{not json")  # as if cut short while written
    assert not run.finished


def test_a_run_stopped_in_its_final_step_is_resumable_not_finished(tmp_path, monkeypatch):
    """A real run interrupted after ``model_final.pt`` was saved but before the SWA model and
    ``stage1.json``: not finished, resumable; ``longtail sweep`` (run_seed) resumes it, and then
    it is finished and skipped. Guards: ``longtail demo``'s former test (``model_final.pt``
    means done), which skipped such a run and classified the final SGD model's features as if
    they were the SWA features. Also: the folder then holds only files RunDir names (guards a
    run file added outside RunDir)."""
    overrides = [*TINY_CLI, "seed=0"]

    def stop(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(loop, "refresh_bn", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        loop.Stage1(load_config("digits_lt", overrides), tmp_path / "seed0").fit()
    run = RunDir(tmp_path / "seed0")
    assert run.model_path("final").is_file() and not run.stage1_path.exists()
    assert not run.finished and run.resumable and run.started
    assert not run.stopped_before_first_checkpoint

    monkeypatch.undo()
    logs: list[str] = []
    assert (
        run_seed("digits_lt", 0, tmp_path, overrides=TINY_CLI, vary_subset=False, log=logs.append)
        == run.path
    )
    assert logs == [f"seed 0: stage 1 -> {run.path} (resuming)"]
    assert run.finished and run.model_path("swa").is_file()
    assert {p.name for p in run.path.iterdir()} == _stage1_files(run)
    logs.clear()
    run_seed("digits_lt", 0, tmp_path, overrides=TINY_CLI, vary_subset=False, log=logs.append)
    assert logs == [f"seed 0: stage 1 already done in {run.path}"]


def test_sweep_starts_again_a_seed_stopped_before_its_first_checkpoint(swa_run, tmp_path):
    """A sweep stopped while a seed's run had only ``config.yaml`` (before its first checkpoint)
    runs that seed again from the start when restarted. Guards: the sweep passing such a run to
    Stage1 as a new run, which refused the started folder and stopped the whole sweep."""
    _copy(swa_run.dir, tmp_path / "seed0", ["config.yaml", "run.json"])
    logs: list[str] = []
    run_seed("digits_lt", 0, tmp_path, overrides=TINY_CLI, vary_subset=False, log=logs.append)
    run = RunDir(tmp_path / "seed0")
    assert logs == [
        f"seed 0: {run.path} stopped before its first checkpoint: starting it again",
        f"seed 0: stage 1 -> {run.path}",
    ]
    assert run.finished


def test_resumable_means_a_checkpoint_to_continue_from(swa_run, tmp_path, capsys):
    """Resumable is "has a checkpoint" (what ``--resume`` loads), as the sweep, the demo and
    Stage1 decided it; ``config.yaml`` alone makes a started run that is not resumable, and
    ``train --resume`` on it starts it again from step 0 in the same folder (there is nothing
    to continue from and nothing to lose; it used to refuse, and a new run into the folder was
    refused too, so such a run could be neither resumed nor restarted). Guards: resumable
    judged by ``config.yaml`` (the old benchmark script's test); files that only look like
    checkpoints counted; a restart keeping the stopped attempt's metrics rows."""
    empty = RunDir(tmp_path / "missing")
    assert not (empty.started or empty.resumable or empty.finished)
    assert not empty.stopped_before_first_checkpoint

    run = _copy(swa_run.dir, tmp_path / "run", ["config.yaml", "metrics.csv"])
    (run.path / "ckpt-x.pt").write_bytes(b"x")
    (run.path / "other.pt").write_bytes(b"x")
    assert run.started and not run.resumable and not run.finished
    assert run.stopped_before_first_checkpoint
    code, _, err = run_main(["train", "--resume", str(run.path)], capsys)
    assert code == 0, err
    assert run.finished
    with open(run.metrics_path) as f:  # one row per epoch, the stopped attempt's dropped
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == list(range(1, len(epochs) + 1))
    shutil.rmtree(run.path)

    run = _copy(swa_run.dir, tmp_path / "run", ["config.yaml"])
    (run.path / "ckpt-x.pt").write_bytes(b"x")
    (run.path / "other.pt").write_bytes(b"x")
    assert run.started and not run.resumable and not run.finished

    save_checkpoint({"epoch": 0}, run.path, 0, 5)
    save_checkpoint({"epoch": 1}, run.path, 1, 0)
    assert run.resumable and not run.finished and not run.stopped_before_first_checkpoint
    assert [p.name for p in run.checkpoints()] == ["ckpt-0000-0000005.pt", "ckpt-0001-0000000.pt"]
    assert run.checkpoint_path(1, 0) == run.checkpoints()[-1]

    only_ckpt = RunDir(tmp_path / "ckpt-only")
    save_checkpoint({"epoch": 0}, only_ckpt.path, 0, 1)
    assert only_ckpt.resumable and only_ckpt.started  # --resume then asks for config.yaml


def test_a_folder_that_is_not_a_run_gives_the_cli_message(tmp_path, capsys):
    """RunDir.config() on a folder without ``config.yaml`` raises the one-line LongtailError
    ``longtail classify`` prints. Guards: the message drifting between RunDir and the CLI (each
    caller used to spell its own), or a KeyError / FileNotFoundError instead."""
    with pytest.raises(LongtailError) as e:
        RunDir(tmp_path).config()
    msg = str(e.value)
    assert msg == f"{str(tmp_path)!r} is not a stage-1 run directory (no config.yaml)"
    line = assert_one_line_error(*run_main(["classify", str(tmp_path)], capsys))
    assert line.endswith(msg)
    with pytest.raises(LongtailError, match="run.json not found"):
        RunDir(tmp_path).info()


def test_results_reads_what_classify_wrote(plain_run, tmp_path):
    """Stage 2 on a copy of the SGD-only run: ``results()`` returns exactly what classify wrote
    and returned, ``results("final")`` names its own file, a file without methods is refused.
    Guards: the sweep and the report reading another file than classify writes."""
    run = _copy(plain_run.dir, tmp_path / "run", ["config.yaml", "model_final.pt"])
    res = classify(run.path, ["joint"], log=lambda *a: None)
    assert run.results_path() == run.path / "results.json"
    assert run.results() == json.loads(json.dumps(res))
    assert run.feature_path("final").is_file()  # auto = final: this run has no SWA
    with pytest.raises(LongtailError, match="has no results-final.json: run `longtail classify"):
        run.results("final")
    run.results_path("final").write_text('{"methods": {}}')
    with pytest.raises(LongtailError, match="holds no method results"):
        run.results("final")
