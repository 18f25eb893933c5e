"""`longtail fit`'s recipe search, method choice with its spread, and the re-fit on everything.

The search's arithmetic and the bootstrap are checked on numbers made here; one real search on a
Fashion-MNIST PNG tree (rung 1's schedule shortened to 2 epochs so that it runs in seconds) shows
rung 2, the choice and the re-fit end to end; the session fixture ``fitted`` (conftest.py) shows
the search over mixup with the epochs given.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fashion_images import run_main, write_tree
from longtail import fitting
from longtail.config import load_config
from longtail.core.errors import LongtailError
from longtail.evaluate.bootstrap import balanced_accuracy_of, bootstrap_gaps
from longtail.evaluate.calibration import apply_temperature, fit_temperature
from longtail.evaluate.metrics import evaluate_logits
from longtail.fit import search
from longtail.fit.ingest import pooled_for_refit, read_user_data
from longtail.fit.search import (
    Candidate,
    choose_candidate,
    long_epochs,
    measured_speed,
    overturns,
    rung1_crowds_out_rung2,
    rung2_next_fits,
    rung2_plan,
    search_default,
    short_epochs,
    survivors,
)
from longtail.fit.select import (
    MethodScore,
    balanced_temperature,
    choose,
    choose_mirror,
    score_methods,
)


def test_short_schedule_sees_about_40k_images_within_bounds():
    assert short_epochs(2096) == 20  # ceil(40,000 / 2,096) = 20
    assert short_epochs(900) == 45
    assert short_epochs(100) == 100  # at most 100
    assert short_epochs(50_000) == 20  # at least 20


def test_long_schedule_fills_what_is_left_and_no_more():
    kw = dict(short=20, seconds_per_epoch=1.5, stage2_seconds=15.0, survivors=2)
    # (750 - 3 * 15) / (1.5 * (2 + 4/3)) = 141 epochs: below the cap of 8 x 20
    assert long_epochs(seconds_left=750.0, refit_ratio=4 / 3, **kw) == 141
    # twice the time: (1500 - 45) / 5 = 291, capped at 8 x 20
    assert long_epochs(seconds_left=1500.0, refit_ratio=4 / 3, **kw) == 160
    # (300 - 45) / 5 = 51 epochs fit: between 1.5 x 20 and 8 x 20
    assert long_epochs(seconds_left=300.0, refit_ratio=4 / 3, **kw) == 51
    # fewer than 1.5 x 20 fit: no rung 2
    assert long_epochs(seconds_left=150.0, refit_ratio=4 / 3, **kw) is None
    assert long_epochs(seconds_left=10.0, refit_ratio=4 / 3, **kw) is None
    # without a re-fit the same time buys more epochs: (300 - 30) / 3 = 90
    assert long_epochs(seconds_left=300.0, refit_ratio=0.0, **kw) == 90
    assert long_epochs(seconds_left=float("inf"), refit_ratio=0.0, **kw) is None


def test_long_schedule_stops_at_the_published_200_epochs():
    # the IF 100 benchmark folder: 895 search images, E1 = ceil(40,000 / 895) = 45, so 8 E1 =
    # 360 let one run take 213-264 epochs; 200 is the cap (the published stage-1 length)
    kw = dict(short=45, seconds_per_epoch=0.8, stage2_seconds=15.0, refit_ratio=1.2)
    # one survivor: (600 - 30) / (0.8 x 2.2) = 323 epochs fit, 200 train
    assert long_epochs(seconds_left=600.0, survivors=1, **kw) == search.LONG_MAX == 200
    # below the cap the budget decides as before: (300 - 30) / 1.76 = 153
    assert long_epochs(seconds_left=300.0, survivors=1, **kw) == 153
    # two survivors would get (600 - 45) / (0.8 x 3.2) = 216, capped at 200 too: the second
    # run costs the first no epochs, so both train
    assert rung2_plan(candidates=3, seconds_left=600.0, **kw) == (2, 200)
    # with less time one run keeps its 200 where two would get (500 - 45) / 2.56 = 177
    assert rung2_plan(candidates=3, seconds_left=500.0, **kw) == (1, 200)


def test_rung2_trains_a_second_run_only_when_it_costs_the_first_no_epochs():
    # the Ice Lake Xeon of docs/RESULTS.md at IF 50: 6.2 s per epoch, 35 s per stage 2,
    # E1 = 20, re-fit on 4/3 of the images
    kw = dict(short=20, seconds_per_epoch=6.2, stage2_seconds=35.0, refit_ratio=4 / 3)
    # 600 s: one survivor gets (600 - 70) / (6.2 x 7/3) = 36 epochs (two would get 23 < 30)
    assert rung2_plan(candidates=3, seconds_left=600.0, **kw) == (1, 36)
    # 900 s: one survivor gets (900 - 70) / 14.47 = 57; two would get (900 - 105) / 20.67 =
    # 38 each: the second run would cost the default 19 epochs, so it does not train
    assert rung2_plan(candidates=3, seconds_left=900.0, **kw) == (1, 57)
    # 3,000 s: one survivor reaches the cap of 8 x 20 (202 fit), two would get 140: still one
    assert rung2_plan(candidates=3, seconds_left=3000.0, **kw) == (1, 160)
    # 3,600 s: two survivors get (3600 - 105) / 20.67 = 169, capped at 160 like the first
    assert rung2_plan(candidates=3, seconds_left=3600.0, **kw) == (2, 160)
    # never more survivors than candidates
    assert rung2_plan(candidates=1, seconds_left=3600.0, **kw) == (1, 160)
    assert rung2_plan(candidates=3, seconds_left=200.0, **kw) is None
    assert rung2_plan(candidates=0, seconds_left=3600.0, **kw) is None


def test_rung1_stops_only_when_its_next_candidate_would_rule_out_rung_2():
    kw = dict(short=20, seconds_per_epoch=6.2, stage2_seconds=35.0, refit_ratio=4 / 3)
    # after the first candidate, 740 s left (the Ice Lake fits): one survivor fits 46 epochs
    # now; after a second 160 s candidate, (580 - 70) / 14.47 = 35 epochs still fit: go on
    assert not rung1_crowds_out_rung2(
        candidates=1, candidate_seconds=160.0, seconds_left=740.0, **kw
    )
    # after the second, 580 s left: a third would leave 420 s, (420 - 70) / 14.47 = 24 < 30
    assert rung1_crowds_out_rung2(candidates=2, candidate_seconds=160.0, seconds_left=580.0, **kw)
    # when no rung 2 fits even now, another short candidate is the only use of the time
    assert not rung1_crowds_out_rung2(
        candidates=2, candidate_seconds=160.0, seconds_left=300.0, **kw
    )
    # a fast machine: room for rung 2 after every candidate
    fast = dict(kw, seconds_per_epoch=1.6, stage2_seconds=15.0)
    assert not rung1_crowds_out_rung2(
        candidates=2, candidate_seconds=50.0, seconds_left=700.0, **fast
    )


def test_rung2_stops_when_its_own_speed_says_the_refit_would_overrun():
    # IF 100 seed 0 of docs/RESULTS.md ("One fit with the change"): planned at 1.15 s per
    # epoch, the first 179-epoch rung-2 candidate ran at 1.29 (240.1 s, stage 1 231.5) and 417 s
    # of the 900 had gone; the second and the re-fit on 1,236 / 895 of the images would take
    # 240.1 + 1.381 x 231.5 + 8.6 = 568 s against 483 left (+85 s, past 5 % of 900)
    kw = dict(candidate_seconds=240.1, candidate_stage1_seconds=231.5, budget_seconds=900.0)
    assert not rung2_next_fits(seconds_left=900.0 - 417, refit_ratio=1236 / 895, **kw)
    # it ended 72 s past the budget; at 370 s the rule would let it run (predicted end 938 s)
    assert rung2_next_fits(seconds_left=900.0 - 370, refit_ratio=1236 / 895, **kw)
    # IF 50 seed 0 (la2c): 410 s gone, a 69-epoch candidate of 196 s (stage 1 180): 861 s
    assert rung2_next_fits(
        candidate_seconds=196.0,
        candidate_stage1_seconds=180.0,
        seconds_left=900.0 - 410,
        refit_ratio=2795 / 2096,
        budget_seconds=900.0,
    )
    # without a re-fit only the candidate itself has to fit
    assert rung2_next_fits(seconds_left=483.0, refit_ratio=0.0, **kw)
    assert not rung2_next_fits(seconds_left=190.0, refit_ratio=0.0, **kw)


def test_the_default_is_rung_2s_strongest_mixup_overturned_only_beyond_two_sd():
    rung1 = [Candidate("mixup0.2-e20", 0.2, 20, 1), Candidate("mixup0-e20", 0.0, 20, 1)]
    assert search_default(rung1) is None  # no long schedule: the hold-out alone decides
    a0, a1 = Candidate("mixup0-e88", 0.0, 88, 2), Candidate("mixup1-e88", 1.0, 88, 2)
    assert search_default([*rung1, a0, a1]) is a1
    assert search_default([*rung1, a0]) is a0  # mixup 1 skipped for the budget
    # IF 50 seed 1 (st2c) of docs/RESULTS.md: mixup 0 led mixup 1 by 1.95 +- 1.57 points on
    # the hold-out (gap = default - challenger < 0): within two sd, mixup 1 stays
    a0.gap = (-0.0195, 0.0157)
    assert not overturns(a0)
    a0.gap = (-0.0320, 0.0157)  # more than two sd: the hold-out overturns the default
    assert overturns(a0)
    a0.gap = (0.01, 0.02)  # behind the default
    assert not overturns(a0)


def _finalist(name: str, alpha: float, epochs: int, rung: int, pred, labels) -> SimpleNamespace:
    """A trained candidate as fitting.py keeps it: hold-out predictions and a stage 2."""
    c = Candidate(name, alpha, epochs, rung)
    c.val = {"balanced_accuracy": balanced_accuracy_of(pred, labels, 3), "nll_ts": 0.5}
    chosen = SimpleNamespace(holdout_pred=pred)
    return SimpleNamespace(
        candidate=c, chosen=chosen, holdout_labels=torch.from_numpy(labels), stage2=object()
    )


def test_choose_recipe_keeps_the_default_within_two_sd_and_frees_the_rest():
    labels = np.repeat(np.arange(3), 20)
    truth = labels.copy()

    def wrong(k: int) -> np.ndarray:  # the first k images of the rarest class misread
        p = truth.copy()
        p[40 : 40 + k] = 0
        return p

    short = _finalist("mixup0.2-e20", 0.2, 20, 1, wrong(8), labels)
    a0 = _finalist("mixup0-e88", 0.0, 88, 2, wrong(2), labels)
    a1 = _finalist("mixup1-e88", 1.0, 88, 2, wrong(4), labels)  # 2 images behind: noise
    pick, why = fitting._choose_recipe([short, a0, a1], [short, a0, a1], seed=0)
    assert pick is a1 and why.startswith("the default (rung 2's strongest mixup): mixup0-e88")
    assert "within two bootstrap sds" in why
    assert short.stage2 is None and a0.stage2 is None and a1.stage2 is not None
    # ten images behind on one class of 20: far beyond two sd, the hold-out's best wins
    short = _finalist("mixup0.2-e20", 0.2, 20, 1, wrong(8), labels)
    a0 = _finalist("mixup0-e88", 0.0, 88, 2, wrong(0), labels)
    a1 = _finalist("mixup1-e88", 1.0, 88, 2, wrong(10), labels)
    pick, why = fitting._choose_recipe([short, a0, a1], [short, a0, a1], seed=0)
    assert pick is a0 and "more than two bootstrap sds" in why and a1.stage2 is None
    # no rung 2: rung 1's best, without a default to weigh it against
    short = _finalist("mixup0.2-e20", 0.2, 20, 1, wrong(8), labels)
    pick, why = fitting._choose_recipe([short], [short], seed=0)
    assert pick is short and why == "" and short.stage2 is not None


def test_measured_speed_is_the_median_over_candidates():
    cands = [
        Candidate("a", 0.2, 20, 1, seconds=150.0, stage1_seconds=120.0),
        Candidate("b", 0.0, 20, 1, seconds=170.0, stage1_seconds=130.0),
        Candidate("c", 1.0, 20, 1, seconds=400.0, stage1_seconds=380.0),  # disturbed
    ]
    assert measured_speed(cands) == {"seconds_per_epoch": 6.5, "stage2_seconds": 30.0}


def test_bootstrap_gap_is_zero_for_the_same_predictions_and_positive_for_worse():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [40, 20, 6, 3])
    good = np.where(rng.random(len(y)) < 0.9, y, (y + 1) % 4)
    bad = np.where(rng.random(len(y)) < 0.5, y, (y + 1) % 4)
    gaps = bootstrap_gaps({"good": good, "copy": good.copy(), "bad": bad}, y, 4, n=300)
    assert gaps["good"] == (0.0, 0.0) and gaps["copy"] == (0.0, 0.0)
    mean, sd = gaps["bad"]
    full = balanced_accuracy_of(good, y, 4) - balanced_accuracy_of(bad, y, 4)
    assert abs(mean - full) < 0.05 and 0.0 < sd < mean  # a clear gap, resolved by 150 images


def _score(name: str, pred: np.ndarray, y: np.ndarray) -> MethodScore:
    bal = balanced_accuracy_of(pred, y, 3)
    return MethodScore(name, 1.0, {"balanced_accuracy": bal, "nll_ts": 0.5}, {}, pred)


def test_choose_prefers_the_simpler_method_within_the_spread_only():
    y = np.repeat(np.arange(3), [30, 10, 4])
    rng = np.random.default_rng(1)
    best = y.copy()
    best[[0, 1, 2, 3]] = 1  # four head-class images wrong
    close = y.copy()
    close[[4, 5, 6]] = 1  # three other head-class images wrong ...
    close[30] = 0  # ... and one medium-class image: worse by about a point, both ways
    behind = best.copy()
    behind[[7, 8]] = 1  # the best's mistakes and two more: worse, never better
    weak = np.where(rng.random(len(y)) < 0.4, y, (y + 1) % 3)
    # cRT is best; joint (simpler) differs both ways and is within one sd: joint wins
    scores = [_score("crt", best, y), _score("joint", close, y), _score("ncm", weak, y)]
    chosen = choose(scores, torch.from_numpy(y))
    assert chosen.name == "joint"
    by = {s.name: s for s in scores}
    assert by["crt"].gap == (0.0, 0.0)
    assert 0 < by["joint"].gap[0] <= by["joint"].gap[1]
    assert by["ncm"].gap[0] > by["ncm"].gap[1]  # far outside: never chosen
    # a simpler method that is worse on some images and better on none is never chosen
    assert choose([_score("crt", best, y), _score("joint", behind, y)], y).name == "crt"
    # without labels: the plain best
    assert choose([_score("crt", best, y), _score("joint", close, y)]).name == "crt"


def test_balanced_temperature_fits_the_pooled_hold_out_weighted_per_class():
    """The re-fit's temperature: class-balanced NLL on validation + internal test (each class's
    images weigh 1 / n_c), the figures recomputed at it, the predictions untouched."""
    torch.manual_seed(1)
    yv = torch.repeat_interleave(torch.arange(3), torch.tensor([12, 5, 3]))
    yt = torch.repeat_interleave(torch.arange(3), torch.tensor([36, 9, 3]))
    zv, zt = torch.randn(20, 4) + 2 * torch.eye(4)[yv], torch.randn(48, 4) + 2 * torch.eye(4)[yt]
    heads = {"joint": torch.nn.Linear(4, 3)}
    with torch.no_grad():  # sharp on the head class, unsure on the rare ones
        heads["joint"].weight.copy_(torch.tensor([[6.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        heads["joint"].bias.zero_()
    counts = np.array([60, 15, 6])
    [score] = score_methods(heads, {"val": (zv, yv), "test": (zt, yt)}, counts, pool_test=True)
    new = balanced_temperature(score, counts)
    with torch.no_grad():
        lh = heads["joint"](torch.cat([zv, zt]))
    yh = torch.cat([yv, yt])
    n = torch.bincount(yh).double()
    assert new.temperature == pytest.approx(fit_temperature(lh, yh, weights=1 / n[yh]), rel=1e-9)
    assert new.temperature != pytest.approx(fit_temperature(lh, yh), rel=0.05)
    assert new.temperature != pytest.approx(score.temperature, rel=0.05)
    ts = evaluate_logits(apply_temperature(lh[:20], new.temperature), yv, counts, 100, 20)
    assert new.val["ece_ts"] == pytest.approx(ts["ece"]) and new.val["nll_ts"] == pytest.approx(
        ts["nll"]
    )
    for k in ("balanced_accuracy", "accuracy", "nll"):  # do not depend on T
        assert (new.val[k], new.test[k], new.pooled[k]) == (
            score.val[k],
            score.test[k],
            score.pooled[k],
        )
    assert np.array_equal(new.holdout_pred, score.holdout_pred)
    with pytest.raises(LongtailError, match="no hold-out logits"):
        balanced_temperature(MethodScore("joint", 1.0, {}, {}), counts)


def test_validation_and_internal_test_choose_together_when_pooled():
    """``pool_test``: every method is also scored on validation + test, its hold-out
    predictions cover both, and the choice follows them; reported figures are unchanged."""
    torch.manual_seed(0)
    zv, zt = torch.randn(30, 4), torch.randn(90, 4)
    yv, yt = torch.arange(30) % 3, torch.arange(90) % 3
    heads = {"joint": torch.nn.Linear(4, 3), "crt": torch.nn.Linear(4, 3)}
    feats = {"val": (zv, yv), "test": (zt, yt)}
    counts = np.array([50, 30, 20])
    alone = score_methods(heads, feats, counts, many=40, few=25)
    both = score_methods(heads, feats, counts, many=40, few=25, pool_test=True)
    y = torch.cat([yv, yt]).numpy()
    for a, b in zip(alone, both, strict=True):
        assert a.pooled is None and a.choice is a.val and a.holdout_pred.shape == (30,)
        pred = heads[b.name](torch.cat([zv, zt])).argmax(1).numpy()
        assert np.array_equal(b.holdout_pred, pred) and b.choice is b.pooled
        assert b.pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_of(pred, y, 3))
        assert (b.val, b.test, b.temperature) == (a.val, a.test, a.temperature)
        assert b.to_json()["val_and_test"] == b.pooled and "val_and_test" not in a.to_json()

    # cRT: best on the 15 validation images; joint: two more validation mistakes, but right on
    # the 45 test images where cRT errs on a third. Validation alone picks cRT; both pick joint.
    yv, yt = np.repeat(np.arange(3), [9, 4, 2]), np.repeat(np.arange(3), [27, 12, 6])
    crt_v, joint_v = yv.copy(), yv.copy()
    joint_v[[0, 9]] = 1, 0
    crt_t, joint_t = yt.copy(), yt.copy()
    crt_t[::3] = (yt[::3] + 1) % 3

    def scores(pool: bool) -> list[MethodScore]:
        out = []
        for name, pv, pt in (("crt", crt_v, crt_t), ("joint", joint_v, joint_t)):
            val = {"balanced_accuracy": balanced_accuracy_of(pv, yv, 3), "nll_ts": 0.5}
            both = np.concatenate([pv, pt])
            ba = balanced_accuracy_of(both, np.concatenate([yv, yt]), 3)
            pooled = {"balanced_accuracy": ba, "nll_ts": 0.5} if pool else None
            out.append(MethodScore(name, 1.0, val, {}, both if pool else pv, pooled=pooled))
        return out

    assert choose(scores(False), yv).name == "crt"
    pooled = scores(True)
    assert choose(pooled, np.concatenate([yv, yt])).name == "joint"
    assert pooled[1].gap == (0.0, 0.0) and pooled[0].gap[0] > pooled[0].gap[1]


def test_mirror_averaging_is_kept_only_when_the_hold_out_says_so():
    """Kept when it loses no balanced accuracy beyond one bootstrap sd and either gains some
    or lowers the calibrated NLL; judged on the figures that choose (pooled when pooled)."""
    y = np.repeat(np.arange(3), [40, 20, 10])

    def score(wrong: list[int], nll: float, pooled_nll: float | None = None) -> MethodScore:
        pred = y.copy()
        pred[wrong] = (y[wrong] + 1) % 3
        ba = balanced_accuracy_of(pred, y, 3)
        pooled = None if pooled_nll is None else {"balanced_accuracy": ba, "nll_ts": pooled_nll}
        val = {"balanced_accuracy": ba, "nll_ts": nll}
        return MethodScore("ncm", 1.0, val, {}, pred, pooled=pooled)

    plain = score([0, 40, 60], 0.50)
    # two more images right: kept though its NLL is higher
    use, (gap, sd) = choose_mirror(plain, score([0], 0.60), y)
    assert use and gap < 0 < sd
    # one head-class image fewer right (0.8 points, within the spread) at a lower NLL: kept;
    # the same accuracy loss without an NLL gain: not kept
    use, (gap, sd) = choose_mirror(plain, score([0, 1, 40, 60], 0.45), y)
    assert use and 0 < gap <= sd
    assert not choose_mirror(plain, score([0, 1, 40, 60], 0.55), y)[0]
    # half the rare class wrong (a loss the hold-out resolves), however low its NLL: not kept
    use, (gap, sd) = choose_mirror(plain, score([0, 40, 60, 61, 62, 63, 64], 0.30), y)
    assert not use and gap > sd
    # the same predictions: only a lower NLL keeps it
    assert choose_mirror(plain, score([0, 40, 60], 0.49), y)[0]
    assert not choose_mirror(plain, score([0, 40, 60], 0.50), y)[0]
    # pooled: the pooled NLL decides, not validation's
    pooled = score([0, 40, 60], 0.50, pooled_nll=0.50)
    assert not choose_mirror(pooled, score([0, 40, 60], 0.40, pooled_nll=0.55), y)[0]


def test_pins_reproduce_the_validation_choices_and_name_what_cannot_be():
    from longtail.classify import registry
    from longtail.classify.interface import Stage2Method

    infos = {"tau": {"tau": 0.7}, "srepr": {"alpha": 0.25, "temperature": 4.0}, "logit_adjust": {}}
    assert registry.pinned(["tau"], infos) == (["stage2.tau_grid=[0.7]"], [])
    # SRepr implies its ablations; only SRepr itself chose something
    pins = ["stage2.srepr_alpha_grid=[0.25]", "stage2.srepr_temperature_grid=[4.0]"]
    assert registry.pinned(["srepr"], infos) == (pins, [])
    assert registry.pinned(["logit_adjust"], infos) == ([], ["logit_adjust"])  # info lost
    assert registry.pinned(["joint", "ncm"], infos) == ([], [])
    plug = Stage2Method("plug_val", lambda ctx: None, needs_val=True)  # chooses, no pins
    registry.register(plug)
    try:
        assert registry.pinned(["plug_val"], {}) == ([], ["plug_val"])
    finally:
        registry.unregister("plug_val")


def test_survivors_and_choice_rank_by_validation_then_epochs():
    def cand(name, alpha, epochs, bal, nll=0.5):
        return Candidate(name, alpha, epochs, 1, val={"balanced_accuracy": bal, "nll_ts": nll})

    cs = [cand("a", 0.0, 20, 0.70), cand("b", 0.2, 20, 0.80), cand("c", 1.0, 20, 0.75)]
    assert [c.name for c in survivors(cs)] == ["b", "c"]
    # IF 50 seed 1 of docs/RESULTS.md: mixup 1 ranked last after 20 epochs; it takes the
    # second place of rung 2 from mixup 0.2, the best stays first; one place: the best alone
    late = [cand("m0.2", 0.2, 20, 0.8262), cand("m0", 0.0, 20, 0.8299), cand("m1", 1.0, 20, 0.7667)]
    assert [c.name for c in survivors(late)] == ["m0", "m1"]
    assert [c.name for c in survivors(late, 1)] == ["m0"]
    assert [c.name for c in survivors(late, 3)] == ["m0", "m0.2", "m1"]
    tie = [cand("long", 0.2, 80, 0.80), cand("short", 0.2, 20, 0.80)]
    assert choose_candidate(tie).name == "short"
    assert choose_candidate([*cs, cand("d", 1.0, 80, 0.85)]).name == "d"
    # with validation and test choosing together, their pooled figures rank, not validation's
    e = Candidate("e", 0.0, 20, 1, val={"balanced_accuracy": 0.99, "nll_ts": 0.1})
    e.pooled = {"balanced_accuracy": 0.60, "nll_ts": 0.9}
    assert e.score == 0.60 and choose_candidate([*cs, e]).name == "b"


@pytest.mark.fashion_mnist
def test_pooled_data_is_every_labelled_image_but_a_given_test(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, counts=[30, 20, 12], extras=False)
    quiet = dict(log=lambda s: None)
    data = read_user_data(tree, tmp_path / "d", **quiet)
    pooled = pooled_for_refit(data, tmp_path / "all")
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert len(pooled.splits["train"]) == sum(sizes.values()) == 62
    want = torch.cat([data.splits[k].images for k in ("train", "val", "test")])
    assert torch.equal(pooled.splits["train"].images, want)
    assert torch.equal(pooled.splits["val"].images, data.splits["val"].images)
    assert pooled.splits["val"].meta["in_training"] and pooled.splits["test"].meta["in_training"]
    assert "every labelled image" in pooled.origins["train"]
    # a test folder the user gave stays out of training
    held = tmp_path / "held"
    write_tree(held, counts=[5, 5, 5], seed=3, extras=False)
    given = read_user_data(tree, tmp_path / "d2", test=held, **quiet)
    pooled = pooled_for_refit(given, tmp_path / "all2")
    assert len(pooled.splits["train"]) == len(given.splits["train"]) + len(given.splits["val"])
    assert pooled.splits["val"].meta["in_training"] and not pooled.splits["test"].meta


@pytest.mark.fashion_mnist
def test_search_halves_to_a_long_rung_then_refits_the_winner(tmp_path, capsys, monkeypatch):
    """Rung 1 (mixup 0.2 and 0, 2 epochs), its best and mixup 1 (straight from the start) for 8
    epochs (4 x rung 1, the cap), the search's default (mixup 1 at rung 2) or a candidate that
    beats it by more than two sd re-fitted on every labelled image with its method's choice."""
    monkeypatch.setattr(search, "SHORT_MIN", 2)
    monkeypatch.setattr(search, "SHORT_IMAGES", 1)
    monkeypatch.setattr(search, "LONG_FACTOR", 4)  # a short test; the cap's value: search.py
    tree = tmp_path / "tree"
    write_tree(tree, counts=[40, 24, 14], extras=False)
    out = tmp_path / "out"
    # two methods that choose tau on validation: whichever wins, its tau must be pinned
    args = ["device=cpu", "precision=fp32", "seed=3", "stage2.methods=[tau,logit_adjust]"]
    argv = ["fit", str(tree), "--out", str(out), "--budget", "60", *args]
    code, text, err = run_main(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "fit.json").read_text())
    cands = summary["candidates"]
    # mixup 1 skips rung 1: rung 2 takes it whatever a short run would score
    assert [(c["rung"], c["epochs"], c["mixup_alpha"]) for c in cands[:2]] == [
        (1, 2, 0.2),
        (1, 2, 0.0),
    ]
    assert "rung 1: mixup1-e2 not trained: the strongest mixup goes straight to rung 2" in text
    # the bundle re-fits on the internal test split too, so it chooses with validation
    holdout = [c["val_and_test"] for c in cands]
    rung1 = sorted(holdout[:2], key=lambda h: (-round(h["balanced_accuracy"], 9), h["nll_ts"]))
    best = cands[holdout.index(rung1[0])]["mixup_alpha"]
    # the strongest mixup, the search's default, trains first
    assert [(c["rung"], c["epochs"], c["mixup_alpha"]) for c in cands[2:]] == [
        (2, 8, 1.0),
        (2, 8, best),
    ]
    why = "the strongest mixup, straight from the start, and rung 1's best; default first"
    assert f"rung 2: mixup1-e8, mixup{best:g}-e8 ({why}" in text
    assert summary["skipped_candidates"] == []
    # the default, mixup 1 at rung 2, unless the hold-out's best leads it by more than two sd
    chosen = next(c for c in cands if c["name"] == summary["recipe"])
    assert chosen["gap_to_best"] == {"gap": 0.0, "std": 0.0}
    default = cands[2]
    top = max(holdout, key=lambda h: h["balanced_accuracy"])["balanced_accuracy"]
    if chosen is default:
        for c in cands:  # nothing leads it by more than two sd (gap = default - c)
            lead, sd = -c["gap_to_best"]["gap"], c["gap_to_best"]["std"]
            assert lead <= 2 * sd or c["val_and_test"]["balanced_accuracy"] < top
        assert summary["recipe_why"].startswith("the default (rung 2's strongest mixup)")
    else:
        assert chosen["val_and_test"]["balanced_accuracy"] == top
        assert default["gap_to_best"]["gap"] > 2 * default["gap_to_best"]["std"]
        assert summary["recipe_why"].startswith("the best hold-out score: it leads the default")
    assert f"* chosen: {chosen['name']} ({summary['recipe_why']}" in text
    assert "internal test" in summary["measured_on"]["recipe"]
    assert all("val_and_test" in s for s in summary["scores"])
    assert "recipe search:" in text and "rung 2:" in text and "re-fit:" in text
    # the re-fit: the chosen recipe on every labelled image, the chosen method only
    cfg = load_config(out / "run" / "config.yaml")
    assert cfg.optim.epochs == chosen["epochs"] and cfg.loss.mixup_alpha == chosen["mixup_alpha"]
    assert cfg.data.root == str(out / "data-all")
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    sizes = bundle["data"]["sizes"]
    assert sum(bundle["data"]["bundle_train_counts"]) == sum(sizes.values()) == 78
    assert sum(bundle["data"]["train_counts"]) == sizes["train"]  # the selection run's
    assert bundle["refit"] and bundle["recipe"] == chosen["name"]
    refit = json.loads((out / "run" / "results.json").read_text())
    method = bundle["method"]
    assert method in ("tau", "logit_adjust") and list(refit["methods"]) == [method]
    sel = json.loads((out / "search" / chosen["name"] / "results.json").read_text())
    tau = sel["methods"][method]["info"]["tau"]
    grid = "tau_grid" if method == "tau" else "logit_adjust_grid"
    assert bundle["pins"] == summary["pins"] == [f"stage2.{grid}=[{tau!r}]"]
    # the re-fit did not choose on its (in-sample) validation split: one value to choose from
    assert [r["tau"] for r in refit["methods"][method]["info"]["sweep"]] == [tau]
    assert refit["methods"][method]["info"]["tau"] == tau
    # the temperature is the selection run's (fitted on its hold-out), not the re-fit's: on
    # validation + internal test with class-balanced weights (stage 2's validation temperature,
    # or the mirror-averaged features', choose mirror averaging and are logged beside it)
    mirror = summary["mirror"]
    assert bundle["mirror"] == mirror and bundle["spec"]["mirror"] == mirror["used"]
    assert mirror["plain"]["temperature"] == sel["methods"][method]["ts"]["temperature"]
    t_val = mirror["mirror" if mirror["used"] else "plain"]["temperature"]
    assert f"class-balanced NLL; validation alone: {t_val:.3g})" in text
    assert f"temperature: {bundle['temperature']:.3g} (validation + internal test" in text
    assert "class-balanced" in bundle["measured_on"]["temperature"]
    assert ("mirror-averaged" in text) == mirror["used"]
    # fit resumes nothing: no run it finished keeps its training checkpoints
    assert not list(out.rglob("ckpt-*"))
    assert all((out / "search" / c["name"] / "stage1.json").is_file() for c in cands)


