"""Tests for longtail.evaluate.metrics on hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.evaluate.metrics import (
    _bin_index,
    accuracy,
    brier,
    evaluate_logits,
    expected_calibration_error,
    nll,
    per_class_accuracy,
    reliability_bins,
    shot_accuracy,
)

# Four examples, three classes. Confidences 0.70, 0.75, 0.72, 0.45 with 15 bins of width 1/15:
# 0.70 * 15 = 10.5 and 0.72 * 15 = 10.8 -> bin 10; 0.75 * 15 = 11.25 -> bin 11; 0.45 * 15 = 6.75
# -> bin 6. No confidence lies on an edge.
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # label 0, pred 0: correct
        [0.15, 0.75, 0.10],  # label 2, pred 1: wrong
        [0.08, 0.20, 0.72],  # label 1, pred 2: wrong
        [0.45, 0.35, 0.20],  # label 1, pred 0: wrong
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 2, 1, 1])

# Bin 10 holds examples 0 and 2: acc 1/2, mean conf (0.70 + 0.72) / 2, weight 2/4.
# Bin 11 holds example 1: acc 0, conf 0.75, weight 1/4. Bin 6 holds example 3: acc 0, conf 0.45.
ECE_BY_HAND = abs(0.5 - (0.70 + 0.72) / 2) * 2 / 4 + abs(0 - 0.75) / 4 + abs(0 - 0.45) / 4
BRIER_BY_HAND = (
    ((0.70 - 1) ** 2 + 0.20**2 + 0.10**2)
    + (0.15**2 + 0.75**2 + (0.10 - 1) ** 2)
    + (0.08**2 + (0.20 - 1) ** 2 + 0.72**2)
    + (0.45**2 + (0.35 - 1) ** 2 + 0.20**2)
) / 4
NLL_BY_HAND = -(math.log(0.70) + math.log(0.10) + math.log(0.20) + math.log(0.35)) / 4


def test_hand_example_values() -> None:
    # The arithmetic above, checked once more. Averaging per-sample gaps without binning would
    # give (0.3 + 0.75 + 0.72 + 0.45) / 4 = 0.555 instead.
    assert math.isclose(ECE_BY_HAND, 0.405)
    assert math.isclose(BRIER_BY_HAND, 0.8412)
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(ECE_BY_HAND, abs=1e-12)
    assert brier(PROBS, LABELS) == pytest.approx(BRIER_BY_HAND, abs=1e-12)
    assert nll(PROBS.log(), LABELS) == pytest.approx(NLL_BY_HAND, abs=1e-12)
    assert accuracy(PROBS.log(), LABELS) == 0.25


def test_reliability_bins_hand_example() -> None:
    bins = reliability_bins(PROBS, LABELS)
    expected_count = np.zeros(15, dtype=np.int64)
    expected_count[[6, 10, 11]] = [1, 2, 1]
    np.testing.assert_array_equal(bins["count"], expected_count)
    assert bins["accuracy"][10] == 0.5
    assert bins["accuracy"][11] == 0.0
    assert bins["confidence"][10] == pytest.approx((0.70 + 0.72) / 2)
    assert bins["confidence"][6] == pytest.approx(0.45)
    empty = expected_count == 0
    assert np.isnan(bins["accuracy"][empty]).all()
    assert np.isnan(bins["confidence"][empty]).all()
    np.testing.assert_allclose(bins["edges"], np.arange(16) / 15)


def test_confidence_on_inner_edge_goes_to_lower_bin() -> None:
    # 4 bins: edges 0, 0.25, 0.5, 0.75, 1 are exact in binary.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.375, 0.625, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])  # first correct (conf 0.5), second wrong (conf 0.625)
    bins = reliability_bins(probs, labels, n_bins=4)
    np.testing.assert_array_equal(bins["count"], [0, 1, 1, 0])
    # (lo, hi]: 0.5 in bin 1, 0.625 in bin 2 -> (|1 - 0.5| + |0 - 0.625|) / 2.
    # Had 0.5 gone up to bin 2, both would share it: |0.5 - 0.5625| = 0.0625.
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx((0.5 + 0.625) / 2)


def test_confidence_on_inner_edge_15_bins() -> None:
    edge = np.linspace(0.0, 1.0, 16)[8]  # 8/15, the documented edge
    probs = torch.tensor([[edge, 1.0 - edge]], dtype=torch.float64)
    bins = reliability_bins(probs, torch.tensor([0]))
    assert bins["count"][7] == 1
    assert bins["count"].sum() == 1


def test_confidence_one_goes_to_last_bin() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    bins = reliability_bins(probs, torch.tensor([0, 1]))
    assert bins["count"][14] == 2
    assert bins["count"].sum() == 2
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0
    # Confidently wrong on both: gap 1 in the last bin.
    assert expected_calibration_error(probs, torch.tensor([2, 2])) == 1.0


def test_bin_index_rules() -> None:
    conf = np.array([0.0, 1e-9, 0.25, 0.25 + 1e-12, 0.5, 0.999, 1.0])
    np.testing.assert_array_equal(_bin_index(conf, 4), [0, 0, 0, 1, 1, 3, 3])


def test_ece_near_zero_for_calibrated_predictions() -> None:
    # Sample each label from the predicted distribution itself: P(correct | conf = c) = c.
    gen = torch.Generator().manual_seed(0)
    n, c = 100_000, 10
    logits = 2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    assert expected_calibration_error(probs, labels) < 0.01
    # Same labels, over-confident probabilities (temperature 0.5): ECE must be clearly positive.
    sharp = torch.softmax(logits / 0.5, dim=1)
    assert expected_calibration_error(sharp, labels) > 0.05


def test_ece_rejects_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match="softmax"):
        brier(torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([0]))  # sums to 0.8


def test_brier_extremes() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert brier(probs, torch.tensor([0])) == 0.0
    assert brier(probs, torch.tensor([3])) == 2.0  # 1^2 + 1^2, the sum form
    uniform = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert brier(uniform, torch.tensor([1])) == pytest.approx((1 - 0.25) ** 2 + 3 * 0.25**2)


def test_nll_by_hand() -> None:
    assert nll(torch.tensor([[0.0, 0.0]]), torch.tensor([0])) == pytest.approx(math.log(2))
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0]], dtype=torch.float64)
    assert nll(logits, torch.tensor([0])) == pytest.approx(-math.log(3 / 5))
    assert nll(logits, torch.tensor([2])) == pytest.approx(-math.log(1 / 5))
    # Large logits stay finite and exact: -log softmax = 1000 + log(1 + e^-1000) = 1000.
    assert nll(torch.tensor([[1000.0, 0.0]]), torch.tensor([1])) == pytest.approx(1000.0)


def test_nll_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 30.0 * torch.randn(257, 13, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 13, (257,), generator=gen)
    assert nll(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 5, generator=gen).to(dtype)
    labels = torch.randint(0, 5, (64,), generator=gen)
    exact = logits.double()  # the same (rounded) values in float64
    assert nll(logits, labels) == pytest.approx(float(F.cross_entropy(exact, labels)), rel=1e-12)
    assert accuracy(logits, labels) == float((exact.argmax(1) == labels).double().mean())
    probs = torch.softmax(exact, dim=1).to(dtype)
    assert 0.0 <= expected_calibration_error(probs, labels) <= 1.0
    assert brier(probs, labels) == pytest.approx(brier(probs.double(), labels))


def test_accepts_tensors_requiring_grad() -> None:
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 1])
    assert accuracy(logits, labels) == 0.5
    assert nll(logits, labels) == pytest.approx(
        (-math.log(math.e**2 / (math.e + math.e**2)) - math.log(1 / (math.e**3 + 1))) / 2
    )


def test_accuracy_and_per_class() -> None:
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0],  # label 0: correct
            [5.0, 0.0, 0.0, 0.0],  # label 0: correct
            [0.0, 0.0, 5.0, 0.0],  # label 0: wrong
            [0.0, 5.0, 0.0, 0.0],  # label 1: correct
            [0.0, 0.0, 0.0, 5.0],  # label 2: wrong
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 2])
    assert accuracy(logits, labels) == 3 / 5
    pc = per_class_accuracy(logits, labels, 4)
    assert pc.shape == (4,)
    assert pc.dtype == np.float64
    np.testing.assert_allclose(pc[:3], [2 / 3, 1.0, 0.0])
    assert np.isnan(pc[3])  # class 3 has no test example


def test_argmax_tie_goes_to_lowest_index() -> None:
    logits = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert accuracy(logits, torch.tensor([0, 0])) == 1.0
    assert accuracy(logits, torch.tensor([1, 1])) == 0.0


def test_per_class_rejects_wrong_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        per_class_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), 4)


def test_shot_accuracy_thresholds() -> None:
    counts = np.array([500, 101, 100, 20, 19, 5])
    per_class = np.array([0.9, 0.8, 0.6, 0.4, 0.2, 0.0])
    shots = shot_accuracy(per_class, counts)
    # > 100 many; < 20 few; 20..100 inclusive medium.
    assert shots["many"] == pytest.approx((0.9 + 0.8) / 2)
    assert shots["medium"] == pytest.approx((0.6 + 0.4) / 2)
    assert shots["few"] == pytest.approx((0.2 + 0.0) / 2)
    # Custom thresholds: many > 19, few < 6.
    shots = shot_accuracy(per_class, counts, many=19, few=6)
    assert shots["many"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.4) / 4)
    assert shots["medium"] == pytest.approx(0.2)
    assert shots["few"] == pytest.approx(0.0)


def test_shot_accuracy_empty_split_and_nan_classes() -> None:
    counts = np.array([300, 200, 50])
    per_class = np.array([0.5, np.nan, 0.25])
    shots = shot_accuracy(per_class, counts)
    assert shots["many"] == 0.5  # the NaN class (no test example) is left out
    assert shots["medium"] == 0.25
    assert math.isnan(shots["few"])  # no class with < 20 training images


def test_shot_accuracy_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        shot_accuracy(np.zeros(3), np.zeros(4))


def test_evaluate_logits_hand_example() -> None:
    logits = PROBS.log()
    counts = np.array([200, 50, 10])  # class 0 many, class 1 medium, class 2 few
    out = evaluate_logits(logits, LABELS, counts)
    assert set(out) == {"accuracy", "many", "medium", "few", "nll", "ece", "brier", "per_class"}
    assert out["accuracy"] == 0.25
    assert out["per_class"] == [1.0, 0.0, 0.0]  # class 1 both wrong; class 2 wrong
    assert (out["many"], out["medium"], out["few"]) == (1.0, 0.0, 0.0)
    assert out["nll"] == pytest.approx(NLL_BY_HAND, abs=1e-12)
    assert out["ece"] == pytest.approx(ECE_BY_HAND, abs=1e-12)
    assert out["brier"] == pytest.approx(BRIER_BY_HAND, abs=1e-12)
    for key in ("accuracy", "many", "medium", "few", "nll", "ece", "brier"):
        assert type(out[key]) is float


def test_evaluate_logits_is_strict_json_with_missing_classes() -> None:
    # Class 3 has no test example and the few split has no class with test examples.
    logits = torch.tensor(
        [
            [3.0, 0.0, 0.0, 0.0],  # label 0: correct
            [0.0, 0.0, 3.0, 0.0],  # label 1: wrong
            [0.0, 3.0, 0.0, 0.0],  # label 1: correct
            [3.0, 0.0, 0.0, 0.0],  # label 2: wrong
        ]
    )
    labels = torch.tensor([0, 1, 1, 2])
    out = evaluate_logits(logits, labels, np.array([500, 60, 40, 3]))
    assert out["per_class"] == [1.0, 0.5, 0.0, None]
    assert out["few"] is None
    assert out["many"] == 1.0
    assert out["medium"] == pytest.approx(0.25)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text)["per_class"][3] is None


def test_evaluate_logits_rejects_wrong_train_counts() -> None:
    with pytest.raises(ValueError, match="train_counts"):
        evaluate_logits(torch.zeros(2, 3), torch.tensor([0, 1]), np.array([1, 2]))


@pytest.mark.parametrize(
    "fn",
    [
        lambda: accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)),
        lambda: nll(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)),
        lambda: expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)),
        lambda: nll(torch.zeros(2, 3), torch.tensor([0, 3])),  # label out of range
        lambda: nll(torch.zeros(2, 3), torch.tensor([0, 1, 2])),  # length mismatch
        lambda: nll(torch.zeros(2, 3), torch.tensor([0.0, 1.0])),  # float labels
        lambda: nll(torch.tensor([[0.0, float("nan")]]), torch.tensor([0])),
        lambda: accuracy(torch.zeros(3), torch.tensor([0, 1, 2])),  # 1-D scores
    ],
)
def test_bad_inputs_raise(fn) -> None:
    with pytest.raises(ValueError):
        fn()
