"""Stage-2 methods against independent hand computations (docs/METHODS.md, "Stage 2").

The sanity checks in test_classify.py (norms in a range, scales that differ, a KL term above
zero) pass for several wrong implementations; every test here recomputes the documented formula
in float64 NumPy (or constructs data whose right answer is known) and would fail on the bug its
docstring names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from longtail.classify import methods as M
from longtail.classify.heads import NCM_METRICS, LinearHead, NCMHead
from longtail.classify.run import Stage2
from longtail.classify.srepr import (
    bma_logits,
    choose_alpha_temperature,
    srepr_loss,
    train_srepr,
)
from longtail.config import CHOICES
from longtail.core.io import atomic_torch_save, verified_load
from longtail.fit.select import MethodScore, choose

QUIET = lambda *_: None  # noqa: E731


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    return float(-_log_softmax(logits)[np.arange(len(y)), y].mean())


def _features(n: int = 60, d: int = 5, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    z = torch.randn(n, d, generator=g) + 2.0 * torch.randn(c, d, generator=g)[y] + 0.7
    return z, y


# ------------------------------------------------------------------ NCM
def _ncm_by_hand(z: np.ndarray, y: np.ndarray, c: int, zq: np.ndarray):
    """Kang's NCM in float64: centre by the training mean, L2-normalise, average per class."""
    center = z.mean(0)
    zn = (z - center) / np.linalg.norm(z - center, axis=1, keepdims=True)
    cents = np.stack([zn[y == k].mean(0) for k in range(c)])
    q = (zq - center) / np.linalg.norm(zq - center, axis=1, keepdims=True)
    euclid = -np.sqrt(((q[:, None, :] - cents[None]) ** 2).sum(-1))
    cosine = q @ (cents / np.linalg.norm(cents, axis=1, keepdims=True)).T
    return center, cents, euclid, cosine


def test_ncm_metrics_are_the_configs_choices():
    """Guards: a metric added to the head but not accepted by the config, or the reverse."""
    assert CHOICES["stage2.ncm_metric"] == NCM_METRICS
    with pytest.raises(ValueError, match="sqeuclidean"):
        NCMHead(torch.zeros(2, 3), torch.zeros(3), "manhattan")


def test_ncm_matches_centred_normalised_class_means_and_every_metric():
    """Kang's code scores by minus the squared Euclidean distance (the default). Guards:
    centroids of raw (uncentred or unnormalised) features, a distance other than the squared
    Euclidean one by default, the plain Euclidean option lost (bundles calibrated on it must load
    unchanged), and a cosine option that ignores ``stage2.ncm_metric`` or forgets to normalise
    the centroids."""
    z, y = _features()
    zq, _ = _features(n=12, seed=1)
    center, cents, euclid, cosine = _ncm_by_hand(_np(z), y.numpy(), 4, _np(zq))
    head = M.ncm(z, y, 4)
    np.testing.assert_allclose(_np(head.center), center, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(head.centroids), cents, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(head(zq)), -(euclid**2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(M.ncm(z, y, 4, "euclidean")(zq)), euclid, rtol=1e-5, atol=1e-5)
    cos_head = M.ncm(z, y, 4, "cosine")
    np.testing.assert_allclose(_np(cos_head(zq)), cosine, rtol=1e-5, atol=1e-5)
    # the centroids are not unit vectors, so the two metrics rank differently somewhere
    assert not np.allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-3)
    assert np.abs(cosine - (1 - euclid**2 / 2)).max() > 1e-3


def test_ncm_on_augmented_views_averages_the_views_first():
    """Guards: NCM reading only the first view of a ``(V, N, d)`` bank."""
    z, y = _features()
    g = torch.Generator().manual_seed(5)
    views = torch.stack([z + 0.8 * torch.randn(z.shape, generator=g) for _ in range(3)])
    _, cents, _, _ = _ncm_by_hand(_np(views).mean(0), y.numpy(), 4, _np(z))
    np.testing.assert_allclose(_np(M.ncm(views, y, 4).centroids), cents, rtol=1e-5, atol=1e-6)
    _, first, _, _ = _ncm_by_hand(_np(views[0]), y.numpy(), 4, _np(z))
    assert np.abs(first - cents).max() > 1e-2


