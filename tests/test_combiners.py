"""Combiner tests in the style of scikit-learn's test_voting.py: small fixed probability arrays,
expected values computed by hand in the test, ties checked, error cases parametrized."""

from __future__ import annotations

import pickle
from typing import ClassVar

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from workbench.ensemble import (
    COMBINERS,
    EnsembleSelection,
    HardVoting,
    SoftVoting,
    TemperatureScaling,
    WeightedAverage,
    make_combiner,
)
from workbench.ensemble.rule import combiner_state, fitted_rule
from workbench.errors import ConfigError

# 3 members x 4 rows x 3 classes; member argmaxes: p1 [0 1 2 0], p2 [0 2 2 1], p3 [1 1 0 0]
p1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
p2 = np.array([[0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.3, 0.5, 0.2]])
p3 = np.array([[0.2, 0.5, 0.3], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.4, 0.3, 0.3]])
P = np.stack([p1, p2, p3])
y = np.array([0, 1, 2, 0])


def nll(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(proba[np.arange(len(labels)), labels])))


def random_members(m: int, n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c), size=(m, n)), rng.integers(0, c, size=n)


ALL = [*COMBINERS.values(), lambda: TemperatureScaling(SoftVoting())]
IDS = [*COMBINERS, "temperature"]


# --- contract shared by every combiner ---------------------------------------------------------


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_fit_returns_self_and_learns_simplex_weights(make):
    est = make()
    assert est.fit(P, y) is est
    assert est.weights_.shape == (3,) and np.all(est.weights_ >= 0)
    assert est.weights_.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])
    assert est.n_members_ == 3


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_rows_sum_to_one_and_predict_is_a_label(make):
    Pn, _ = random_members(3, 50, 4, seed=1)
    yn = np.arange(50) % 4
    est = make().fit(Pn, yn)
    proba = est.predict_proba(Pn)
    assert proba.shape == (50, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert set(est.predict(Pn)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_members_mismatch_between_fit_and_predict(make):
    est = make().fit(P, y)
    with pytest.raises(ValueError, match="P has 2 members but the combiner was fitted on 3"):
        est.predict_proba(P[:2])


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_predict_proba_is_pure(make):
    # fit is the only place learning happens: predicting new (test) rows changes no attribute
    # and writes into no input
    P_fit, y_fit = P.copy(), y.copy()
    P_fit.setflags(write=False)
    est = make().fit(P_fit, y_fit)
    learned = pickle.dumps(est)  # every attribute, nested combiners included
    P_new, _ = random_members(3, 7, 3, seed=2)
    P_new.setflags(write=False)
    first = est.predict_proba(P_new)
    est.predict(P_new)
    np.testing.assert_array_equal(est.predict_proba(P_new), first)
    assert pickle.dumps(est) == learned


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_predict_before_fit(make):
    with pytest.raises(NotFittedError):
        make().predict_proba(P)


@pytest.mark.parametrize(
    "bad, match",
    [
        (P[0], r"shape \(members, rows, classes\)"),
        (P * 2, "probability vector"),
        (np.log(P), "probability vector"),
    ],
)
def test_invalid_probabilities(bad, match):
    with pytest.raises(ValueError, match=match):
        SoftVoting().fit(bad, y)


@pytest.mark.parametrize(
    "labels, match",
    [(np.array([0, 1, 3, 0]), r"y must lie in \[0, 3\)"), (y.astype(float), "integer labels")],
)
def test_invalid_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        SoftVoting().fit(P, labels)


@pytest.mark.parametrize(
    "est, match",
    [
        (HardVoting(weights=[1, 2]), r"len\(weights\) == 3 members"),
        (SoftVoting(weights=[-1, 1, 1]), "weights >= 0"),
        (WeightedAverage(tol=0), "tol > 0"),
        (EnsembleSelection(metric="auc"), "metric in"),
        (EnsembleSelection(init=0), "init >= 1"),
        (EnsembleSelection(bags=0), "bags >= 1"),
        (EnsembleSelection(bags=2, bag_fraction=1.5), "bag_fraction <= 1"),
        (TemperatureScaling(bounds=(2.0, 1.0)), r"bounds\[0\] < bounds\[1\]"),
    ],
)
def test_invalid_parameters(est, match):
    with pytest.raises(ConfigError, match=match):
        est.fit(P, y)


def test_registry_and_unknown_name():
    assert isinstance(make_combiner("selection", iterations=5), EnsembleSelection)
    assert make_combiner("selection", iterations=5).iterations == 5
    with pytest.raises(ConfigError, match="hard_voting, selection, soft_voting, weighted") as err:
        make_combiner("softvoting")
    assert "did you mean 'soft_voting'" in str(err.value)


def test_sklearn_clone_and_params():
    est = TemperatureScaling(EnsembleSelection(iterations=5)).fit(P, y)
    fresh = clone(est)
    assert fresh.get_params()["combiner__iterations"] == 5
    assert not hasattr(fresh, "weights_") and not hasattr(fresh.combiner, "weights_")


# --- voting ------------------------------------------------------------------------------------


def test_soft_voting_is_the_mean():
    expected = (p1 + p2 + p3) / 3
    np.testing.assert_allclose(SoftVoting().fit(P, y).predict_proba(P), expected)
    np.testing.assert_allclose(SoftVoting().fit(P, y).weights_, [1 / 3] * 3)


def test_soft_voting_with_weights():
    expected = (2 * p1 + p2 + p3) / 4
    np.testing.assert_allclose(SoftVoting(weights=[2, 1, 1]).fit(P, y).predict_proba(P), expected)


def test_hard_voting_majority_and_vote_shares():
    est = HardVoting().fit(P, y)
    # votes per row: (0, 0, 1), (1, 2, 1), (2, 2, 0), (0, 1, 0)
    np.testing.assert_array_equal(est.predict(P), [0, 1, 2, 0])
    expected = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 2], [2, 1, 0]]) / 3
    np.testing.assert_allclose(est.predict_proba(P), expected)


