"""Stage 2 on the tiny stage-1 runs of conftest.py, and the methods on synthetic features."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.classify import methods as M
from longtail.classify.heads import LinearHead
from longtail.classify.run import classify
from longtail.classify.srepr import srepr_loss
from longtail.core.errors import LongtailError
from longtail.core.io import verified_load
from longtail.evaluate.metrics import accuracy

ALL = ["joint", "ncm", "crt", "tau", "lws", "logit_adjust", "srepr", "srepr_ce", "swag_bma"]
METRICS = ["accuracy", "many", "medium", "few", "nll", "ece", "brier", "per_class"]
MIN_ACC = 0.5  # chance is 0.1; the tiny run's methods reach ~0.68-0.79


@pytest.fixture(scope="module")
def classified(swa_run):
    """``classify(run, ['all'])`` once; what it returned, wrote and logged."""
    logs: list[str] = []
    res = classify(swa_run.dir, ["all"], log=logs.append)
    saved = json.loads((swa_run.dir / "results.json").read_text())
    cache = {p.name: p.stat().st_mtime_ns for p in (swa_run.dir / "features").glob("*.pt")}
    feats = verified_load(swa_run.dir / "features" / "swa.pt")
    return SimpleNamespace(res=res, saved=saved, logs=logs, cache=cache, feats=feats)


def _joint_weight(run) -> torch.Tensor:
    return verified_load(run.dir / "model_swa.pt")["classifier.weight"].float()


# ------------------------------------------------------------------ results.json
def test_results_json_holds_every_method_with_every_metric(classified, swa_run):
    res, saved = classified.res, classified.saved
    assert saved == json.loads(json.dumps(res))  # what was returned is what was written
    assert saved["backbone"] == "swa"
    assert list(saved["methods"]) == ALL
    for name, r in saved["methods"].items():
        for k in METRICS:
            assert k in r, (name, k)
        assert len(r["per_class"]) == 10 and all(0 <= a <= 1 for a in r["per_class"])
        for k in ["nll", "ece", "brier"]:
            assert math.isfinite(r[k]) and r[k] >= 0, (name, k)
        ts = r["ts"]
        assert set(ts) == {"temperature", "nll", "ece", "brier"}, name
        assert ts["temperature"] > 0 and all(math.isfinite(v) for v in ts.values()), name
        assert 0 <= r["val"]["accuracy"] <= 1


def test_accuracies_beat_chance_and_agree_with_per_class_and_shots(classified, swa_run):
    counts = np.array(classified.saved["train_counts"])
    d = swa_run.cfg.data
    many, few = counts > d.many_shot, counts < d.few_shot
    assert many.any() and few.any() and (~many & ~few).any()
    for name, r in classified.saved["methods"].items():
        assert r["accuracy"] > MIN_ACC, (name, r["accuracy"])
        pc = np.array(r["per_class"])
        assert r["accuracy"] == pytest.approx(pc.mean())  # the test set is balanced (30 / class)
        assert r["many"] == pytest.approx(pc[many].mean())
        assert r["medium"] == pytest.approx(pc[~many & ~few].mean())
        assert r["few"] == pytest.approx(pc[few].mean())


def test_temperature_scaling_repairs_ncm_distances(classified):
    ncm = classified.saved["methods"]["ncm"]
    # NCM scores are negative distances in [-2, 0]: far too flat until a temperature is fitted
    assert ncm["ts"]["temperature"] < 0.5
    assert ncm["ts"]["nll"] < 0.8 * ncm["nll"]


def test_tau_is_chosen_on_validation_from_the_grid(classified, swa_run):
    tau = classified.saved["methods"]["tau"]
    grid = [float(t) for t in swa_run.cfg.stage2.tau_grid]
    chosen, sweep = tau["info"]["tau"], tau["info"]["sweep"]
    assert chosen in grid
    assert [s["tau"] for s in sweep] == grid
    best_acc = max(s["val_acc"] for s in sweep)
    row = next(s for s in sweep if s["tau"] == chosen)
    assert row["val_acc"] == best_acc
    assert row["val_nll"] == min(s["val_nll"] for s in sweep if s["val_acc"] == best_acc)
    assert tau["val"]["accuracy"] == pytest.approx(row["val_acc"])
    # the sweep's numbers are the validation split's, recomputed from the cached val features
    zv, yv = classified.feats["val"]
    assert len(yv) == 50
    w = _joint_weight(swa_run)
    for s in sweep:
        logits = M.tau_normalize(w, s["tau"])(zv)
        assert accuracy(logits, yv) == pytest.approx(s["val_acc"]), s


def test_lws_rescales_the_joint_weights_per_class(classified, swa_run):
    m = classified.saved["methods"]
    joint, lws = np.array(m["joint"]["weight_norm"]), np.array(m["lws"]["weight_norm"])
    assert joint == pytest.approx(_joint_weight(swa_run).norm(dim=1).numpy(), rel=1e-5)
    assert np.abs(lws - joint).max() > 1e-2
    ratio = lws / joint  # the learned scales f_i
    assert ratio.std() > 1e-2  # one scale per class, not one overall


def test_ncm_centroids_are_unit_norm_ish_and_classify_their_own_class(classified):
    ztr, ytr = classified.feats["train"]
    head = M.ncm(ztr, ytr, 10)
    norms = head.centroids.norm(dim=1)
    # Means of unit vectors: at most 1, and far above the ~1/sqrt(n) of directions spread at
    # random, because a class's features cluster. (The tiny run's least clustered class, digit
    # 1, ranges 0.47-0.97 over seeds and kernels; the other classes sit at 0.92-0.99.)
    assert ((norms > 0.3) & (norms <= 1 + 1e-5)).all(), norms
    assert norms.median() > 0.9, norms
    r = classified.saved["methods"]["ncm"]
    assert r["weight_norm"] == pytest.approx(norms.tolist(), rel=1e-5)
    means = torch.stack([ztr[ytr == c].mean(0) for c in range(10)])
    assert head(means).argmax(1).tolist() == list(range(10))
    zt, yt = classified.feats["test"]
    assert accuracy(head(zt), yt) == pytest.approx(r["accuracy"])


def test_feature_cache_is_written_once_and_reused(classified, swa_run):
    assert set(classified.cache) == {"swa.pt", "swag-M3-s0.5-bn2048-seed0.pt"}
    assert sum("cached" in line for line in classified.logs) == 2
    bank = verified_load(swa_run.dir / "features" / "swag-M3-s0.5-bn2048-seed0.pt")
    assert bank["train"][0].shape == (3, *classified.feats["train"][0].shape)
    logs: list[str] = []
    again = classify(swa_run.dir, ["joint", "ncm", "srepr"], log=logs.append)
    assert not any("cached" in line for line in logs), logs
    after = {p.name: p.stat().st_mtime_ns for p in (swa_run.dir / "features").glob("*.pt")}
    assert after == classified.cache
    assert list(again["methods"]) == ["joint", "ncm", "srepr", "srepr_ce", "swag_bma"]
    for name in again["methods"]:
        first = classified.saved["methods"][name]
        assert again["methods"][name]["accuracy"] == first["accuracy"], name
        assert again["methods"][name]["nll"] == pytest.approx(first["nll"]), name


def test_run_without_swag_skips_srepr_with_a_note(plain_run):
    logs: list[str] = []
    res = classify(plain_run.dir, ["all"], log=logs.append)
    assert res["backbone"] == "final"
    assert list(res["methods"]) == ["joint", "ncm", "crt", "tau", "lws", "logit_adjust"]
    notes = [line for line in logs if "skipping srepr" in line]
    assert len(notes) == 1 and "SWAG" in notes[0]
    assert (plain_run.dir / "features" / "final.pt").is_file()


def test_srepr_alone_without_swag_is_an_error(plain_run):
    with pytest.raises(LongtailError, match="SWAG") as e:
        classify(plain_run.dir, ["srepr"], log=lambda _: None)
    assert "swa.enabled=true" in str(e.value)


def test_unknown_method_is_an_error(swa_run):
    with pytest.raises(LongtailError, match="unknown method 'bogus'") as e:
        classify(swa_run.dir, ["joint", "bogus"], log=lambda _: None)
    assert "crt" in str(e.value) and "all" in str(e.value)


# ------------------------------------------------------------------ methods on synthetic data
def test_tau_normalize_unit_rows_at_one_and_identity_at_zero():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 8)[:, None]
    h1 = M.tau_normalize(w, 1.0)
    assert h1.bias is None
    torch.testing.assert_close(h1.weight.detach().norm(dim=1), torch.ones(7))
    h0 = M.tau_normalize(w, 0.0)
    assert h0.bias is None and torch.allclose(h0.weight, w)
    h_half = M.tau_normalize(w, 0.5)
    torch.testing.assert_close(h_half.weight.detach().norm(dim=1), w.norm(dim=1).sqrt())
    z = torch.randn(3, 5)
    torch.testing.assert_close(h1(z).detach(), z @ (w / w.norm(dim=1, keepdim=True)).t())


def test_crt_separates_linearly_separable_long_tailed_classes():
    g = torch.Generator().manual_seed(0)
    n0, n1 = 300, 12  # long-tailed
    z = torch.cat([torch.randn(n0, 8, generator=g), torch.randn(n1, 8, generator=g)])
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    z[:, 0] += torch.where(y == 1, 4.0, -4.0)  # margin 8 along the first axis
    fresh = LinearHead.fresh(8, 2, seed=0)
    head = M.crt(z, y, 2, epochs=10, lr=0.2, weight_decay=5e-4, batch_size=32, seed=0)
    assert not torch.allclose(head.weight, fresh.weight)
    pred = head(z).argmax(1)
    assert (pred == y).float().mean() >= 0.99
    assert (pred[y == 1] == 1).all()  # the tail class too


def _srepr_inputs(m: int = 4, b: int = 32, d: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(b, d, generator=g)
    bank = z0 + 0.5 * torch.randn(m, b, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    return LinearHead.fresh(d, c, seed=3), z0, bank, y


def test_srepr_loss_at_alpha_zero_is_ce_of_the_picked_samples():
    head, z0, bank, y = _srepr_inputs()
    m, b = bank.shape[:2]
    loss = srepr_loss(head, z0, bank, y, 0.0, 2.0, generator=torch.Generator().manual_seed(9))
    pick = torch.randint(0, m, (b,), generator=torch.Generator().manual_seed(9))
    assert len(set(pick.tolist())) > 1  # per-example picks
    expected = F.cross_entropy(head(bank[pick, torch.arange(b)]), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for other in [F.cross_entropy(head(z0), y), F.cross_entropy(head(bank[0]), y)]:
        assert abs(loss.item() - other.item()) > 1e-4


def test_srepr_kl_term_vanishes_when_every_bank_equals_z0():
    head, z0, _, y = _srepr_inputs()
    same = z0.expand(4, *z0.shape).clone()
    for weighting in ["none", "confidence"]:
        kl_only = srepr_loss(head, z0, same, y, 1.0, 2.0, weighting)
        assert abs(kl_only.item()) < 1e-6
        mixed = srepr_loss(head, z0, same, y, 0.3, 2.0, weighting)
        assert mixed.item() == pytest.approx(0.7 * F.cross_entropy(head(z0), y).item(), rel=1e-5)
    _, _, bank, _ = _srepr_inputs()
    assert srepr_loss(head, z0, bank, y, 1.0, 2.0).item() > 1e-4  # differing banks: KL > 0