@pytest.mark.fashion_mnist
def test_no_refit_bundles_the_selection_run(tmp_path, capsys):
    tree = tmp_path / "tree"
    write_tree(tree, counts=[20, 12, 8], extras=False)
    out = tmp_path / "out"
    args = ["device=cpu", "precision=fp32", "optim.epochs=1", "loss.mixup_alpha=0"]
    code, _, err = run_main(["fit", str(tree), "--out", str(out), "--no-refit", *args], capsys)
    assert code == 0, err
    summary = json.loads((out / "fit.json").read_text())
    assert not summary["refit"] and summary["searched"] == []
    assert summary["run_dir"] == summary["selection_run_dir"] == str(out / "search" / "mixup0-e1")
    # the internal test split is the bundle's only unseen data: it chooses nothing
    assert (
        "val_and_test" not in summary["candidates"][0]
        and "test" not in summary["measured_on"]["recipe"]
    )
    assert not (out / "run").exists() and not (out / "data-all").exists()


def _two_epoch_search(tmp_path, capsys, monkeypatch, budget: str) -> tuple[dict, str]:
    """``fit --no-refit`` of a 40-image tree with rung 1 at 2 epochs: (fit.json, stdout)."""
    monkeypatch.setattr(search, "SHORT_MIN", 2)
    monkeypatch.setattr(search, "SHORT_IMAGES", 1)
    tree = tmp_path / "tree"
    write_tree(tree, counts=[20, 12, 8], extras=False)
    out = tmp_path / "out"
    args = ["device=cpu", "precision=fp32", "stage2.methods=[joint,ncm]"]
    argv = ["fit", str(tree), "--out", str(out), "--budget", budget, "--no-refit", *args]
    code, text, err = run_main(argv, capsys)
    assert code == 0, err
    return json.loads((out / "fit.json").read_text()), text