def test_weighted_hard_voting():
    est = HardVoting(weights=[1, 3, 1]).fit(P, y)
    # row 1: class 1 gets 1 + 1, class 2 gets 3; row 3: class 0 gets 1 + 1, class 1 gets 3
    np.testing.assert_array_equal(est.predict(P), [0, 2, 2, 1])
    np.testing.assert_allclose(est.predict_proba(P)[1], [0, 2 / 5, 3 / 5])


def test_hard_voting_tie_situation():
    # two members, one vote each on every row: the documented rule decides
    m1 = np.array([[0.6, 0.4, 0.0], [0.5, 0.2, 0.3], [0.6, 0.4, 0.0]])
    m2 = np.array([[0.1, 0.9, 0.0], [0.2, 0.3, 0.5], [0.4, 0.6, 0.0]])
    T = np.stack([m1, m2])
    labels = np.array([0, 0, 0])
    # row 0: 0 vs 1, mean p (.35, .65, 0) -> 1 although class 0 has the lower index
    # row 1: 0 vs 2, mean p (.35, .25, .40) -> 2
    # row 2: 0 vs 1, mean p (.5, .5, 0) ties again -> lowest index, 0
    np.testing.assert_array_equal(HardVoting().fit(T, labels).predict(T), [1, 2, 0])
    # member order does not matter
    np.testing.assert_array_equal(HardVoting().fit(T[::-1], labels).predict(T[::-1]), [1, 2, 0])
    # vote shares are tied on every row
    np.testing.assert_allclose(HardVoting().fit(T, labels).predict_proba(T).max(axis=1), 0.5)


