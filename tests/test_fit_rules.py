"""``longtail fit``'s documented formulas, value by value (docs/METHODS.md, "Your own data").

test_fit_predict.py checks the direction of the rules (smaller data -> more regularisation);
here each formula is recomputed from its documented text for sizes on both sides of every
clamp and threshold. The data step runs on tiny generated images (no training).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.fit.images import Header
from longtail.fit.ingest import prepare_user_data
from longtail.fit.plan import plan_input, recipe


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@pytest.mark.parametrize("n", [20, 100, 333, 1000, 2999, 4999, 5000, 12_345, 50_000, 300_000])
def test_recipe_follows_the_documented_formulas(n: int):
    """Guards: any formula drifting from METHODS.md / plan.py (batch, lr, epochs, warm-up,
    loss, mixup and weight-decay threshold, SWA start and lr, snapshot interval, stage-2 batch)."""
    plan = plan_input([Header(32, 32, "RGB")] * 4)
    r = recipe(n, plan)
    o = r["optim"]
    batch = min(_clamp(2 ** math.floor(math.log2(n / 10)), 16, 128), n)
    epochs = _clamp(math.ceil(100_000 / n), 30, 200)
    assert (o["batch_size"], o["epochs"]) == (batch, epochs)
    assert o["lr"] == pytest.approx(0.1 * batch / 128)
    assert o["warmup_epochs"] == pytest.approx(min(5, epochs / 10))
    assert o["nesterov"] is True and o["schedule"] == "cosine"
    small = n < 5000
    assert o["weight_decay"] == (5e-4 if small else 2e-4)
    assert r["loss"]["mixup_alpha"] == (0.2 if small else 0.0)
    assert (r["loss"]["name"], r["loss"]["tau"]) == ("logit_adjusted", 1.0)  # at every size
    start = math.floor(0.75 * epochs + 0.5) if (0.75 * epochs) % 1 != 0.5 else None
    if start is not None:  # x.5 is left to Python's round(); none of the cases above hits it
        assert r["swa"]["start"] == start
    assert r["swa"]["lr"] == pytest.approx(o["lr"] / 10)
    averaged = epochs - r["swa"]["start"]
    steps = n // batch
    if averaged >= 10:
        assert r["swa"]["every_steps"] == 0  # one snapshot per epoch
    else:
        every = r["swa"]["every_steps"]
        assert every == max(1, averaged * steps // 20)
        if every > 1:  # "about 20 snapshots in all"
            assert 20 <= averaged * steps // every < 40
    assert r["stage2"]["batch_size"] == _clamp(2 ** math.floor(math.log2(n / 4)), 32, 512)


def test_recipe_for_fine_tuning_uses_a_tenth_of_the_learning_rate(tmp_path):
    """Guards: the 10x smaller fine-tuning learning rate (0.01 B / 128) being lost."""
    from torchvision.models import resnet as tvr

    w = tmp_path / "r10.pth"
    torch.save(tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1]).state_dict(), w)
    ft = plan_input([Header(28, 28, "L")] * 4, weights_path=str(w))
    for n in (500, 20_000):
        r = recipe(n, ft)
        assert r["optim"]["lr"] == pytest.approx(0.01 * r["optim"]["batch_size"] / 128)


def test_user_data_split_sizes_follow_floor_and_min_rules(tmp_path):
    """Per class: test = floor(0.2 n_c), validation = min(20, floor(0.2 n'_c)) of the rest
    n'_c, training = what is left; the three never share a file. Class sizes straddle every
    boundary (4: no test image; 6: one; 130: validation capped at 20). Guards: rounding
    instead of flooring, the cap applied to test, validation taken from n_c instead of n'_c."""
    counts = {"a": 4, "b": 6, "c": 13, "d": 37, "e": 130}
    rng = np.random.RandomState(0)
    for name, n in counts.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(n):
            pix = rng.randint(0, 255, (6, 6), dtype=np.uint8)
            Image.fromarray(pix).save(tmp_path / "imgs" / name / f"{j}.png")
    d = prepare_user_data(tmp_path / "imgs", tmp_path / "out", log=lambda s: None)
    assert d.classes == list(counts)
    want = {"train": [], "val": [], "test": []}
    for n in counts.values():
        test = math.floor(0.2 * n)
        val = min(20, math.floor(0.2 * (n - test)))
        want["test"].append(test)
        want["val"].append(val)
        want["train"].append(n - test - val)
    assert want["test"] == [0, 1, 2, 7, 26] and want["val"] == [0, 1, 2, 6, 20]
    for split in ("train", "val", "test"):
        assert d.splits[split].counts().tolist() == want[split], split
    # the splits are disjoint: every source image lands in exactly one (pixels identify them)
    seen = [tuple(x.flatten().tolist()) for s in d.splits.values() for x in s.images]
    assert len(seen) == len(set(seen)) == sum(counts.values())
