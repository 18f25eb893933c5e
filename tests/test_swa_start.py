"""``swa.start``: a whole epoch number or a fraction of the epochs, nothing in between."""

from __future__ import annotations

import pytest

from longtail.config import load_config
from longtail.core.errors import LongtailError
from longtail.train.schedules import swa_collect_from, swa_start_epoch


@pytest.mark.parametrize(("start", "epochs", "expected"), [(0.75, 16, 12), (10, 16, 10), (0, 4, 0)])
def test_swa_start_epoch(start: float, epochs: int, expected: int) -> None:
    cfg = load_config("digits_lt", [f"swa.start={start}", f"optim.epochs={epochs}"])
    assert swa_start_epoch(cfg) == expected


@pytest.mark.parametrize("start", ["3.5", "16", "20"])
def test_swa_start_out_of_shape_is_refused(start: str) -> None:
    cfg = load_config("digits_lt", [f"swa.start={start}", "optim.epochs=16"])
    with pytest.raises(LongtailError, match="swa.start"):
        swa_start_epoch(cfg)


def test_no_swa_means_no_start() -> None:
    assert swa_start_epoch(load_config("digits_lt", ["swa.enabled=false"])) is None


def test_snapshots_start_once_the_lr_has_reached_swa_lr(tmp_path) -> None:
    """Maddox et al. collect SWAG only at the constant SWA lr: the snapshots taken while the lr
    still anneals from the schedule's value would widen SWAG's variance. Every snapshot of a real
    Stage-1 run is taken at ``swa.lr``, from the first step whose epoch reached
    ``swa.start + swa.anneal_epochs``, and the step just before still had a higher lr."""
    from longtail.train.loop import Stage1

    overrides = [
        "optim.epochs=4",
        "optim.warmup_epochs=0",
        "swa.start=1",
        "swa.anneal_epochs=1.5",
        "swa.every_steps=1",
        "swa.swag_rank=2",
        "precision=fp32",
        "data.num_workers=0",
    ]
    cfg = load_config("digits_lt", overrides)
    stage = Stage1(cfg, tmp_path / "run")
    steps: list[tuple[float, float, bool]] = []  # (epoch reached, lr of the step, snapshot?)
    average = stage._average

    def record() -> None:
        steps[-1] = (*steps[-1][:2], True)
        average()

    stage._average = record
    real_lr = stage.lr

    def lr(epoch_float: float) -> float:
        value = real_lr(epoch_float)
        steps.append((epoch_float, value, False))
        return value

    stage.lr = lr
    stage.fit()
    taken = [s for s in steps if s[2]]
    assert taken and all(s[1] == pytest.approx(cfg.swa.lr) for s in taken)
    assert all(s[0] >= 2.5 - 1e-9 for s in taken)
    assert len(taken) == sum(1 for s in steps if s[0] >= 2.5 - 1e-9)  # every step from there on
    first = steps.index(taken[0])
    assert steps[first - 1][1] > cfg.swa.lr * 1.01  # still annealing one step before
    assert stage.swag.n == len(taken)


def test_anneal_that_ends_with_training_is_refused() -> None:
    cfg = load_config("digits_lt", ["swa.start=3", "swa.anneal_epochs=3", "optim.epochs=6"])
    with pytest.raises(LongtailError, match=r"swa.anneal_epochs=3.0 = 6.0.*lower swa.start"):
        swa_collect_from(cfg)
    assert swa_collect_from(load_config("digits_lt", ["swa.start=3", "optim.epochs=7"])) == 6.0
