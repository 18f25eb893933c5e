"""``longtail demo`` / ``sweep`` end to end, the user-error paths of the CLI, Ctrl-C, --weights.

Every run here uses the tiny digits-LT overrides of test_cli.py (2 epochs, CPU, fp32).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.classify.heads import LinearHead, head_spec
from longtail.config import load_config
from longtail.core.checkpoint import list_checkpoints
from longtail.core.io import verified_load
from longtail.core.rundir import RunDir
from longtail.evaluate import report
from longtail.fit.bundle import DeployedClassifier, save_bundle
from longtail.fit.images import Preprocessing
from longtail.models import build_model
from longtail.sweep import run_seed
from longtail.train import loop
from longtail.train.loop import Stage1
from test_cli import TINY_CLI, assert_one_line_error, run_main

SGD_ONLY = [*TINY_CLI, "swa.enabled=false"]


# ------------------------------------------------------------------ demo
def test_demo_restarts_a_stopped_demo_then_reuses_a_finished_one(tmp_path, capsys, monkeypatch):
    """A demo folder stopped before its first checkpoint (config.yaml, no checkpoint) is
    removed and trained again; a finished demo keeps stage 1 and reruns stage 2 only; a
    finished stage 1 whose final model is missing resumes instead of retraining. Guards: the
    rmtree branch firing on a finished or resumable demo, or not firing on a stale one
    (which would fail with "already holds a training run")."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yaml").write_text("stale: true\n")
    (out / "leftover.txt").write_text("from the stopped demo\n")
    code, text, err = run_main(["demo", *TINY_CLI, "--out", str(out)], capsys)
    assert code == 0, err
    assert not (out / "leftover.txt").exists()
    assert "stage 1: ResNet-32 on digits-LT" in text
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"])[:7] == [
        "joint",
        "ncm",
        "crt",
        "tau",
        "lws",
        "logit_adjust",
        "srepr",
    ]
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in text
    assert load_config(out / "config.yaml").optim.epochs == 2  # the overrides reached stage 1

    # the branches below rerun stage 2 as above; the report itself was checked just now
    reports: list[list[Path]] = []
    monkeypatch.setattr(report, "write_report", lambda runs: reports.append(runs) or (None, None))
    final = out / "model_final.pt"
    stamp = final.stat().st_mtime_ns
    code, text, err = run_main(["demo", *TINY_CLI, "--out", str(out)], capsys)
    assert code == 0, err
    assert "stage 1:" not in text and "stage 2:" in text
    assert final.stat().st_mtime_ns == stamp  # not retrained
    assert list_checkpoints(out)

    final.unlink()  # as if stopped after the last checkpoint, before saving the model
    ckpts = list_checkpoints(out)
    code, text, err = run_main(["demo", *TINY_CLI, "--out", str(out)], capsys)
    assert code == 0, err
    assert final.is_file() and list_checkpoints(out) == ckpts  # resumed at the end, no epoch
    assert "stage 1:" in text
    assert reports == [[out], [out]]


