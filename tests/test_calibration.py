"""Tests for longtail.evaluate.calibration (temperature scaling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from longtail.evaluate.calibration import (
    T_MAX,
    T_MIN,
    apply_temperature,
    class_balanced_weights,
    fit_temperature,
)
from longtail.evaluate.metrics import accuracy, expected_calibration_error, nll


def _sample(true_t: float, n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z ~ 3 N(0, 1) and labels drawn from softmax(z / true_t)."""
    gen = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / true_t, dim=1), 1, generator=gen).squeeze(1)
    return z, y


def test_recovers_known_temperature() -> None:
    z, y = _sample(2.0, 20_000, 10, seed=0)
    assert fit_temperature(z, y) == pytest.approx(2.0, abs=0.1)


def test_recovers_temperature_one_for_calibrated_logits() -> None:
    z, y = _sample(1.0, 20_000, 10, seed=1)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.05)


def _nll_in_s(z: np.ndarray, y: np.ndarray, s: float) -> tuple[float, float, float]:
    """Mean NLL of ``softmax(s z)`` (``s = 1 / T``) and its first two derivatives in ``s``."""
    a = s * z
    a = a - a.max(1, keepdims=True)
    p = np.exp(a)
    p /= p.sum(1, keepdims=True)
    zy = z[np.arange(len(y)), y]
    f = float(np.mean(np.log(np.exp(a).sum(1)) + (s * z).max(1) - s * zy))
    mean_z = (p * z).sum(1)
    return f, float(np.mean(mean_z - zy)), float(np.mean((p * z * z).sum(1) - mean_z**2))


def _independent_optimum(z: torch.Tensor, y: torch.Tensor) -> float:
    """The NLL-optimal temperature in [T_MIN, T_MAX], found without longtail's code: a dense
    float64 grid over log T, then Newton steps on s = 1 / T (the NLL is convex in s)."""
    zn, yn = z.double().numpy(), y.numpy()
    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), 201)
    s = 1.0 / math.exp(grid[int(np.argmin([_nll_in_s(zn, yn, math.exp(-g))[0] for g in grid]))])
    for _ in range(50):
        _, d1, d2 = _nll_in_s(zn, yn, s)
        s = min(max(s - d1 / d2, 1 / T_MAX), 1 / T_MIN)
    assert abs(_nll_in_s(zn, yn, s)[1]) < 1e-9  # an interior stationary point
    return 1.0 / s


@pytest.mark.parametrize(("true_t", "c", "seed"), [(0.7, 7, 2), (2.5, 3, 6), (40.0, 10, 7)])
def test_fitted_temperature_is_the_nll_minimum(true_t: float, c: int, seed: int) -> None:
    """Compared with an optimum found independently (grid + Newton in this file), never with
    calibration.py's own golden-section fallback, which ``fit_temperature`` returns whenever
    L-BFGS does worse. Guards: a wrong objective (e.g. logits multiplied by T, or a
    reparametrisation slip in ``_nll_at``) that L-BFGS and the fallback would share."""
    z, y = _sample(true_t, 2_000, c, seed=seed)
    t = fit_temperature(z, y)
    assert t == pytest.approx(_independent_optimum(z, y), rel=1e-6)
    best = nll(apply_temperature(z, t), y)
    for factor in (1.02, 1 / 1.02, 1.2, 1 / 1.2):
        assert best < nll(apply_temperature(z, t * factor), y)


def test_two_example_closed_form() -> None:
    # Four copies of logits (a, 0), labels 0, 0, 0, 1. With p = sigmoid(a / T) the NLL is
    # -(3 log p + log(1 - p)) / 4, minimised at p = 3/4, i.e. a / T = log 3, T = a / log 3.
    a = 2.0
    z = torch.tensor([[a, 0.0]] * 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    assert fit_temperature(z, y) == pytest.approx(a / math.log(3.0), rel=1e-6)


def test_clamped_to_lower_bound_when_all_correct() -> None:
    # Every example correct with a margin: NLL keeps falling as T -> 0.
    z = torch.tensor([[4.0, 0.0, 1.0], [0.0, 3.0, -1.0], [1.0, 0.0, 5.0]])
    y = torch.tensor([0, 1, 2])
    assert fit_temperature(z, y) == T_MIN == 0.05


def test_clamped_to_upper_bound_when_all_confidently_wrong() -> None:
    # The label always has the lowest logit: NLL keeps falling as T -> infinity.
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([1, 0])
    assert fit_temperature(z, y) == T_MAX == 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accepts_low_precision_logits(dtype: torch.dtype) -> None:
    z, y = _sample(2.0, 4_000, 10, seed=3)
    low = z.to(dtype)
    t_low = fit_temperature(low, y)
    assert t_low == pytest.approx(fit_temperature(low.double(), y), rel=1e-6)
    assert t_low == pytest.approx(2.0, abs=0.25)
    assert apply_temperature(low, t_low).dtype == dtype


def test_does_not_touch_input_or_graph() -> None:
    z, y = _sample(2.0, 500, 5, seed=4)
    z = z.clone().requires_grad_(True)
    before = z.detach().clone()
    fit_temperature(z, y)
    assert z.grad is None
    assert torch.equal(z.detach(), before)


def test_scaling_improves_held_out_calibration() -> None:
    # Over-confident logits (true temperature 3): fit on a validation half, check on a test half.
    z, y = _sample(3.0, 20_000, 10, seed=5)
    val, test = slice(0, 10_000), slice(10_000, None)
    t = fit_temperature(z[val], y[val])
    before = expected_calibration_error(torch.softmax(z[test], 1), y[test])
    after = expected_calibration_error(torch.softmax(apply_temperature(z[test], t), 1), y[test])
    assert before > 0.1
    assert after < 0.02
    assert nll(apply_temperature(z[test], t), y[test]) < nll(z[test], y[test])


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), "empty"),
        (torch.zeros(4, 0), torch.zeros(4, dtype=torch.int64), "empty"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64), r"\(N, C\)"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), "shape"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"\[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([[0.0, float("inf")]]), torch.tensor([0]), "NaN or infinite"),
    ],
)
def test_fit_temperature_bad_inputs(logits, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)