@pytest.mark.fashion_mnist
def test_a_tight_budget_runs_one_candidate_and_says_so(tmp_path, capsys, monkeypatch):
    """A budget smaller than one candidate: the plan's default (mixup 0.2) still runs, the other
    rung-1 candidates are skipped, no long schedule; all of it printed and in fit.json."""
    summary, text = _two_epoch_search(tmp_path, capsys, monkeypatch, "0.001")
    assert [c["name"] for c in summary["candidates"]] == ["mixup0.2-e2"]
    assert summary["skipped_candidates"] == ["mixup0-e2", "mixup1-e2"]
    assert summary["searched"] == []  # nothing was compared
    assert "note: the budget (0.001 min) is smaller than one candidate" in text
    assert "budget: candidate mixup0-e2 skipped" in text and "budget: no long schedule" in text


@pytest.mark.fashion_mnist
def test_rung1_gives_way_to_a_long_schedule_with_the_speed_it_measured(
    tmp_path, capsys, monkeypatch
):
    """When another rung-1 candidate would crowd out rung 2, rung 1 stops and its best goes on
    to the long schedule (with the strongest mixup, which skips rung 1). The decision is made
    with the speed the first candidate measured (checked here against fit.json); the budget
    rule itself is tested above."""
    from longtail import fitting

    monkeypatch.setattr(search, "LONG_FACTOR", 2)
    asked = []

    def crowded(**kw):  # this machine's timing would make the outcome depend on its speed
        asked.append(kw)
        return True

    monkeypatch.setattr(fitting, "rung1_crowds_out_rung2", crowded)
    summary, text = _two_epoch_search(tmp_path, capsys, monkeypatch, "60")
    # mixup 1 is not a rung-1 candidate: rung 2 (room for two here) takes it, the search's
    # default, first, then rung 1's best
    assert [(c["name"], c["rung"]) for c in summary["candidates"]] == [
        ("mixup0.2-e2", 1),
        ("mixup1-e4", 2),
        ("mixup0.2-e4", 2),
    ]
    assert summary["skipped_candidates"] == ["mixup0-e2"]
    assert "budget: candidate mixup0-e2 skipped (with it, no long schedule" in text
    first = summary["candidates"][0]
    assert len(asked) == 1 and asked[0]["candidates"] == 1 and asked[0]["refit_ratio"] == 0.0
    assert asked[0]["seconds_per_epoch"] == pytest.approx(first["stage1_seconds"] / 2)
    assert asked[0]["stage2_seconds"] == pytest.approx(first["seconds"] - first["stage1_seconds"])
    assert asked[0]["candidate_seconds"] == pytest.approx(first["seconds"])
    assert 0 < asked[0]["seconds_left"] < 3600