# ------------------------------------------------------------------ tau-norm
def test_tau_ties_in_accuracy_go_to_the_lowest_validation_nll():
    """Four validation copies of z = (log 3, 0), labels 0, 0, 0, 1; W = I / 2 (equal row norms),
    so tau only rescales the margin to log 3 * 2^(tau - 1): accuracy is 3/4 for every tau and
    the NLL is lowest where the margin is log 3 (tau = 1, mid-grid). Guards: ties broken by the
    first / last grid entry or by the higher NLL."""
    w = 0.5 * torch.eye(2)
    zv = torch.tensor([[np.log(3.0), 0.0]] * 4)
    yv = torch.tensor([0, 0, 0, 1])
    grid = [0.5, 1.0, 1.5]
    by_hand = []
    for tau in grid:
        logits = _np(zv) @ (_np(w) / 0.5**tau).T
        by_hand.append(_nll(logits, yv.numpy()))
    assert int(np.argmin(by_hand)) == 1
    head, tau, sweep = M.tau_norm(w, zv, yv, grid)
    assert [r["val_acc"] for r in sweep] == [0.75] * 3
    np.testing.assert_allclose([r["val_nll"] for r in sweep], by_hand, rtol=1e-6)
    assert tau == 1.0
    np.testing.assert_allclose(_np(head.weight), np.eye(2), rtol=1e-6)


# ------------------------------------------------------------------ cRT
def test_crt_samples_class_balanced_on_overlapping_long_tailed_classes():
    """Two 1-D Gaussians at -1 and +1 (sd 1), 1,000 head vs 20 tail examples. Balanced
    training puts the boundary near 0; instance-balanced sampling pushes it about
    log(50) / 2 = 2 into the tail class. Guards: cRT without class-balanced sampling."""
    g = torch.Generator().manual_seed(0)
    n0, n1 = 1000, 20
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    z = torch.randn(n0 + n1, 1, generator=g) + torch.where(y == 1, 1.0, -1.0).unsqueeze(1)
    head = M.crt(z, y, 2, epochs=20, lr=0.2, weight_decay=0.0, batch_size=128, seed=0)
    w, b = _np(head.weight), _np(head.bias)
    boundary = -(b[1] - b[0]) / (w[1, 0] - w[0, 0])  # where the two logits are equal
    assert w[1, 0] > w[0, 0]
    assert abs(boundary) < 0.5, boundary


def test_crt_learns_from_every_augmented_view_not_the_plain_features():
    """The plain features carry the label along axis 3; view v of three carries it along axis
    v only (the other axes are noise). A head trained on a random view per example must weigh
    axes 0, 1 and 2 alike and ignore axis 3. Guards: cRT (or ``pick_view``) reading the plain
    features, or always the same view."""
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.arange(n) % 2
    sign = torch.where(y == 1, 1.0, -1.0)
    views = torch.randn(3, n, 4, generator=g)
    for v in range(3):
        views[v, :, v] += 3 * sign
    head = M.crt(views, y, 2, epochs=10, lr=0.2, weight_decay=5e-4, batch_size=64, seed=0)
    dw = _np(head.weight[1] - head.weight[0])
    assert dw[:3].min() > 0.5 * dw[:3].max(), dw
    assert abs(dw[3]) < 0.2 * dw[:3].min(), dw
    for v in range(3):
        assert (head(views[v]).argmax(1) == y).float().mean() > 0.9, v


@pytest.fixture
def run_copy(swa_run, tmp_path) -> Path:
    """A private copy of the shared SWA run (stage-2 calls here write caches and results)."""
    return Path(shutil.copytree(swa_run.dir, tmp_path / "run"))


def test_run_feeds_the_cached_augmented_views_to_crt_and_ncm(run_copy):
    """Stage 2 with ``stage2.aug_views=2`` on the tiny run, after replacing the cached views by
    features of *another* class (class (y + 1) mod 10) for every training example: heads that
    use the views then map test features of class c to c - 1. Guards: ``Stage2.run`` passing
    the plain training features to cRT or NCM when views are requested."""
    s = Stage2(run_copy, ["stage2.aug_views=2"], log=QUIET)
    feats = s.features()
    ztr, ytr = feats["train"]
    g = torch.Generator().manual_seed(0)
    donors = []
    for _ in range(2):
        idx = torch.empty_like(ytr)
        for i, c in enumerate(ytr.tolist()):
            pool = torch.nonzero(ytr == (c + 1) % 10).squeeze(1)
            idx[i] = pool[torch.randint(len(pool), (1,), generator=g)]
        donors.append(ztr[idx])
    atomic_torch_save(torch.stack(donors), run_copy / "features" / "swa-aug2.pt")
    s.run(["crt", "ncm"])
    zt, yt = feats["test"]
    shifted = (yt - 1) % 10
    for name in ["crt", "ncm"]:
        pred = s.heads[name](zt).argmax(1)
        assert (pred == shifted).float().mean() > 0.5, name
        assert (pred == yt).float().mean() < 0.2, name


