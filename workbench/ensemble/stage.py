"""The ensembling stage: fit combiners on out-of-fold rows, choose what ships, score the test split
once, and lay out the ladder of what each step buys.

1. Members' OOF probabilities, shape (members, training rows, classes), are the only thing any
   combiner is fit on. Each method is also cross-validated over the OOF rows, in the study's
   `cv.folds` stratified folds (fewer when a class has fewer rows, so every fold holds every
   class): that estimate, not the test set, chooses.
   With `[ensemble] tta`, every member's TTA variant is one more candidate, its OOF rows
   averaged over the views too (workbench/infer.py), chosen or passed over like any other.
2. The best combiner ships only when it beats the best member alone by more than the noise of
   that estimate (ensemble/choice.py); otherwise the final model is the best member. With
   `[distill]`, the caller's `Student` then trains against what ships, on OOF rows only.
3. The held-out test split is looked at here, once: every member, every method, the best
   configuration's fold models each alone, the final rule and the student are scored on the
   probabilities the caller's `predict` gives (member inference is workbench/infer.py; this
   module works on arrays and imports no torch). The result (workbench/results.py) is stored with
   a fingerprint of its inputs; rerunning on unchanged inputs reuses it without calling
   `predict`, and every look is counted in the study's one log (RunStore.count_test_look).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold, StratifiedKFold

from workbench import evaluate
from workbench.config import EnsembleConfig
from workbench.ensemble.choice import choose, shipped_rule
from workbench.ensemble.combiners import HardVoting, TemperatureScaling, make_combiner
from workbench.ensemble.ladder import Scored, ladder, scores
from workbench.ensemble.members import Member, Refit
from workbench.ensemble.rule import combiner_state
from workbench.errors import WorkbenchError
from workbench.files import atomic_write
from workbench.results import (
    FORMAT,
    Cost,
    Disagreement,
    EnsembleResult,
    FinalResult,
    MemberResult,
    MethodResult,
    Misclassified,
    OofScores,
    Reliability,
    Rule,
    Scores,
    TestLook,
    TestProbas,
)
from workbench.store import RunStore

MISCLASSIFIED_SHOWN = 64  # the report's grid of misclassified test images
# [ensemble] keys that change how the stage runs, not its result: a stored result is reused
# whatever they are (and with them left out, results stored before they existed match still)
HOW_IT_RUNS = {"workers", "check_rows"}


@dataclass(frozen=True)
class Student:
    """The distilled student (workbench/distill.py), trained by the caller when the stage says:
    after the shipped rule is fit on out-of-fold rows, before the look at the test split."""

    key: str  # what it is (its configuration): part of the stored result's fingerprint
    label: str  # the ladder's label, e.g. "cnn/trial-4's configuration, distilled"
    train: Callable[[dict[str, Any]], None]  # given the shipped rule (weights over candidates)


@dataclass(frozen=True)
class HeldOut:
    y: np.ndarray  # (rows,) labels of the test split
    classes: list[str]
    split_fingerprint: str


def _combiner(name: str, cfg: EnsembleConfig, seed: int) -> Any:
    """A combiner as the stage fits it. Hard voting's vote shares are not probabilities (a class
    no member votes for gets 0: 34.5 nats when it is the true one), so its probabilities are the
    shares calibrated by a temperature fit on the same rows; its labels stay the vote's."""
    if name == "hard_voting":
        return TemperatureScaling(HardVoting())
    kwargs: dict[str, Any] = {}
    if name == "selection":
        kwargs = {
            "iterations": cfg.selection_iterations,
            "init": cfg.selection_init,
            "bags": cfg.selection_bags,
            "random_state": seed,
        }
    return make_combiner(name, **kwargs)