def test_weighted_fit_equals_the_fit_on_repeated_examples() -> None:
    """Integer weights act as repeated examples, uniform weights as none; the scale of the
    weights does not matter."""
    z, y = _sample(1.7, 300, 5, seed=4)
    reps = torch.randint(1, 5, (300,), generator=torch.Generator().manual_seed(0))
    repeated = fit_temperature(z.repeat_interleave(reps, 0), y.repeat_interleave(reps))
    assert fit_temperature(z, y, weights=reps.double()) == pytest.approx(repeated, rel=1e-6)
    assert fit_temperature(z, y, weights=0.1 * reps) == pytest.approx(repeated, rel=1e-6)
    plain = fit_temperature(z, y)
    assert fit_temperature(z, y, weights=torch.full((300,), 3.0)) == pytest.approx(plain, rel=1e-6)
    assert abs(repeated - plain) > 1e-3  # the weights did move it


def test_class_balanced_weights_fit_the_balanced_sample() -> None:
    """Weights 1 / n_c on a long-tailed sample give the temperature of the same examples
    repeated until every class has as many (here 40 / 10 / 5 -> x1 / x4 / x8)."""
    z, y = _sample(1.0, 55, 3, seed=5)
    y = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 10, 5]))
    z[torch.arange(55), y] += torch.where(y == 0, 3.0, 0.5)  # the head class is easy
    w = class_balanced_weights(y)
    assert torch.equal(w, 1.0 / torch.tensor([40.0, 10.0, 5.0], dtype=torch.float64)[y])
    reps = torch.tensor([1, 4, 8])[y]
    balanced = fit_temperature(z.repeat_interleave(reps, 0), y.repeat_interleave(reps))
    assert fit_temperature(z, y, weights=w) == pytest.approx(balanced, rel=1e-6)
    assert fit_temperature(z, y) < 0.9 * balanced  # the easy head class sharpens the plain fit


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.ones(3), r"shape \(2,\)"),
        (torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.zeros(2), "not all zero"),
        (torch.tensor([1.0, float("nan")]), "finite"),
    ],
)
def test_fit_temperature_bad_weights(weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1]), weights=weights)


def test_apply_temperature_by_hand() -> None:
    z = torch.tensor([[2.0, -4.0, 0.5]])
    torch.testing.assert_close(apply_temperature(z, 2.0), torch.tensor([[1.0, -2.0, 0.25]]))
    torch.testing.assert_close(apply_temperature(z, 0.5), torch.tensor([[4.0, -8.0, 1.0]]))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(z, bad)


@settings(max_examples=60, deadline=None)
@given(
    logits=arrays(
        np.float64,
        st.tuples(st.integers(1, 20), st.integers(2, 6)),
        elements=st.integers(-50, 50).map(float),
    ),
    t=st.floats(min_value=T_MIN, max_value=T_MAX),
    data=st.data(),
)
def test_scaling_never_changes_accuracy(logits: np.ndarray, t: float, data) -> None:
    # Integer logits keep distinct values >= 1/T_MAX apart after scaling, so no rounding can
    # create a tie; existing ties stay ties and still go to the lowest index.
    n, c = logits.shape
    labels = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    z = torch.from_numpy(logits)
    scaled = apply_temperature(z, t)
    assert torch.equal(scaled.argmax(dim=1), z.argmax(dim=1))
    assert accuracy(scaled, labels) == accuracy(z, labels)