# ------------------------------------------------------------------ sweep
def test_sweep_aggregates_the_seeds_it_trained(tmp_path, capsys):
    """Two seeds, joint + NCM: ``summary.json`` holds the mean and sample std of the per-seed
    results files, for the SWA features, the SWA run's last iterate and the SGD baseline (its own
    run per seed: SWA off, lr annealed to 0); a finished seed is not trained again. Guards: a
    wrong mean / std (population std, one seed only), a table missing, the constant-lr last
    iterate passed off as the SGD baseline, stage 1 retrained for a seed that is done, the
    baseline's shared epochs retrained."""
    out = tmp_path / "sweep"
    # warm-up shorter than the 2 epochs, so that the baseline's cosine has room to reach 0
    tiny = [*TINY_CLI, "optim.warmup_epochs=0.5"]
    argv = ["sweep", "digits_lt", *tiny, "--seeds", "0", "1", "--out", str(out)]
    code, text, err = run_main([*argv, "--method", "joint", "ncm"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    files = (
        ("swa_features", "seed{s}/results.json"),
        ("last_iterate_features", "seed{s}/results-final.json"),
        ("sgd_baseline", "seed{s}-sgd/results.json"),
    )
    for key, name in files:
        per_seed = [json.loads((out / name.format(s=s)).read_text()) for s in (0, 1)]
        assert per_seed[0]["methods"]["joint"] != per_seed[1]["methods"]["joint"]
        for method in ("joint", "ncm"):
            for metric in ("accuracy", "nll", "few"):
                vals = [r["methods"][method][metric] for r in per_seed]
                got = summary[key][method]
                assert got[metric] == pytest.approx(np.mean(vals), rel=1e-12)
                assert got[f"{metric}_std"] == pytest.approx(statistics.stdev(vals), rel=1e-9)
                assert got["n"] == 2
    seed1 = load_config(out / "seed1" / "config.yaml")
    assert seed1.seed == 1
    assert seed1.data.subset_seed == 1  # the subset varies with the seed by default
    assert load_config(out / "seed0" / "config.yaml").data.subset_seed == 0
    assert "stage 2 on the last iterate's features" in text
    assert "stage 2 on the SGD baseline's features" in text
    # the baseline: the same recipe and seed, SWA off, a schedule that ends at lr 0
    base = load_config(out / "seed1-sgd" / "config.yaml")
    assert not base.swa.enabled and base.optim.schedule == "cosine"
    assert (base.seed, base.data.subset_seed, base.optim.epochs) == (1, 1, seed1.optim.epochs)
    rows = csv.DictReader(RunDir(out / "seed1-sgd").metrics_path.read_text().splitlines())
    lrs = [float(r["lr"]) for r in rows]  # each epoch's last step
    assert len(lrs) == 2 and lrs[-1] < 1e-3 * max(lrs)
    # the cosine recipe: the baseline continues from the SWA run's state at swa.start
    info = json.loads(RunDir(out / "seed1-sgd").info_path.read_text())
    assert info["branched_from"] == {"run": str(out / "seed1"), "epoch": 1}
    assert f"seed 1: branching off {out / 'seed1'} at epoch 1" in text
    assert (out / "report.html").is_file()
    stamp = (out / "seed0" / "model_final.pt").stat().st_mtime_ns
    logs: list[str] = []
    assert (
        run_seed("digits_lt", 0, out, overrides=tiny, vary_subset=False, log=logs.append)
        == out / "seed0"
    )
    assert logs == [f"seed 0: stage 1 already done in {out / 'seed0'}"]
    assert (out / "seed0" / "model_final.pt").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------ user errors
def test_classify_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    line = assert_one_line_error(*run_main(["classify", str(tmp_path)], capsys))
    assert "is not a stage-1 run directory" in line and str(tmp_path) in line


def test_train_needs_a_config_and_an_out_dir(tmp_path, capsys):
    line = assert_one_line_error(*run_main(["train", "--out", str(tmp_path / "r")], capsys))
    assert "train needs a CONFIG" in line
    line = assert_one_line_error(*run_main(["train", "digits_lt"], capsys))
    assert "train needs --out" in line
    assert not (tmp_path / "r").exists()


def test_resume_with_a_different_out_is_refused(swa_run, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    argv = ["train", "--resume", str(swa_run.dir), "--out", str(other)]
    line = assert_one_line_error(*run_main(argv, capsys))
    assert "drop --out" in line
    assert not other.exists()


def test_batch_size_must_divide_among_the_processes(tmp_path, capsys, monkeypatch):
    """A 3-process world (the runtime torchrun would give rank 0) with a global batch of 64.
    Guards: the divisibility check missing, which would give ranks unequal batches."""
    real = loop.make_runtime

    def three_ranks(*args, **kwargs):
        rt = real(*args, **kwargs)
        rt.world_size = 3
        return rt

    monkeypatch.setattr(loop, "make_runtime", three_ranks)
    monkeypatch.setattr(loop, "init_distributed", lambda rt: rt)
    out = tmp_path / "r"
    argv = ["train", "digits_lt", *TINY_CLI, "optim.batch_size=64", "--out", str(out)]
    line = assert_one_line_error(*run_main(argv, capsys))
    assert "optim.batch_size=64" in line and "divisible by the 3 processes" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("optim.batch_size=1024", "optim.batch_size=1024 exceeds the 584 training images"),
        ("swa.anneal_epochs=1", "swa.anneal_epochs=1.0 = 2.0"),
    ],
)
def test_a_config_stage_1_refuses_leaves_no_run_directory(tmp_path, capsys, bad, named):
    """digits-LT trains on 584 images; TINY_CLI has 2 epochs with SWA from epoch 1. Guards: the
    batch and SWA-collection checks ran after the run directory was made (and, for the batch,
    after the model was built and its kernels timed), leaving an empty folder behind."""
    out = tmp_path / "r"
    argv = ["train", "digits_lt", *TINY_CLI, bad, "--out", str(out)]
    line = assert_one_line_error(*run_main(argv, capsys))
    assert named in line
    assert not out.exists()


@pytest.mark.parametrize("method", ["tau", "srepr"])
def test_methods_that_choose_on_validation_need_a_validation_split(
    swa_run, tmp_path, capsys, method
):
    """The shared run classified with ``data.val_per_class=0`` (no validation split)."""
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.yaml", "model_swa.pt", "model_swa.pt.sha256", "swag.pt", "swag.pt.sha256"):
        (run / f).write_bytes((swa_run.dir / f).read_bytes())
    argv = ["classify", str(run), "data.val_per_class=0", "--method", "joint", method]
    line = assert_one_line_error(*run_main(argv, capsys))
    assert f"{method} choose hyper-parameters on a validation split" in line
    assert "data.val_per_class > 0" in line
    assert not (run / "results.json").exists()


def test_predict_on_a_folder_without_a_bundle(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(img)
    line = assert_one_line_error(*run_main(["predict", str(tmp_path), str(img)], capsys))
    assert "holds no model bundle" in line and "longtail fit" in line


def _tiny_bundle(out: Path) -> None:
    """An untrained 3-class ResNet-32 bundle on 8 px grayscale images (no training needed)."""
    torch.manual_seed(0)
    backbone = build_model("resnet32", 3, 1).eval()
    head = LinearHead.fresh(backbone.feature_dim, 3, seed=0)
    model = DeployedClassifier(backbone, head, 1.0, (0.5,), (0.25,))
    prep = Preprocessing(8, 1, 8, (0.5,), (0.25,))
    spec = {
        "backbone": "resnet32",
        "num_classes": 3,
        "channels": 1,
        "feature_dim": int(backbone.feature_dim),
        "head": head_spec(head),
    }
    meta = {"classes": ["a", "b", "c"], "preprocessing": prep.to_json(), "temperature": 1.0}
    save_bundle(out, model, spec=spec, meta=meta, check_inputs=torch.rand(4, 1, 8, 8))


def test_predict_on_a_bundle_whose_weights_are_not_a_torch_file(tmp_path, capsys):
    """model.pt replaced by text (and no checksum beside it). Guards: torch.load's multi-line
    message printed as the error (the CLI promises one line)."""
    _tiny_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "model.pt").write_text("not weights\n")
    (tmp_path / "bundle" / "model.pt.sha256").unlink()
    img = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(img)
    line = assert_one_line_error(*run_main(["predict", str(tmp_path), str(img)], capsys))
    assert "model.pt' cannot be read" in line


def test_predict_top_k_must_be_positive_and_is_capped_by_the_classes(tmp_path, capsys):
    """Guards: ``--top-k 0`` printing empty rankings instead of an error; a k above the number
    of classes failing instead of listing every class."""
    _tiny_bundle(tmp_path / "bundle")
    img = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (8, 8), dtype=np.uint8)).save(img)
    for k in ("0", "-2"):
        argv = ["predict", str(tmp_path / "bundle"), str(img), "--top-k", k]
        line = assert_one_line_error(*run_main(argv, capsys))
        assert f"--top-k must be >= 1, got {k}" in line
    code, text, err = run_main(
        ["predict", str(tmp_path / "bundle"), str(img), "--top-k", "9"], capsys
    )
    assert code == 0, err
    pred = json.loads(text)["predictions"][0]
    assert sorted(p["label"] for p in pred["top_k"]) == ["a", "b", "c"]
    assert sum(p["probability"] for p in pred["top_k"]) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ --weights
