"""The ensemble stage's choice and ladder on synthetic members (arrays only, no training): what
ships when the best combiner's edge over the best member is noise and when it is clear, and hard
voting scored on the labels its predict gives, ties included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workbench.config import EnsembleConfig
from workbench.ensemble.members import Member, MemberSpec
from workbench.ensemble.stage import HeldOut, run_ensemble
from workbench.results import EnsembleResult, TestProbas
from workbench.store import RunStore

CLASSES = 3


def noisy_member(y: np.ndarray, right: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities (rows, classes): on a share `right` of rows 0.6 on the true class, else 0.6
    on a random wrong class; 0.2 on each other class. Errors independent of other members'."""
    n = len(y)
    top = np.where(rng.random(n) < right, y, (y + rng.integers(1, CLASSES, n)) % CLASSES)
    p = np.full((n, CLASSES), 0.2)
    p[np.arange(n), top] = 0.6
    return p


def member(i: int, oof: np.ndarray, cv_score: float) -> Member:
    spec = MemberSpec(f"m/trial-{i}", "m", i, "trial", cv_score, Path(f"/nowhere/{i}"))
    return Member(spec, oof, ())


def run(
    oofs: list[np.ndarray],
    y: np.ndarray,
    tests: np.ndarray,
    y_test: np.ndarray,
    tmp: Path,
    methods: tuple[str, ...] = ("soft_voting", "weighted"),
    ship: str = "auto",
) -> EnsembleResult:
    # member 0 is the best by CV score: its k-fold bag is the ladder's second rung
    members = [member(i, p, 0.9 - i / 100) for i, p in enumerate(oofs)]
    folds = np.stack([tests[0], tests[0]])  # two fold models equal to their mean
    cfg = EnsembleConfig(methods=methods, bootstrap=500, temperature=False, ship=ship)
    test = HeldOut(y_test, [str(c) for c in range(CLASSES)], "split")
    return run_ensemble(
        members, y, test, cfg, RunStore(tmp), 0, lambda best: TestProbas(tests, folds), folds=3
    )


def test_a_combiner_within_the_noise_of_the_best_member_ships_the_member(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, 900)
    best = noisy_member(y, 0.8, rng)
    # two near-copies of the best member: every ensemble of them is the best member, give or
    # take the 20 rows where a copy was made wrong, which the weights can average away
    copies = []
    for _ in range(2):
        c = best.copy()
        rows = rng.choice(len(y), 20, replace=False)
        c[rows] = np.roll(c[rows], 1, axis=1)
        copies.append(c)
    tests = np.stack([best[:300], *(c[:300] for c in copies)])
    result = run([best, *copies], y, tests, y[:300], tmp_path)
    ci = result.choice.oof_vs_member
    assert ci.ci_low <= 0.0 <= ci.ci_high  # the combiner's edge is noise
    assert result.choice.alone and result.final.method == "m/trial-0"
    assert result.final.rule.weights == [1.0, 0.0, 0.0]  # the final model is member 0 alone
    assert "within the noise, so the best member ships alone" in result.choice.reason
    # the study file can ask for the ensemble anyway: the same margin, said as such
    forced = run([best, *copies], y, tests, y[:300], tmp_path / "forced", ship="ensemble")
    assert not forced.choice.alone and forced.final.method == forced.choice.best_method
    assert forced.choice.oof_vs_member == ci
    assert "within the noise, and the study file asks for ship = 'ensemble'" in (
        forced.choice.reason
    )
    # what ships scores as the bag does: its test accuracy is member 0's
    assert result.final.test.accuracy == pytest.approx(np.mean(best[:300].argmax(1) == y[:300]))


