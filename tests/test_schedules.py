"""Learning-rate schedule ``lr_at`` (docs/METHODS.md, "Stage 1") against hand-computed values."""

from __future__ import annotations

import pytest

from longtail.train.schedules import lr_at

A = dict(rel=1e-12, abs=1e-15)

# LDAM-DRW: lr 0.1, 200 epochs, 5-epoch warm-up, x0.01 at 160 and x0.0001 at 180 (gamma 0.01)
LDAM = dict(base_lr=0.1, epochs=200, warmup_epochs=5, schedule="step", milestones=[160, 180])


@pytest.mark.parametrize(
    ("epoch", "lr"), [(0.25, 0.005), (1.0, 0.02), (2.5, 0.05), (4.9, 0.098), (5.0, 0.1)]
)
def test_linear_warmup(epoch, lr):
    assert lr_at(epoch, **LDAM, gamma=0.01) == pytest.approx(lr, **A)


def test_warmup_floor_at_epoch_zero():
    assert lr_at(0.0, **LDAM) == pytest.approx(0.1 * 1e-3 / 5, **A)


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [(6, 0.1), (159.99, 0.1), (160, 1e-3), (179.99, 1e-3), (180, 1e-5), (200, 1e-5)],
)
def test_step_milestones_ldam_drw(epoch, lr):
    assert lr_at(epoch, **LDAM, gamma=0.01) == pytest.approx(lr, **A)


@pytest.mark.parametrize(("epoch", "lr"), [(150, 0.1), (160, 0.01), (185, 0.001)])
def test_step_gamma_compounds(epoch, lr):
    assert lr_at(epoch, **LDAM, gamma=0.1) == pytest.approx(lr, **A)


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [
        (9, 0.1 * (1 + 0.95105651629515357)),  # cos(pi/10)
        (30, 0.15),  # cos(pi/3) = 0.5
        (45, 0.1),
        (60, 0.05),
        (89, 0.1 * (1 - 0.99939082701909574)),  # cos(89pi/90)
    ],
)
def test_cosine_without_warmup(epoch, lr):
    assert lr_at(epoch, 0.2, 90, schedule="cosine") == pytest.approx(lr, rel=1e-9)


@pytest.mark.parametrize("epoch", [90, 95])
def test_cosine_ends_at_zero(epoch):
    assert abs(lr_at(epoch, 0.2, 90, schedule="cosine")) < 1e-15


@pytest.mark.parametrize(("epoch", "lr"), [(2, 0.08), (5, 0.2), (47.5, 0.1), (90, 0.0)])
def test_cosine_after_warmup_spans_remaining_epochs(epoch, lr):
    assert lr_at(epoch, 0.2, 90, warmup_epochs=5, schedule="cosine") == pytest.approx(lr, **A)


@pytest.mark.parametrize("epoch", [3, 40, 100])
def test_constant_schedule(epoch):
    assert lr_at(epoch, 0.05, 100, warmup_epochs=2, schedule="constant") == 0.05


SWA = dict(base_lr=0.1, epochs=30, schedule="constant", swa_start=10, swa_lr=0.02)


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [
        (9.5, 0.1),
        (10, 0.1),
        (11, 0.02 + 0.04 * (1 + 0.70710678118654752)),  # cos(pi/4)
        (12, 0.06),
        (13, 0.02 + 0.04 * (1 - 0.70710678118654752)),
        (14, 0.02),
        (30, 0.02),
    ],
)
def test_swa_cosine_anneal_then_constant(epoch, lr):
    assert lr_at(epoch, **SWA, swa_anneal_epochs=4) == pytest.approx(lr, **A)


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [(5, 0.05 * (1 + 0.70710678118654752)), (10, 0.05), (11, 0.03), (12, 0.01), (19, 0.01)],
)
def test_swa_anneals_from_the_cosine_value_at_swa_start(epoch, lr):
    # cosine 0.1 -> 0 over 20 epochs is 0.05 at epoch 10; anneal to 0.01 over 2 epochs
    got = lr_at(epoch, 0.1, 20, schedule="cosine", swa_start=10, swa_lr=0.01, swa_anneal_epochs=2)
    assert got == pytest.approx(lr, **A)


@pytest.mark.parametrize(("epoch", "lr"), [(170, 1e-3), (172, 0.0055), (174, 0.01), (190, 0.01)])
def test_swa_anneals_up_from_a_decayed_step_lr_and_ignores_later_milestones(epoch, lr):
    got = lr_at(epoch, **LDAM, gamma=0.01, swa_start=170, swa_lr=0.01, swa_anneal_epochs=4)
    assert got == pytest.approx(lr, **A)


@pytest.mark.parametrize(("epoch", "lr"), [(9.99, 0.1), (10, 0.02), (25, 0.02)])
def test_swa_without_anneal_switches_at_start(epoch, lr):
    assert lr_at(epoch, **SWA, swa_anneal_epochs=0) == pytest.approx(lr, **A)
