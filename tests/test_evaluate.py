"""Evaluation tests: every expected value is computed by hand in the test."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.evaluate import (
    disagreement,
    expected_calibration_error,
    mcnemar,
    metrics,
    paired_bootstrap,
    reliability,
)

# 4 rows, 3 classes; top-label confidences .9, .88, .5, .45 avoid the 15-bin edges (k / 15)
proba = np.array(
    [
        [0.90, 0.05, 0.05],  # y 0, right, bin 13 = (13/15, 14/15]
        [0.10, 0.88, 0.02],  # y 0, wrong (says 1), bin 13
        [0.35, 0.15, 0.50],  # y 2, right, bin 7 = (7/15, 8/15]
        [0.30, 0.25, 0.45],  # y 1, wrong (says 2), bin 6 = (6/15, 7/15]
    ]
)
y = np.array([0, 0, 2, 1])


def test_ece_by_hand():
    # bin 13: 2 rows, accuracy 1/2, confidence (.9 + .88) / 2; bin 7: 1 row, 1 vs .5;
    # bin 6: 1 row, 0 vs .45
    expected = 2 / 4 * abs(0.5 - 0.89) + 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(0 - 0.45)
    assert expected_calibration_error(proba, y) == pytest.approx(expected)
    assert metrics(proba, y)["ece"] == pytest.approx(0.4325)


def test_brier_by_hand():
    rows = [
        0.1**2 + 0.05**2 + 0.05**2,
        0.9**2 + 0.88**2 + 0.02**2,
        0.35**2 + 0.15**2 + 0.5**2,
        0.3**2 + 0.75**2 + 0.45**2,
    ]
    assert metrics(proba, y)["brier"] == pytest.approx(sum(rows) / 4)


def test_accuracy_f1_log_loss_recall_confusion_by_hand():
    m = metrics(proba, y)
    # predictions 0, 1, 2, 2 against labels 0, 0, 2, 1
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.5, 0.25])))
    assert m["confusion"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]  # rows are true classes
    assert m["per_class_recall"] == pytest.approx([1 / 2, 0, 1])
    # F1 per class: 0 -> P 1, R 1/2 -> 2/3; 1 -> 0; 2 -> P 1/2, R 1 -> 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)


def test_metrics_are_plain_python():
    m = metrics(proba, y)
    assert all(isinstance(m[k], float) for k in ("accuracy", "macro_f1", "log_loss", "brier"))
    assert isinstance(m["confusion"][0][0], int)


def test_reliability_bins():
    r = reliability(proba, y)
    assert len(r["edges"]) == 16 and len(r["count"]) == 15
    assert r["count"][13] == 2 and r["count"][7] == 1 and r["count"][6] == 1
    assert sum(r["count"]) == 4
    assert r["confidence"][13] == pytest.approx(0.89) and r["accuracy"][13] == 0.5
    assert r["confidence"][6] == pytest.approx(0.45) and r["accuracy"][6] == 0.0
    assert r["confidence"][0] is None and r["accuracy"][0] is None


def test_confidence_on_an_edge_goes_to_the_lower_bin():
    p = np.array([[0.5, 0.5], [0.75, 0.25]])
    r = reliability(p, np.array([0, 0]), n_bins=4)  # edges .25 .5 .75
    assert r["count"] == [0, 1, 1, 0]


def test_perfect_confident_predictions_are_calibrated():
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


@pytest.mark.parametrize(
    "p, labels, match",
    [
        (proba[:3], y, r"shape \(rows, classes\) = \(4"),
        (proba, np.array([0, 0, 3, 1]), r"y must lie in \[0, 3\)"),
        (proba, y.astype(float), "integer labels"),
    ],
)
def test_metrics_reject_bad_shapes(p, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics(p, labels)


# --- paired comparisons ------------------------------------------------------------------------


def two_classifiers(n: int = 2000, seed: int = 0):
    """A right with probability 0.8, B with 0.7, independently: the true difference is 0.1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    a = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 10)
    b = np.where(rng.random(n) < 0.7, labels, (labels + 1) % 10)
    return labels, a, b


def test_bootstrap_ci_contains_true_difference():
    labels, a, b = two_classifiers()
    r = paired_bootstrap(labels, a, b)
    acc = r["accuracy"]
    assert acc["diff"] == pytest.approx(np.mean(a == labels) - np.mean(b == labels))
    assert acc["ci_low"] < 0.1 < acc["ci_high"]
    assert acc["ci_low"] < acc["diff"] < acc["ci_high"]
    # sd of the difference = sqrt((.8 * .2 + .7 * .3) / 2000) = 0.0136; 95 % width ~ 0.053
    assert 0.045 < acc["ci_high"] - acc["ci_low"] < 0.062
    assert "log_loss" not in r


def test_bootstrap_is_deterministic_per_seed():
    labels, a, b = two_classifiers(n=300)
    assert paired_bootstrap(labels, a, b, seed=3) == paired_bootstrap(labels, a, b, seed=3)
    assert paired_bootstrap(labels, a, b, seed=3) != paired_bootstrap(labels, a, b, seed=4)


def test_bootstrap_log_loss_difference():
    labels = np.array([0, 1, 1, 0])
    pa = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9], [0.5, 0.5]])
    pb = np.array([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7], [0.5, 0.5]])
    r = paired_bootstrap(labels, pa.argmax(1), pb.argmax(1), pa, pb, n_boot=500)
    expected = np.mean(-np.log([0.8, 0.6, 0.9, 0.5]) + np.log([0.6, 0.5, 0.7, 0.5]))
    assert r["log_loss"]["diff"] == pytest.approx(expected)
    assert r["log_loss"]["ci_low"] <= expected <= r["log_loss"]["ci_high"]


def test_bootstrap_of_identical_classifiers_is_zero():
    labels, a, _ = two_classifiers(n=100)
    acc = paired_bootstrap(labels, a, a, n_boot=100)["accuracy"]
    assert acc == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_bootstrap_needs_both_probabilities():
    labels, a, b = two_classifiers(n=10)
    with pytest.raises(ValueError, match="both proba_a and proba_b"):
        paired_bootstrap(labels, a, b, proba_a=np.full((10, 10), 0.1))


def test_mcnemar_by_hand():
    labels = np.zeros(9, dtype=int)
    # 1 row only A right (b), 5 rows only B right (c), 2 both right, 1 both wrong
    a = np.array([0, 1, 1, 1, 1, 1, 0, 0, 1])
    b = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1])
    r = mcnemar(labels, a, b)
    assert (r["b"], r["c"]) == (1, 5)
    # two-sided exact: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * (1 + 6) / 64
    assert r["p_value"] == pytest.approx(14 / 64)


def test_mcnemar_without_discordant_rows():
    labels = np.array([0, 1, 2])
    assert mcnemar(labels, labels, labels) == {"b": 0, "c": 0, "p_value": 1.0}


def test_disagreement_by_hand():
    labels = np.array([[0, 1, 2, 0], [0, 1, 1, 0], [1, 1, 2, 2]])
    expected = np.array([[0, 1 / 4, 2 / 4], [1 / 4, 0, 3 / 4], [2 / 4, 3 / 4, 0]])
    np.testing.assert_allclose(disagreement(labels), expected)
    # probabilities give the same matrix through their argmax
    np.testing.assert_allclose(disagreement(np.eye(3)[labels]), expected)


def test_disagreement_rejects_float_labels():
    with pytest.raises(ValueError, match="integer labels"):
        disagreement(np.zeros((2, 3)))