@pytest.mark.parametrize("temperature", [False, True])
def test_the_final_rule_predicts_what_the_fitted_combiner_does_ties_included(temperature):
    """The final model keeps only numbers (vote, weights, T) and rebuilds the combiner from them:
    on the tied rows above the rebuilt rule must pick [1, 2, 0] as HardVoting does (the argmax of
    the vote shares alone would pick [0, 0, 0])."""
    m1 = np.array([[0.6, 0.4, 0.0], [0.5, 0.2, 0.3], [0.6, 0.4, 0.0]])
    m2 = np.array([[0.1, 0.9, 0.0], [0.2, 0.3, 0.5], [0.4, 0.6, 0.0]])
    T, labels = np.stack([m1, m2]), np.array([0, 1, 0])
    fitted = HardVoting().fit(T, labels)
    if temperature:
        fitted = TemperatureScaling(HardVoting()).fit(T, labels)
    rule = fitted_rule(combiner_state(fitted), n_classes=3)
    np.testing.assert_array_equal(rule.predict(T), [1, 2, 0])
    np.testing.assert_allclose(rule.predict_proba(T), fitted.predict_proba(T), rtol=0, atol=0)


def test_hard_voting_three_way_tie():
    m = np.array([[[0.4, 0.3, 0.3]], [[0.3, 0.4, 0.3]], [[0.1, 0.3, 0.6]]])
    # one vote each; mean p = (0.8/3, 1.0/3, 1.2/3) -> class 2
    assert HardVoting().fit(m, np.array([0])).predict(m)[0] == 2


# --- weighted average --------------------------------------------------------------------------


def test_weighted_average_finds_the_perfect_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=200)
    perfect = np.full((200, 3), 0.05)
    perfect[np.arange(200), labels] = 0.9
    noise = rng.dirichlet(np.ones(3), size=200)
    Pw = np.stack([noise, perfect, noise[::-1]])
    est = WeightedAverage().fit(Pw, labels)
    assert est.weights_[1] > 0.99
    soft = SoftVoting().fit(Pw, labels)
    assert nll(est.predict_proba(Pw), labels) < nll(soft.predict_proba(Pw), labels)
    assert est.loss_ == pytest.approx(-np.log(0.9), abs=1e-4)


def test_weighted_average_is_deterministic_and_no_worse_than_uniform():
    Pr, yr = random_members(5, 80, 3, seed=3)
    a, b = WeightedAverage().fit(Pr, yr), WeightedAverage().fit(Pr, yr)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    assert a.loss_ <= nll(SoftVoting().fit(Pr, yr).predict_proba(Pr), yr) + 1e-12


# --- ensemble selection ------------------------------------------------------------------------