def test_a_combiner_clearly_better_than_the_best_member_ships(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, CLASSES, 900)
    oofs = [noisy_member(y, 0.7, rng) for _ in range(5)]  # independent errors: averaging helps
    y_test = rng.integers(0, CLASSES, 400)
    tests = np.stack([noisy_member(y_test, 0.7, rng) for _ in range(5)])
    result = run(oofs, y, tests, y_test, tmp_path)
    ci = result.choice.oof_vs_member
    assert ci.ci_high < 0.0 and not result.choice.alone
    assert result.final.method == result.choice.best_method
    assert "better by more than the noise, so the ensemble ships" in result.choice.reason
    # the per-row OOF log loss difference, by hand: soft voting's cross-validated rows are the
    # plain mean (its weights are fixed), so its mean difference is exact
    mean = np.mean(oofs, axis=0)
    rows = np.arange(len(y))
    hand = np.mean(np.log(oofs[0][rows, y]) - np.log(mean[rows, y]))
    if result.choice.best_method == "soft_voting":
        assert ci.diff == pytest.approx(-hand)
    # the ladder: one network, the bag, the two combiners, the final rule, in that order
    assert [r.name for r in result.ladder] == [
        "one network",
        "k-fold bag",
        "soft_voting",
        "weighted",
        "final",
    ]
    final = result.rung("final")
    assert final.vs_network is not None and final.vs_network.accuracy.diff > 0.05
    assert final.test.accuracy == result.final.test.accuracy


# 4 members x 6 test rows x 3 classes, with tied votes (tests/test_final.py works the tie rule
# out by hand): the vote with its tie rule labels the rows [2, 1, 0, 0, 0, 1]; the argmax of the
# vote shares (lowest index on ties) would label them [0, 1, 0, 0, 0, 1].
TIED = np.array(
    [
        [[.5, .1, .4], [.2, .7, .1], [.6, .3, .1], [.4, .2, .401], [.3, .5, .2], [.3, .3, .4]],
        [[.5, .1, .4], [.1, .8, .1], [.2, .5, .3], [.4, .2, .401], [.6, .3, .1], [.1, .8, .1]],
        [[.1, .1, .8], [.3, .6, .1], [.2, .2, .6], [.401, .2, .4], [.2, .5, .3], [.1, .8, .1]],
        [[.1, .1, .8], [.6, .3, .1], [.7, .2, .1], [.401, .2, .4], [.8, .1, .1], [.3, .2, .5]],
    ]
)  # fmt: skip
TIED = TIED / TIED.sum(axis=2, keepdims=True)
Y_TIED = np.array([2, 1, 0, 2, 0, 1])


def test_hard_voting_is_scored_on_the_labels_its_predict_gives(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, CLASSES, 300)
    oofs = [noisy_member(y, 0.7, rng) for _ in range(4)]
    result = run(oofs, y, TIED, Y_TIED, tmp_path, methods=("hard_voting",))
    hv = result.methods["hard_voting"]
    # hand labels [2, 1, 0, 0, 0, 1] against y [2, 1, 0, 2, 0, 1]: rows 0, 1, 2, 4, 5 right
    assert hv.test.accuracy == pytest.approx(5 / 6)  # the vote shares' argmax would give 4/6
    assert hv.test.per_class_recall == pytest.approx([1.0, 1.0, 0.5])
    assert hv.test.confusion == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    # its probabilities are calibrated vote shares: no row costs the 34.5 nats of a zero share
    assert hv.test.log_loss < 5.0
    rung = result.rung("hard_voting")
    assert rung.test.accuracy == hv.test.accuracy
    # McNemar against the bag (member 0: labels [0, 1, 0, 2, 1, 2], rows 1, 2, 3 right):
    # only the vote gets rows 0, 4, 5 right, only the bag row 3
    assert rung.vs_below is not None
    assert (rung.vs_below.mcnemar_b, rung.vs_below.mcnemar_c) == (3, 1)


def test_a_combiner_clearly_worse_than_the_best_member_is_called_worse() -> None:
    """The reason names the direction: a combiner whose every OOF row is less sure of the true
    class than the member's is worse by more than the noise (here by ln 2 a row, exactly)."""
    from workbench.ensemble.choice import choose

    y = np.arange(200) % 2
    member = np.where(np.eye(2)[y] == 1, 0.8, 0.2)  # 0.8 on the true class
    worse = np.where(np.eye(2)[y] == 1, 0.4, 0.6)  # 0.4: a log loss ln 2 higher a row
    choice = choose(member[None], y, {"soft_voting": worse}, ["m"], 0, 500, 0)
    assert choice.alone and choice.oof_vs_member.diff == pytest.approx(np.log(2))
    assert "worse by more than the noise, so the best member ships alone" in choice.reason