def cross_validated_proba(
    combiner: Any, P: np.ndarray, y: np.ndarray, seed: int, folds: int = 5
) -> np.ndarray:
    """The combiner's OOF-row predictions (rows, classes): fit on k-1 folds of the rows, predict
    the k-th, k times. One fold after another: on bench item 13's study (18 members, 2,000 OOF
    rows, 4 folds) the four methods' folds take ~1 s of a stage of over 100 s, and fitting them
    on two threads or two forked processes saved 0.2 s (medians of 5, 2 cores)."""
    out = np.zeros(P.shape[1:])
    for fit_rows, held in _folds(y, folds, seed):
        out[held] = clone(combiner).fit(P[:, fit_rows], y[fit_rows]).predict_proba(P[:, held])
    return out


def _folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds, at most as many as the smallest class has rows: scikit-learn warns
    (and a fold lacks that class) otherwise. A class with a single row: plain k-fold."""
    smallest = int(np.unique(y, return_counts=True)[1].min())
    k = max(2, min(folds, smallest))
    splitter = StratifiedKFold if smallest >= k else KFold
    return list(splitter(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def fingerprint(
    members: list[Member],
    cfg: EnsembleConfig,
    test: HeldOut,
    refits: Sequence[Refit] = (),
    student: str = "",
) -> str:
    config = cfg.model_dump_json(exclude=HOW_IT_RUNS).encode()
    h = hashlib.sha256(f"format {FORMAT}".encode() + config)
    h.update(student.encode())
    h.update(test.split_fingerprint.encode())
    h.update(" ".join(r.name for r in refits).encode())
    for m in members:
        h.update(m.name.encode())
        h.update(np.ascontiguousarray(m.oof).tobytes())
    return h.hexdigest()[:16]


def stored(store: RunStore, key: str) -> EnsembleResult | None:
    """The stored result of these inputs, if any (another layout: None, evaluated anew)."""
    previous = store.ensemble_result()
    if previous is None or previous.fingerprint != key:
        return None
    looks = len(store.test_looks())
    return previous.model_copy(update={"reused": True, "test_evaluations": looks})


def best_member(members: list[Member], metric: str) -> int:
    """The best member by CV score in the study metric: its k-fold bag is 'the best single'."""
    better = max if metric == "accuracy" else min
    return members.index(better(members, key=lambda m: m.spec.cv_score))


def run_ensemble(
    members: list[Member],
    y_train: np.ndarray,
    test: HeldOut,
    cfg: EnsembleConfig,
    store: RunStore,
    seed: int,
    predict: Callable[[int], TestProbas],
    metric: str = "accuracy",
    folds: int = 5,
    costs: Callable[[], dict[str, Cost]] | None = None,
    refits: Sequence[Refit] = (),
    student: Student | None = None,
) -> EnsembleResult:
    """Fit, choose, evaluate once; returns (and stores) the result. `predict(best)` gives the
    test probabilities in the members' order, member `best`'s fold models each alone (always a
    plain member: a TTA variant's is its plain one) and the `refits`' networks; it
    is called only when the stored evaluation cannot be reused. `folds`: the study's cv.folds.
    `costs()`: each member's and refit's inference cost, measured after the look (None: the
    ladder shows no costs). `student`: trained before the look, scored in it (its test
    probabilities are TestProbas.student)."""
    if not members:
        raise WorkbenchError("no completed trials to ensemble: run the search first")
    key = fingerprint(members, cfg, test, refits, student.key if student else "")
    if (previous := stored(store, key)) is not None:
        return previous
    t0 = time.perf_counter()
    P = np.stack([m.oof for m in members])
    best = best_member(members, metric)
    base = [m.name for m in members].index(members[best].base)
    fitted: dict[str, Any] = {}
    cv_proba: dict[str, np.ndarray] = {}
    for name in cfg.methods:  # 1) fit on OOF rows only
        comb = _combiner(name, cfg, seed)
        fitted[name] = comb.fit(P, y_train)
        cv_proba[name] = cross_validated_proba(comb, P, y_train, seed, folds)
    names = [m.name for m in members]
    choice = choose(P, y_train, cv_proba, names, best, cfg.bootstrap, seed, cfg.ship)
    final = shipped_rule(choice, fitted, best, P, y_train, cfg.temperature)
    if student is not None:
        student.train(combiner_state(final))
    probas = predict(base)  # 2) the one look at the test split
    if len(probas.members) != len(members):
        raise WorkbenchError(
            f"member inference gave {len(probas.members)} members' test probabilities for "
            f"{len(members)} candidates"
        )
    looks = store.count_test_look(
        TestLook(
            command="ensemble",
            what=f"{len(members)} members, {len(fitted)} methods and the final model",
            rows=len(test.y),
            fingerprint=key,
        )
    )
    member_costs = costs() if costs else {}
    ladder_in = Scored(test.y, probas, best, cfg.bootstrap, seed, base)
    oof = {n: evaluate.scores(c.predict_proba(P), y_train) for n, c in fitted.items()}
    # every combiner and the final rule are scored once, as rungs; their records reuse that
    label = student.label if student else ""
    rungs = {
        r.name: r
        for r in ladder(ladder_in, members, fitted, choice, final, member_costs, refits, label)
    }
    result = EnsembleResult(
        fingerprint=key,
        split_fingerprint=test.split_fingerprint,
        test_evaluations=looks,
        reused=False,
        classes=test.classes,
        n_test=len(test.y),
        folds=len(probas.folds),
        seconds=0.0,
        members=[
            MemberResult(
                name=m.name,
                model=m.spec.model,
                trial=m.spec.trial,
                kind=m.spec.kind,
                cv_score=m.spec.cv_score,
                oof=OofScores(**evaluate.scores(m.oof, y_train)),
                test=scores(probas.members[i], test.y),
                cost=member_costs.get(m.name),
            )
            for i, m in enumerate(members)
        ],
        best_single=members[best].name,
        methods={
            name: MethodResult(
                name=name,
                members=[m.name for m in members],
                weights=[float(w) for w in comb.weights_],
                oof=OofScores(**oof[name]),
                oof_cv=OofScores(**evaluate.scores(cv_proba[name], y_train)),
                test=rungs[name].test,
            )
            for name, comb in fitted.items()
        },
        choice=choice,
        final=_final(ladder_in, choice.shipped, final, rungs["final"].test),
        ladder=list(rungs.values()),
        disagreement=Disagreement(
            members=[m.name for m in members],
            matrix=evaluate.disagreement(probas.members).tolist(),
        ),
        misclassified=_misclassified(final, probas.members, test.y),
    )
    result = result.model_copy(update={"seconds": time.perf_counter() - t0})
    atomic_write(store.results, lambda f: f.write(result.dumps()))
    return result


def _final(s: Scored, shipped: str, final: Any, test: Scores) -> FinalResult:
    """What ships: its rule, its test scores (the ladder's final rung), its comparison with the
    bag and its reliability bins."""
    proba, pred = final.predict_proba(s.probas.members), final.predict(s.probas.members)
    bag = s.probas.members[s.base]
    return FinalResult(
        method=shipped,
        rule=Rule(**combiner_state(final)),
        test=test,
        vs_bag=s.paired(proba, pred, bag, "k-fold bag"),
        reliability=Reliability(**evaluate.reliability(proba, s.y, pred=pred)),
        bag_reliability=Reliability(**evaluate.reliability(bag, s.y)),
    )


def _misclassified(final: Any, P_test: np.ndarray, y: np.ndarray) -> list[Misclassified]:
    """The final model's wrong test rows, most confident first (at most MISCLASSIFIED_SHOWN)."""
    proba, pred = final.predict_proba(P_test), final.predict(P_test)
    wrong = np.flatnonzero(pred != y)
    conf = proba[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:MISCLASSIFIED_SHOWN]
    return [
        Misclassified(
            row=int(r), true=int(y[r]), pred=int(pred[r]), confidence=float(proba[r, pred[r]])
        )
        for r in order
    ]