# ------------------------------------------------------------------ LWS
def test_lws_scales_start_at_one_and_take_weight_decay_as_in_kangs_code():
    """With zero features and a zero bias every logit is 0 whatever the scales, so the
    cross-entropy gradient of the scales is exactly 0: only weight decay can move them. Without
    it they stay at their documented initial value 1; with Kang et al.'s 5e-4 they shrink, all
    alike. Guards: another initial scale, weight decay dropped for the scales (as before)."""
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(90, 4)
    y = torch.arange(90) % 3
    kw = dict(epochs=3, lr=0.5, batch_size=16)
    head = M.lws(w, torch.zeros(3), z, y, weight_decay=0.0, **kw)
    assert torch.equal(head.scale.detach(), torch.ones(3))
    np.testing.assert_allclose(_np(head.weight), _np(w))
    decayed = M.lws(w, torch.zeros(3), z, y, weight_decay=5e-4, **kw).scale.detach()
    assert (decayed < 1 - 1e-4).all() and (decayed > 0.95).all()
    assert torch.allclose(decayed, decayed[0].expand(3))


def test_lws_is_a_per_class_scale_of_the_frozen_joint_logits():
    """Guards: LWS touching W or b, or scaling the features instead of each class's logit."""
    z, y = _features(n=200)
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    head = M.lws(w, b, z, y, epochs=3, lr=0.2, weight_decay=5e-4, batch_size=32)
    assert torch.equal(head.w0, w) and torch.equal(head.b0, b)
    f = _np(head.scale)
    assert np.abs(f - 1).max() > 1e-3  # it learnt something
    want = f * (_np(z) @ _np(w).T + _np(b))
    np.testing.assert_allclose(_np(head(z)), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ SRepr
def _srepr_by_hand(head, z0, bank, y, pick, alpha, t, weighting="none") -> float:
    """(1 - a) CE(g(z_pick), y) + a T^2 KL(mean_m softmax(g(z_m)/T) || softmax(g(z0)/T))."""
    w, bias = _np(head.weight), _np(head.bias)
    lm = _np(bank) @ w.T + bias  # (M, B, C)
    b = lm.shape[1]
    ce = _nll(lm[pick, np.arange(b)], y)
    teacher = np.exp(_log_softmax(lm / t)).mean(0)
    student = _log_softmax((_np(z0) @ w.T + bias) / t)
    kl = (teacher * (np.log(teacher) - student)).sum(1)
    if weighting == "confidence":
        conf = teacher.max(1)
        kl = kl * conf / conf.mean()
    return (1 - alpha) * ce + alpha * t * t * kl.mean()


@pytest.mark.parametrize(
    ("alpha", "t", "weighting"), [(0.5, 2.0, "none"), (0.3, 3.0, "confidence")]
)
def test_srepr_loss_matches_a_float64_hand_computation(alpha, t, weighting):
    """Guards: a missing (or squared-again) T^2, KL in the wrong direction, the teacher as the
    mean of logits instead of probabilities, (1 - alpha) left off the CE term, and confidence
    weights that are not normalised to mean 1."""
    g = torch.Generator().manual_seed(1)
    m, b, d, c = 4, 32, 6, 5
    z0 = torch.randn(b, d, generator=g)
    bank = z0 + 0.8 * torch.randn(m, b, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    head = LinearHead.fresh(d, c, seed=3)
    with torch.no_grad():
        head.weight.mul_(4)  # confident enough that the terms differ clearly
    loss = srepr_loss(head, z0, bank, y, alpha, t, weighting, torch.Generator().manual_seed(9))
    pick = torch.randint(0, m, (b,), generator=torch.Generator().manual_seed(9)).numpy()
    want = _srepr_by_hand(head, z0, bank, y.numpy(), pick, alpha, t, weighting)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # without T^2 the loss would move by kl_part (1 - 1 / T^2): far beyond the tolerance
    kl_part = want - _srepr_by_hand(head, z0, bank, y.numpy(), pick, 0.0, t) * (1 - alpha)
    assert kl_part * (1 - 1 / t**2) > 1e-3 * want


def test_bma_logits_are_the_log_of_the_mean_of_softmaxes():
    """Guards: averaging logits (or log-probabilities) over the SWAG samples."""
    g = torch.Generator().manual_seed(2)
    bank = 3 * torch.randn(5, 20, 6, generator=g)
    head = LinearHead.fresh(6, 4, seed=1)
    w, bias = _np(head.weight), _np(head.bias)
    probs = np.exp(_log_softmax(_np(bank) @ w.T + bias)).mean(0)
    got = _np(bma_logits(head, bank))
    np.testing.assert_allclose(got, np.log(probs), rtol=1e-5, atol=1e-6)
    mean_logits = (_np(bank) @ w.T + bias).mean(0)
    assert np.abs(np.exp(_log_softmax(mean_logits)) - probs).max() > 1e-2


def test_srepr_alpha_is_chosen_by_validation_nll(run_copy):
    """Grid (1.0, 0.3): at alpha = 1 the loss has no label term at all (the head only copies
    its own SWAG average), so its validation NLL is far worse than alpha = 0.3's. The chosen
    alpha must be 0.3, and the sweep's NLLs must be those of heads refitted here. Guards:
    choosing the first / last grid entry, the highest NLL, or ignoring the grid."""
    grid = ["stage2.srepr_alpha_grid=[1.0,0.3]", "stage2.srepr_temperature_grid=[2.0]"]
    res = Stage2(run_copy, grid, log=QUIET)
    out = res.run(["srepr"])
    info = out["methods"]["srepr"]["info"]
    feats = verified_load(run_copy / "features" / "swa.pt")
    banks = res.swag_features()
    s2 = res.cfg.stage2
    zv, yv = feats["val"]
    by_hand = {}
    for a in (1.0, 0.3):
        h = train_srepr(
            feats["train"][0],
            banks["train"][0],
            feats["train"][1],
            10,
            a,
            s2.srepr_temperature,
            s2.srepr_weighting,
            s2.srepr_epochs,
            s2.lr,
            s2.weight_decay,
            s2.batch_size,
            res.cfg.seed,
        )
        by_hand[a] = _nll(_np(h(zv)), yv.numpy())
    assert by_hand[1.0] > by_hand[0.3] + 0.3, by_hand
    assert [r["alpha"] for r in info["sweep"]] == [1.0, 0.3]
    for r in info["sweep"]:
        assert r["val_nll"] == pytest.approx(by_hand[r["alpha"]], rel=1e-4)
    assert info["alpha"] == 0.3 and info["temperature"] == 2.0
    gap, sd = (info["sweep"][0][k] for k in ("val_gap", "val_gap_sd"))
    assert gap > sd and not info["sweep"][0]["eligible"] and info["sweep"][1]["eligible"]
    assert out["methods"]["srepr"]["val"]["nll"] == pytest.approx(by_hand[0.3], rel=1e-4)
    # swag_bma is the chosen head averaged over the test banks (not over the SWA features)
    zt, yt = feats["test"]
    bma = _np(bma_logits(res.heads["srepr"], banks["test"][0]))
    assert out["methods"]["swag_bma"]["nll"] == pytest.approx(_nll(bma, yt.numpy()), rel=1e-4)
    plain = _nll(_np(res.heads["srepr"](zt)), yt.numpy())
    assert abs(out["methods"]["swag_bma"]["nll"] - plain) > 1e-3


def test_srepr_grid_rule_takes_the_lowest_nll_only_within_the_accuracy_noise():
    """Four classes of 25 validation images. A is the most accurate (2 errors); C makes as many
    errors on other images (gap 0, so within any bootstrap sd); B loses 40 % of the images
    (far outside the noise) and has the lowest NLL; D repeats C at a larger alpha. The rule
    picks C. Guards: NLL alone (B), accuracy alone (A), ties to the larger alpha (D), and the
    sweep rows not carrying the gap, its sd and the eligibility the report shows."""
    y = np.repeat(np.arange(4), 25)
    a, c, b = y.copy(), y.copy(), y.copy()
    a[[0, 30]] = 3
    c[[1, 31]] = 3
    b[:40] = (b[:40] + 1) % 4
    rows = [
        {"alpha": 0.25, "temperature": 2.0, "val_nll": 0.5, "pred": a},
        {"alpha": 0.5, "temperature": 1.0, "val_nll": 0.1, "pred": b},
        {"alpha": 0.25, "temperature": 4.0, "val_nll": 0.3, "pred": c},
        {"alpha": 0.75, "temperature": 4.0, "val_nll": 0.3, "pred": c.copy()},
    ]
    best = choose_alpha_temperature(rows, y, 4, seed=0)
    assert (best["alpha"], best["temperature"]) == (0.25, 4.0)
    assert [r["eligible"] for r in rows] == [True, False, True, True]
    assert rows[1]["val_gap"] == pytest.approx(0.40 - 0.0, abs=0.021)
    assert rows[1]["val_gap"] > 5 * rows[1]["val_gap_sd"] and rows[2]["val_gap"] == 0.0
    assert rows[2]["val_gap_sd"] > 0 and all("pred" not in r for r in rows)


def test_ncm_metric_option_reaches_the_stage2_head(run_copy):
    """``stage2.ncm_metric=cosine`` through ``Stage2.run``: the head scores by cosine
    similarity to the normalised centroids. Guards: the option not passed to ``M.ncm``."""
    s = Stage2(run_copy, ["stage2.ncm_metric=cosine"], log=QUIET)
    s.run(["ncm"])
    feats = s.features()
    (ztr, ytr), (zt, _) = feats["train"], feats["test"]
    _, _, _, cosine = _ncm_by_hand(_np(ztr), ytr.numpy(), 10, _np(zt))
    np.testing.assert_allclose(_np(s.heads["ncm"](zt)), cosine, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ fit's choice
def _score(name: str, bal: float, nll_ts: float, nll_raw: float) -> MethodScore:
    val = {"balanced_accuracy": bal, "accuracy": bal, "nll": nll_raw, "nll_ts": nll_ts}
    return MethodScore(name, 1.0, val, {})


def test_fit_choice_breaks_accuracy_ties_by_calibrated_nll():
    """Guards: ties broken by list order, by the raw (uncalibrated) NLL, or by the higher NLL;
    and a tie tolerance so loose that a real accuracy difference counts as a tie."""
    scores = [
        _score("crt", 0.8, nll_ts=0.60, nll_raw=0.40),
        _score("ncm", 0.8 + 1e-12, nll_ts=0.50, nll_raw=1.90),  # a tie up to rounding
        _score("tau", 0.7, nll_ts=0.10, nll_raw=0.10),
        _score("lws", 0.8, nll_ts=0.55, nll_raw=0.30),
    ]
    assert choose(scores).name == "ncm"
    assert choose(scores[::-1]).name == "ncm"
    scores.append(_score("joint", 0.8 + 1e-6, nll_ts=0.9, nll_raw=0.9))  # really better
    assert choose(scores).name == "joint"


def test_logit_adjustment_subtracts_tau_log_prior_and_picks_tau_on_validation():
    """Post-hoc logit adjustment (Menon et al. 2021) on real numbers: the head's logits are the
    joint classifier's minus tau * log(prior) exactly, and tau is the grid value with the best
    validation accuracy (ties: lower NLL), recomputed here in float64 with numpy."""
    g = torch.Generator().manual_seed(3)
    c, d = 4, 6
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    counts = torch.tensor([400, 100, 20, 5])
    zv = torch.randn(80, d, generator=g)
    yv = torch.arange(c).repeat(20)
    zv += 0.8 * w[yv]  # separable enough that tau matters without deciding everything
    grid = [0.0, 0.5, 1.0, 1.5, 2.0]
    head, tau, sweep = M.logit_adjust(w, b, counts, zv, yv, grid)
    log_prior = np.log(counts.numpy() / counts.numpy().sum())
    base = zv.double().numpy() @ w.double().numpy().T + b.double().numpy()
    rows = []
    for t in grid:
        lg = base - t * log_prior
        p = np.exp(lg - lg.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        acc = float((lg.argmax(1) == yv.numpy()).mean())
        rows.append((round(acc, 10), -float(-np.log(p[np.arange(len(yv)), yv.numpy()]).mean()), t))
    assert tau == max(rows)[2]
    assert [r["tau"] for r in sweep] == grid
    assert all(abs(r["val_acc"] - a) < 1e-9 for r, (a, _, _) in zip(sweep, rows, strict=True))
    expected = base - tau * log_prior
    np.testing.assert_allclose(head(zv).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert head.weight.shape == (c, d) and torch.equal(head.weight.data, w)  # one linear layer