def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    """Guards: ``weights_path`` read but not loaded (a randomly initialised backbone)."""
    from torchvision.models import resnet as tvr

    torch.manual_seed(1)
    net = tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1])
    w = tmp_path / "r10.pth"
    torch.save(net.state_dict(), w)
    model = build_model("resnet10", 4, 3, weights_path=str(w))
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.body.state_dict()[key], value), key
    assert model.classifier.out_features == 4
    fresh = build_model("resnet10", 4, 3)
    assert not torch.equal(fresh.body.conv1.weight, net.conv1.weight)


def test_unusable_weights_files_are_one_line_errors(tmp_path, capsys):
    """``fit --weights`` with a text file, a state dict of something else, and a ResNet-18
    (which longtail has no backbone for). Guards: a traceback from torch.load, or a ResNet-18
    silently treated as a ResNet-10."""
    from torchvision.models import resnet as tvr

    tree = tmp_path / "imgs"
    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (tree / c).mkdir(parents=True)
        for j in range(6):
            Image.fromarray(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                tree / c / f"{j}.png"
            )
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    other = tmp_path / "other.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    r18 = tmp_path / "r18.pth"
    torch.save(tvr.resnet18().state_dict(), r18)
    expect = {
        text: "not a readable state dict",
        other: "expected a torchvision ResNet state dict",
        r18: "2 blocks in layer3",
    }
    for i, (path, message) in enumerate(expect.items()):
        argv = ["fit", str(tree), "--out", str(tmp_path / f"out{i}"), "--weights", str(path)]
        line = assert_one_line_error(*run_main(argv, capsys))
        assert message in line and str(path) in line