def test_ensemble_selection_greedy_path_by_hand():
    # 2 rows, 2 classes, both rows class 0; only the class-0 probabilities matter for log loss
    A = np.array([[0.9, 0.1], [0.5, 0.5]])
    B = np.array([[0.5, 0.5], [0.9, 0.1]])
    C = np.array([[0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0])
    est = EnsembleSelection(init=1, iterations=2).fit(np.stack([A, B, C]), labels)

    def loss(p0_row0: float, p0_row1: float) -> float:
        return -(np.log(p0_row0) + np.log(p0_row1)) / 2

    # init: A and B tie at loss(.9, .5) < C's loss(.7, .6); the lower index, A, starts
    # step 1: A+B -> (.7, .7) beats A+A -> (.9, .5) and A+C -> (.8, .55)
    # step 2: A+B+A -> (2.3/3, 1.9/3) ties A+B+B and beats A+B+C -> (2.1/3, 2.0/3): A, but worse
    expected = [loss(0.9, 0.5), loss(0.7, 0.7), loss(2.3 / 3, 1.9 / 3)]
    np.testing.assert_allclose(est.trajectory_, [expected])
    np.testing.assert_array_equal(est.best_iteration_, [1])
    np.testing.assert_allclose(est.weights_, [0.5, 0.5, 0.0])


def test_ensemble_selection_keeps_its_best_step():
    Pr, yr = random_members(6, 60, 3, seed=4)
    est = EnsembleSelection(iterations=10).fit(Pr, yr)
    best = est.trajectory_[0, est.best_iteration_[0]]
    assert best == pytest.approx(nll(est.predict_proba(Pr), yr))
    assert best == est.trajectory_.min()
    counts = est.weights_ * (3 + est.best_iteration_[0])  # init 3 + additions kept
    np.testing.assert_allclose(counts, np.round(counts))


def test_ensemble_selection_accuracy_metric():
    Pr, yr = random_members(6, 60, 3, seed=5)
    est = EnsembleSelection(metric="accuracy", iterations=10).fit(Pr, yr)
    accuracy = np.mean(est.predict(Pr) == yr)
    assert est.trajectory_.max() == pytest.approx(accuracy)


def test_ensemble_selection_bagging_is_deterministic():
    Pr, yr = random_members(8, 60, 3, seed=6)
    kw = dict(bags=5, bag_fraction=0.5, iterations=10, random_state=0)
    a, b = EnsembleSelection(**kw).fit(Pr, yr), EnsembleSelection(**kw).fit(Pr, yr)
    np.testing.assert_array_equal(a.weights_, b.weights_)
    assert a.trajectory_.shape == (5, 11) and a.best_iteration_.shape == (5,)
    assert a.weights_.sum() == pytest.approx(1.0)


def test_ensemble_selection_bags_use_only_their_members():
    # bags of one member: each bag puts all weight on its member, weights are multiples of 1/4
    Pr, yr = random_members(8, 30, 3, seed=7)
    est = EnsembleSelection(bags=4, bag_fraction=1 / 8, iterations=3, random_state=1).fit(Pr, yr)
    np.testing.assert_allclose(est.weights_ * 4, np.round(est.weights_ * 4))


# --- temperature scaling -----------------------------------------------------------------------


def test_temperature_scaling_softens_overconfident_members():
    # 100 rows, 2 classes: both members say 0.99 for class 0, but only 70 rows are class 0.
    # The best calibrated confidence is 0.7: (0.99 / 0.01) ** (1 / T) = 0.7 / 0.3
    member = np.tile([0.99, 0.01], (100, 1))
    Pt, labels = np.stack([member, member]), np.array([0] * 70 + [1] * 30)
    inner = SoftVoting().fit(Pt, labels)
    est = TemperatureScaling(SoftVoting()).fit(Pt, labels)
    assert est.temperature_ == pytest.approx(np.log(99) / np.log(7 / 3), rel=1e-3)
    np.testing.assert_allclose(est.predict_proba(Pt)[0], [0.7, 0.3], atol=1e-4)
    assert nll(est.predict_proba(Pt), labels) < nll(inner.predict_proba(Pt), labels)
    np.testing.assert_array_equal(est.predict(Pt), inner.predict(Pt))


def test_temperature_scaling_keeps_the_argmax():
    Pr, yr = random_members(4, 50, 5, seed=8)
    est = TemperatureScaling(WeightedAverage()).fit(Pr, yr)
    inner = WeightedAverage().fit(Pr, yr)
    np.testing.assert_array_equal(est.predict_proba(Pr).argmax(axis=1), inner.predict(Pr))
    np.testing.assert_allclose(est.weights_, inner.weights_)


class SpySoftVoting(SoftVoting):
    calls: ClassVar[list[tuple[str, int]]] = []  # (method, rows) for every call, on every clone

    def fit(self, P, y):
        SpySoftVoting.calls.append(("fit", np.shape(P)[1]))
        return super().fit(P, y)

    def predict_proba(self, P):
        SpySoftVoting.calls.append(("predict_proba", np.shape(P)[1]))
        return super().predict_proba(P)


def test_temperature_scaling_fits_inner_only_on_fit_rows():
    SpySoftVoting.calls.clear()
    P_test, _ = random_members(3, 9, 3, seed=9)
    est = TemperatureScaling(SpySoftVoting()).fit(P, y)
    est.predict_proba(P_test)
    # the inner combiner and T learn from the 4 fit rows; the 9 test rows are only predicted
    assert SpySoftVoting.calls == [("fit", 4), ("predict_proba", 4), ("predict_proba", 9)]