@pytest.mark.fashion_mnist
def test_rung2_measures_its_own_speed_before_each_further_candidate(tmp_path, capsys, monkeypatch):
    """After the first rung-2 candidate the search asks, with that candidate's own seconds,
    whether the next one and the re-fit still fit; when not, it skips it, says so and records
    it, and the fit goes on with what it trained."""
    from longtail import fitting

    monkeypatch.setattr(search, "LONG_FACTOR", 2)
    monkeypatch.setattr(fitting, "rung1_crowds_out_rung2", lambda **kw: False)
    monkeypatch.setattr(fitting, "rung2_plan", lambda **kw: (2, 4))  # this machine's speed aside
    asked = []

    def slowed(**kw):
        asked.append(kw)
        return False

    monkeypatch.setattr(fitting, "rung2_next_fits", slowed)
    summary, text = _two_epoch_search(tmp_path, capsys, monkeypatch, "60")
    cands = summary["candidates"]
    assert [c["rung"] for c in cands] == [1, 1, 2]
    first = cands[2]
    rung1 = sorted(
        cands[:2], key=lambda c: (-round(c["val"]["balanced_accuracy"], 9), c["val"]["nll_ts"])
    )
    # the search's default (the strongest mixup) goes first, so the measured speed rules out
    # rung 1's best, the challenger; the default is what the fit then deploys
    assert first["name"] == "mixup1-e4"
    skipped = f"mixup{rung1[0]['mixup_alpha']:g}-e4"
    assert summary["skipped_candidates"] == [skipped]
    assert f"budget: candidate {skipped} skipped (rung 2 ran at" in text
    assert len(asked) == 1 and asked[0]["refit_ratio"] == 0.0  # --no-refit
    assert asked[0]["candidate_seconds"] == pytest.approx(first["seconds"])
    assert asked[0]["candidate_stage1_seconds"] == pytest.approx(first["stage1_seconds"])
    assert asked[0]["budget_seconds"] == 3600.0 and 0 < asked[0]["seconds_left"] < 3600
    assert summary["recipe"] == "mixup1-e4" or summary["recipe_why"].startswith("the best hold")