# ------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_exits_130_and_leaves_a_resumable_run(tmp_path):
    """SIGINT to ``longtail train`` once its first checkpoint exists (one is written every
    step here): exit status 130, the documented one-line note, and a run that ``--resume``
    opens at the checkpointed step.
    Guards: a traceback / status 1 on Ctrl-C, or a half-written checkpoint."""
    exe = Path(sys.executable).with_name("longtail")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "longtail"]
    run = tmp_path / "run"
    overrides = [o for o in SGD_ONLY if not o.startswith("optim.epochs=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGTAIL_PROGRESS": "0"}
    # a child inherits SIGINT ignored or blocked from its parent, and Python then installs no
    # KeyboardInterrupt handler: start it as a terminal would (seen once in a full `make test`
    # on 2026-12-06: the run ignored the signal and finished with status 0)
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)  # reset to default by exec
    try:
        p = subprocess.Popen(
            [*cmd, "train", "digits_lt", *overrides, "optim.epochs=50", "checkpoint_every_steps=1"]
            + ["--out", str(run)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, inherited[1])
        if inherited[0] is not None:
            signal.signal(signal.SIGINT, inherited[0])
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob("ckpt-*.pt.sha256")):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, f"{err!r}; the test process had SIGINT {inherited}"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "longtail: interrupted; the last checkpoint is intact (use --resume)"
    )
    assert not (run / "model_final.pt").exists()
    newest = list_checkpoints(run)[-1]
    state = verified_load(newest)  # checksum matches: not half-written
    assert state["global_step"] >= 1
    resumed = Stage1(load_config(run / "config.yaml"), run, resume=True)
    assert (resumed.epoch, resumed.global_step) == (state["epoch"], state["global_step"])
    assert resumed.epoch < 50


def test_sweep_subset_switches():
    """``--fixed-subset`` keeps one subset, ``--vary-subset`` (and no flag) leave it to the rule
    in ``sweep``: vary unless an override sets ``data.subset_seed``."""
    from longtail.cli import build_parser

    base = ["sweep", "digits_lt", "--out", "x"]
    assert build_parser().parse_args(base).vary_subset is None
    assert build_parser().parse_args([*base, "--vary-subset"]).vary_subset is True
    assert build_parser().parse_args([*base, "--fixed-subset"]).vary_subset is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--vary-subset", "--fixed-subset"])
    from longtail.sweep import subset_varies

    assert subset_varies(None, ["optim.epochs=2"]) is True
    assert subset_varies(None, ["data.subset_seed=4"]) is False
    assert subset_varies(True, ["data.subset_seed=4"]) is True
    assert subset_varies(False, []) is False
