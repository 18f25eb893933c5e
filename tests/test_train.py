"""Stage 1 end to end on the tiny digits-LT runs of conftest.py (and one diverging run)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import longtail
from longtail.config import diff_configs, load_config
from longtail.core.checkpoint import list_checkpoints
from longtail.core.errors import LongtailError
from longtail.core.io import verified_load
from longtail.core.rundir import RunDir
from longtail.core.runtime import make_runtime
from longtail.data.build import build_data, check_batch_size, make_loaders
from longtail.data.loader import BatchLoader
from longtail.data.prepare import prepare_data
from longtail.data.samplers import make_sampler
from longtail.evaluate.metrics import accuracy
from longtail.models import build_model
from longtail.models.inference import collect_outputs
from longtail.sweep import SGD_BASELINE
from longtail.train.bn import refresh_bn
from longtail.train.loop import Stage1
from longtail.train.schedules import lr_at
from longtail.train.swag import flatten_parameters

METRIC_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "img_per_s",
    "epoch_seconds",
    "val_acc",
    "val_nll",
    "val_ece",
    "swa_snapshots",
]
CHANCE = 0.1  # 10 balanced test classes
MIN_ACC = 0.5  # the tiny run reaches ~0.71 (final) / ~0.71 (SWA) on the 300 test images


# ------------------------------------------------------------------ helpers
def _metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _n_train(run) -> int:
    return sum(json.loads((run.dir / "run.json").read_text())["data"]["train_counts"])


def _steps_per_epoch(run) -> int:
    return _n_train(run) // run.cfg.optim.batch_size  # drop_last


def _expected_snapshots(run, epochs_done: int) -> int:
    """Snapshots after ``epochs_done`` epochs: every ``every_steps`` global steps once the lr
    has reached ``swa.lr``, i.e. from fractional epoch ``swa.start + swa.anneal_epochs`` on."""
    spe, every = _steps_per_epoch(run), run.cfg.swa.every_steps
    begin = (int(run.cfg.swa.start) + run.cfg.swa.anneal_epochs) * spe  # first global step
    return sum(1 for g in range(1, epochs_done * spe + 1) if g >= begin and g % every == 0)


def _dir_state(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in d.rglob("*")
        if p.is_file()
    }


def _model(run, name: str) -> torch.nn.Module:
    m = build_model(run.cfg.model.name, 10, 1)
    m.load_state_dict(verified_load(run.dir / f"model_{name}.pt"))
    return m.eval()


def _bn_stats(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


def _median_rel_diff(a: dict, b: dict) -> float:
    return float(
        np.median([float((a[k] - b[k]).norm() / (b[k].norm() + 1e-8)) for k in _bn_stats(b)])
    )


# ------------------------------------------------------------------ run directory
def test_run_directory_holds_every_artefact(swa_run):
    d = swa_run.dir
    for name in [
        "config.yaml",
        "run.json",
        "metrics.csv",
        "model_final.pt",
        "model_swa.pt",
        "swag.pt",
        "stage1.json",
    ]:
        assert (d / name).is_file(), name
        assert (d / name).stat().st_size > 0, name
    for name in ["model_final.pt", "model_swa.pt", "swag.pt"]:
        digest = (d / f"{name}.sha256").read_text().strip()
        assert digest == hashlib.sha256((d / name).read_bytes()).hexdigest(), name
    events = list((d / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_saved_config_is_the_resolved_run_config(swa_run):
    saved = load_config(swa_run.dir / "config.yaml")
    assert diff_configs(saved, swa_run.cfg) == []
    assert saved.optim.epochs == 6 and saved.swa.every_steps == 2 and saved.swa.swag_rank == 5
    assert saved.data.dataset == "digits" and saved.data.imbalance == 10


def test_run_json_records_revision_classes_and_data(swa_run):
    info = json.loads((swa_run.dir / "run.json").read_text())
    in_checkout = any((p / ".git").exists() for p in Path(longtail.__file__).resolve().parents)
    if in_checkout:
        assert re.fullmatch(r"[0-9a-f]{40}", info["git_revision"]), info["git_revision"]
    else:
        assert info["git_revision"] == "unknown"
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["precision"] == "fp32" and info["device"] == "cpu"
    assert info["swa_start_epoch"] == 3
    data = info["data"]
    assert data["dataset"] == "digits" and data["imbalance"] == 10.0
    counts = np.array(data["train_counts"])
    assert len(counts) == 10 and (np.diff(counts) <= 0).all()
    assert 9 <= counts[0] / counts[-1] <= 11  # imbalance factor 10
    assert data["test_size"] == 300 and data["val_size"] == 50  # 30 and 5 per class


def test_metrics_csv_has_one_row_per_epoch(swa_run):
    columns, rows = _metrics(swa_run.dir)
    assert columns == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    spe = _steps_per_epoch(swa_run)
    assert [int(r["step"]) for r in rows] == [spe * e for e in range(1, 7)]
    for r in rows:
        for k in ["lr", "train_loss", "train_acc", "val_acc", "val_nll", "val_ece"]:
            assert math.isfinite(float(r[k])), (k, r)
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1
    # the SWA lr phase ends at swa.lr; training loss falls
    assert float(rows[-1]["lr"]) == pytest.approx(swa_run.cfg.swa.lr)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_tensorboard_holds_the_epoch_scalars(swa_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(swa_run.dir / "tb"))
    ea.Reload()
    assert {"train_loss", "val_acc", "lr", "swa_snapshots"} <= set(ea.Tags()["scalars"])
    _, rows = _metrics(swa_run.dir)
    loss = ea.Scalars("train_loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [e.value for e in loss] == pytest.approx([float(r["train_loss"]) for r in rows])


def test_keeps_two_checksummed_checkpoints_the_last_matching_the_final_model(swa_run):
    ckpts = list_checkpoints(swa_run.dir)
    assert len(ckpts) == 2  # six were written, the newest two are kept
    assert len(list(swa_run.dir.glob("ckpt-*.pt"))) == 2
    for c in ckpts:
        digest = Path(f"{c}.sha256").read_text().strip()
        assert digest == hashlib.sha256(c.read_bytes()).hexdigest()
    last = verified_load(ckpts[-1])
    assert last["epoch"] == 6 and last["step_in_epoch"] == 0
    assert last["global_step"] == 6 * _steps_per_epoch(swa_run)
    final = verified_load(swa_run.dir / "model_final.pt")
    assert final.keys() == last["model"].keys()
    assert all(torch.equal(final[k], last["model"][k]) for k in final)


# ------------------------------------------------------------------ trained models
def test_final_and_swa_models_beat_chance_on_test(swa_run):
    stage1 = json.loads((swa_run.dir / "stage1.json").read_text())
    assert {"final", "swa", "final_val", "swa_val"} <= set(stage1)
    cfg = swa_run.cfg
    splits = build_data(cfg)
    test = make_loaders(cfg, splits, make_runtime("cpu", "fp32", cfg.channels_last))["test"]
    for name in ["final", "swa"]:
        acc = stage1[name]["accuracy"]
        assert acc > MIN_ACC > 4 * CHANCE, (name, acc)
        # the saved weights are the model that was evaluated
        logits, labels = collect_outputs(_model(swa_run, name), test.batches())
        assert len(labels) == 300
        assert accuracy(logits, labels) == pytest.approx(acc, abs=1.5 / 300)


def test_swag_snapshot_count_follows_every_steps_and_start(swa_run):
    swag = verified_load(swa_run.dir / "swag.pt")
    expected = _expected_snapshots(swa_run, 6)
    assert expected == 10  # 9 steps per epoch, steps 36..54 (from epoch 3 + 1 of anneal), every 2nd
    assert swag["n"] == expected
    assert swag["rank"] == 5 and swag["deviations"].shape[0] == 5
    _, rows = _metrics(swa_run.dir)
    assert [int(r["swa_snapshots"]) for r in rows] == [
        _expected_snapshots(swa_run, e) for e in range(1, 7)
    ]
    assert [int(r["swa_snapshots"]) for r in rows][:3] == [0, 0, 0]
    # the SWA weights are the SWAG mean (both average the same snapshots)
    swa_vec = flatten_parameters(_model(swa_run, "swa")).double()
    assert swag["mean"].shape == swa_vec.shape
    assert (swa_vec - swag["mean"]).abs().max() < 1e-5
    assert (swa_vec - flatten_parameters(_model(swa_run, "final")).double()).abs().max() > 1e-3


def test_swa_batchnorm_was_re_estimated(swa_run):
    final = verified_load(swa_run.dir / "model_final.pt")
    swa = verified_load(swa_run.dir / "model_swa.pt")
    spe = _steps_per_epoch(swa_run)
    bn_batches = math.ceil(_n_train(swa_run) / swa_run.cfg.optim.batch_size)  # keeps the last
    tracked = {k for k in final if k.endswith("num_batches_tracked")}
    assert tracked
    # training counted every step; the SWA model's statistics come from one fresh pass
    assert {int(final[k]) for k in tracked} == {6 * spe}
    assert {int(swa[k]) for k in tracked} == {bn_batches}
    diffs = [float((final[k] - swa[k]).abs().max()) for k in _bn_stats(final)]
    assert max(diffs) > 1e-2
    # recomputing the statistics for the SWA weights lands near the saved ones, not the final's
    cfg = swa_run.cfg
    loaders = make_loaders(cfg, build_data(cfg), make_runtime("cpu", "fp32", cfg.channels_last))
    model = copy.deepcopy(_model(swa_run, "swa"))
    idx = np.random.default_rng(123).permutation(len(loaders["train"].ds))
    refresh_bn(model, loaders["train"].batches(idx))
    fresh = model.state_dict()
    assert _median_rel_diff(swa, fresh) < 0.5 * _median_rel_diff(final, fresh)


def test_run_without_swa_saves_no_swa_artefacts(plain_run):
    d = plain_run.dir
    assert (d / "model_final.pt").is_file()
    assert not (d / "model_swa.pt").exists() and not (d / "swag.pt").exists()
    stage1 = json.loads((d / "stage1.json").read_text())
    assert "final" in stage1 and "swa" not in stage1
    assert json.loads((d / "run.json").read_text())["swa_start_epoch"] is None
    _, rows = _metrics(d)
    assert len(rows) == 3 and {r["swa_snapshots"] for r in rows} == {"0"}


# ------------------------------------------------------------------ refusals
def test_resume_with_a_different_config_is_refused_naming_the_key(swa_run):
    before = _dir_state(swa_run.dir)
    cfg = load_config("digits_lt", [*swa_run.overrides, "optim.lr=0.05"])
    with pytest.raises(LongtailError, match="different config") as e:
        Stage1(cfg, swa_run.dir, resume=True)
    msg = str(e.value)
    assert "optim.lr: 0.1 != 0.05" in msg
    assert "optim.epochs" not in msg and "swa." not in msg  # only the key that differs
    assert _dir_state(swa_run.dir) == before


def test_resume_accepts_a_changed_mutable_key_and_restores_the_state(swa_run):
    before = _dir_state(swa_run.dir)
    cfg = load_config("digits_lt", [*swa_run.overrides, "stage2.epochs=7", "data.num_workers=1"])
    s = Stage1(cfg, swa_run.dir, resume=True)
    assert (s.epoch, s.step_in_epoch) == (6, 0)
    assert s.global_step == 6 * _steps_per_epoch(swa_run)
    assert s.swag.n == _expected_snapshots(swa_run, 6) == 10
    final = verified_load(swa_run.dir / "model_final.pt")
    assert all(torch.equal(v, final[k]) for k, v in s.model.state_dict().items())
    assert _dir_state(swa_run.dir) == before  # constructing does not write


def test_check_batch_size_refuses_exactly_the_batches_that_give_no_step():
    """``check_batch_size`` (run by fit before it writes, and by Stage1) against what stage 1
    computes: each process's draws per epoch (the sampler) in full batches (the loader, the last
    partial batch dropped). Guards: the early check drifting from the real step count, which
    would refuse a working batch or let an empty epoch through."""
    splits = prepare_data("digits", imbalance=10, val_per_class=5)
    for n in (1, 7, 16, 23):
        ds = splits.train.subset(np.arange(n))
        for world in (1, 2, 3):
            for batch in range(world, 40, world):
                sampler = make_sampler("instance", ds.labels.numpy(), world_size=world)
                loader = BatchLoader(ds, batch // world)
                steps = loader.num_batches(len(sampler), drop_last=True)
                if steps:
                    assert check_batch_size(batch, world, n) == batch // world
                else:
                    with pytest.raises(LongtailError, match=f"exceeds the {n} training") as e:
                        check_batch_size(batch, world, n)
                    most = int(str(e.value).rsplit("optim.batch_size=", 1)[1].split()[0])
                    assert most % world == 0 and 0 < most < batch
                    assert loader.num_batches(len(sampler), drop_last=True) == 0
                    ok = BatchLoader(ds, most // world).num_batches(len(sampler), drop_last=True)
                    assert ok >= 1  # the value the message suggests works
        with pytest.raises(LongtailError, match="divisible by the 3 processes.*batch_size=6"):
            check_batch_size(8, 3)


def test_new_run_into_an_existing_run_directory_is_refused(swa_run):
    before = _dir_state(swa_run.dir)
    with pytest.raises(LongtailError, match="already holds a training run") as e:
        Stage1(swa_run.cfg, swa_run.dir)
    assert "--resume" in str(e.value)
    assert _dir_state(swa_run.dir) == before


def test_nan_loss_stops_with_epoch_step_lr_and_keeps_checkpoints(tmp_path):
    out = tmp_path / "diverge"
    over = [
        "device=cpu",
        "precision=fp32",
        "optim.epochs=2",
        "optim.lr=1e30",
        "checkpoint_every_steps=1",
        "swa.enabled=false",
    ]
    cfg = load_config("digits_lt", over)
    with pytest.raises(LongtailError) as e:
        Stage1(cfg, out).fit()
    msg = str(e.value)
    # step 1 is computed with the initial weights; its update (lr ~5e28) blows them up
    m = re.search(r"loss became (\S+) at epoch 1, step 2 \(lr (\S+)\)", msg)
    assert m, msg
    assert not math.isfinite(float(m.group(1)))
    spe = 584 // 64
    want = lr_at(2 / spe, 1e30, 2, warmup_epochs=cfg.optim.warmup_epochs, schedule="cosine")
    assert float(m.group(2)) == pytest.approx(want, rel=1e-3)
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["ckpt-0000-0000001.pt"]
    assert str(ckpts[0]) in msg and "intact" in msg
    state = verified_load(ckpts[0])  # checksum still matches
    assert state["global_step"] == 1
    weights = [v for v in state["model"].values() if v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)
    assert not (out / "model_final.pt").exists() and not (out / "stage1.json").exists()


# ------------------------------------------------------------------ the SGD baseline's branch
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return verified_load(run / "model_final.pt")


def test_sgd_baseline_branched_off_the_swa_run_equals_one_trained_from_the_start(swa_run, tmp_path):
    """The SGD baseline of ``sweep`` (SWA off, same cosine schedule) continued from the SWA run's
    ``branch.pt`` at the end of epoch ``swa.start`` ends bit for bit where the baseline trained
    from epoch 0 ends, with the same metrics rows, in half the epochs here. Guards: a branch
    saved one epoch late or early, a random stream or the optimiser's momentum not carried
    over, the metrics of the shared epochs missing."""
    cfg = load_config("digits_lt", [*swa_run.overrides, *SGD_BASELINE])
    assert diff_configs(swa_run.cfg, cfg) == ["swa.enabled: True != False"]
    branch = verified_load(swa_run.dir / "branch.pt")
    assert (branch["epoch"], branch["step_in_epoch"]) == (swa_run.cfg.swa.start, 0)
    assert branch["swag"] is None and branch["swa_model"] is None  # not needed: not stored
    Stage1(cfg, tmp_path / "scratch").fit()
    trainer = Stage1(cfg, tmp_path / "branched", branch_from=swa_run.dir)
    assert trainer.epoch == swa_run.cfg.swa.start
    trainer.fit()
    scratch, branched = _weights(tmp_path / "scratch"), _weights(tmp_path / "branched")
    assert scratch.keys() == branched.keys()
    for k in scratch:
        assert torch.equal(scratch[k], branched[k]), k
    rows = [
        list(csv.DictReader((tmp_path / r / "metrics.csv").read_text().splitlines()))
        for r in ("scratch", "branched")
    ]
    assert len(rows[0]) == cfg.optim.epochs
    for a, b in zip(*rows, strict=True):
        assert (a["epoch"], a["lr"], a["train_loss"]) == (b["epoch"], b["lr"], b["train_loss"])
    info = json.loads((tmp_path / "branched" / "run.json").read_text())
    assert info["branched_from"] == {"run": str(swa_run.dir), "epoch": swa_run.cfg.swa.start}
    assert not (tmp_path / "scratch" / "branch.pt").exists()  # no SWA, no branch point


def test_branching_off_a_run_trained_differently_is_refused(swa_run, tmp_path):
    """A branch needs the source's epochs before ``swa.start`` to be this run's: another lr, or
    an SWA that starts before the branch point, is refused with the keys named, and nothing is
    trained."""
    other = load_config("digits_lt", [*swa_run.overrides, *SGD_BASELINE, "optim.lr=0.05"])
    with pytest.raises(LongtailError, match=r"optim\.lr: 0\.1 != 0\.05"):
        Stage1(other, tmp_path / "a", branch_from=swa_run.dir)
    early = load_config("digits_lt", [*swa_run.overrides, "swa.start=2"])
    with pytest.raises(LongtailError, match=r"swa\.start \(epoch 2\) comes before"):
        Stage1(early, tmp_path / "b", branch_from=swa_run.dir)
    plain = load_config("digits_lt", [*swa_run.overrides, *SGD_BASELINE])
    with pytest.raises(LongtailError, match=r"has no branch\.pt"):
        Stage1(plain, tmp_path / "c", branch_from=tmp_path / "a")
    assert not RunDir(tmp_path / "a").started and not RunDir(tmp_path / "b").started