@pytest.mark.fashion_mnist
def test_the_plan_that_sends_the_strongest_mixup_straight_to_rung_2_is_the_one_it_runs(
    tmp_path, capsys, monkeypatch
):
    """Mixup 1 skips rung 1 on a plan with two places in rung 2; rung 2 runs that plan (asked
    once, with mixup 1 counted), not a second one made a moment later. The budget is then
    guarded, as for any second rung-2 run, by rung2_next_fits (tested above)."""
    from longtail import fitting

    monkeypatch.setattr(search, "LONG_FACTOR", 2)
    monkeypatch.setattr(fitting, "rung1_crowds_out_rung2", lambda **kw: False)
    asked, plans = [], iter([(2, 4), (1, 4)])  # a second plan, if asked, would drop mixup 1

    def plan(**kw):
        asked.append(kw)
        return next(plans)

    monkeypatch.setattr(fitting, "rung2_plan", plan)
    summary, text = _two_epoch_search(tmp_path, capsys, monkeypatch, "60")
    cands = summary["candidates"]
    assert [(c["rung"], c["mixup_alpha"]) for c in cands[:2]] == [(1, 0.2), (1, 0.0)]
    best = max(cands[:2], key=lambda c: (c["val"]["balanced_accuracy"], -c["val"]["nll_ts"]))
    assert [(c["rung"], c["name"]) for c in cands[2:]] == [
        (2, "mixup1-e4"),
        (2, f"mixup{best['mixup_alpha']:g}-e4"),
    ]
    assert len(asked) == 1 and asked[0]["candidates"] == 3
    assert summary["skipped_candidates"] == []
    assert "rung 1: mixup1-e2 not trained: the strongest mixup goes straight to rung 2" in text
    why = "the strongest mixup, straight from the start, and rung 1's best; default first"
    assert f"rung 2: mixup1-e4, mixup{best['mixup_alpha']:g}-e4 ({why};" in text


@pytest.mark.fashion_mnist
def test_a_long_run_alone_when_a_second_would_cost_it_epochs(tmp_path, capsys, monkeypatch):
    """With a plan of one place in rung 2, mixup 1 still skips rung 1 and trains the long
    schedule alone; rung 1's candidates challenge it from the short schedule, and the fit
    deploys it unless one of them leads it by more than two bootstrap sds."""
    from longtail import fitting

    monkeypatch.setattr(search, "LONG_FACTOR", 2)
    monkeypatch.setattr(fitting, "rung1_crowds_out_rung2", lambda **kw: False)
    monkeypatch.setattr(fitting, "rung2_plan", lambda **kw: (1, 4))
    summary, text = _two_epoch_search(tmp_path, capsys, monkeypatch, "60")
    cands = summary["candidates"]
    assert [(c["rung"], c["name"]) for c in cands] == [
        (1, "mixup0.2-e2"),
        (1, "mixup0-e2"),
        (2, "mixup1-e4"),
    ]
    assert summary["skipped_candidates"] == []
    assert "rung 1: mixup1-e2 not trained: the strongest mixup goes straight to rung 2" in text
    assert "rung 2: mixup1-e4 (the strongest mixup, straight from the start, alone:" in text
    default = cands[2]
    if summary["recipe"] == "mixup1-e4":
        assert summary["recipe_why"].startswith("the default (rung 2's strongest mixup)")
        for c in cands[:2]:  # gap = default - c: no lead beyond two sds
            assert -c["gap_to_best"]["gap"] <= 2 * c["gap_to_best"]["std"]
    else:
        assert default["gap_to_best"]["gap"] > 2 * default["gap_to_best"]["std"]
        assert summary["recipe_why"].startswith("the best hold-out score: it leads the default")


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan"])
def test_budget_must_be_positive(tmp_path, capsys, bad):
    code, _, err = run_main(
        ["fit", str(tmp_path), "--out", str(tmp_path / "o"), "--budget", bad], capsys
    )
    assert code == 2 and f"--budget {float(bad):g}:" in err
    assert not (tmp_path / "o").exists()


def test_fit_and_classify_packages_do_not_load_the_training_loop():
    """``fit/`` and ``classify/`` import nothing of ``train/loop.py`` (the loop is reached only
    from ``longtail.fitting``, ``longtail.sweep`` and the CLI, above them)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import longtail.fit as F, longtail.classify as C\n"
        "for pkg in (F, C):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "print(sorted(k for k in sys.modules if k.startswith('longtail.train')))\n"
        "import longtail.fitting\n"
        "print('longtail.train.loop' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, fitting_loads_loop = r.stdout.strip().splitlines()
    assert "longtail.train.loop" not in loaded, loaded
    assert fitting_loads_loop == "True"  # the check can fail: the orchestrator does load it


def test_old_import_path_names_the_new_one():
    import longtail.fit

    with pytest.raises(ImportError, match="from longtail.fitting import fit"):
        longtail.fit.fit  # noqa: B018
    with pytest.raises(ImportError, match="moved to longtail.fitting.fit"):
        from longtail.fit import fit  # noqa: F401


def test_leak_check_passes_only_splits_declared_part_of_training(tmp_path):
    """File-backed user splits sharing images with training: refused, unless the split file
    says ``in_training`` (what the re-fit writes), which survives saving and loading."""
    from dataclasses import replace

    from longtail.core.errors import LongtailError
    from longtail.data.datasets import ImageDataset
    from longtail.data.prepare import prepare_data
    from longtail.data.user import save_user_split

    paths = [str(tmp_path / f"{i}.png") for i in range(6)]
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    train = ImageDataset(labels=labels, classes=["a", "b"], paths=paths, name="user")
    test = train.subset([0, 3])
    for split, ds in (("train", train), ("val", test), ("test", test)):
        save_user_split(ds, tmp_path / "d", split)
    with pytest.raises(LongtailError, match="also in the training split"):
        prepare_data("user", root=str(tmp_path / "d"))
    flagged = replace(test, meta={"in_training": True})
    for split in ("val", "test"):
        save_user_split(flagged, tmp_path / "d", split)
    splits = prepare_data("user", root=str(tmp_path / "d"))
    assert splits.test.meta == {"in_training": True} and len(splits.train) == 6
