"""The ladder: what each step from one network to the shipped ensemble buys on the test split.

    one network      each fold model of the best configuration alone (mean and range over folds)
    <model> on all rows   a model's best configuration retrained once on every training row
                     (`[ensemble] refit`; compared with one network)
    k-fold bag       the mean of those fold models: what cross-validation already trained
    k-fold bag with TTA the same fold models averaged over test-time views too (`[ensemble] tta`)
    <combiner>       each combiner over every candidate member, fit on OOF rows
    final            what ships (ensemble/choice.py), with its temperature
    student          one network distilled from what ships (`[distill]`; compared with final)

Every rung is scored on the stage's one look at the test split: accuracy, macro-F1, log loss,
ECE, Brier, with a paired bootstrap CI against the rung below and against one network. Against
one network the per-row figures of the k fold models are averaged, so the CI is the expected
gain over shipping one of them. A rung's cost is the sum of its networks' measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench import evaluate
from workbench.ensemble.members import Member, Refit
from workbench.results import Choice, Cost, Interval, Paired, Rung, Scores, Spread, TestProbas

ADDS = {  # one sentence per rung: what it adds to the rung below
    "one network": "One trained network of the best configuration: the baseline every gain is "
    "measured against.",
    "refit": "The best configuration of this family retrained once on every training row (no "
    "rows held out): what one would otherwise train and ship after a search.",
    "k-fold bag": "Averages the fold models cross-validation already trained: no extra training, "
    "k times the inference.",
    "k-fold bag with TTA": "The same fold models, each also predicting the declared test-time "
    "views of every image, all averaged: no extra training, (1 + views) times the bag's "
    "inference.",
    "hard_voting": "A weighted majority vote of every candidate's labels; its probabilities are "
    "the vote shares calibrated by a temperature fit on OOF rows.",
    "soft_voting": "The plain mean of every candidate member's probabilities, across "
    "configurations and families.",
    "weighted": "Member weights fit on OOF rows to minimise log loss (zero for members that do "
    "not help).",
    "selection": "Greedy ensemble selection (Caruana et al. 2004) on OOF rows: members added, "
    "with repeats, while they help.",
    "student": "One network trained on every training row to match what ships, on out-of-fold "
    "probabilities only, and the labels: one network's inference cost.",
    "final": "What ships: the best combiner, or the best member alone when the combiner's OOF "
    "edge is within the noise, temperature-scaled on OOF rows.",
}


def scores(proba: np.ndarray, y: np.ndarray, pred: np.ndarray | None = None) -> Scores:
    """Test scores of probabilities and the labels shipped with them (default: their argmax)."""
    return Scores(**evaluate.metrics(proba, y, pred=pred))


@dataclass(frozen=True)
class Scored:
    """The test rows' labels and probabilities, and how rungs are compared on them."""

    y: np.ndarray
    probas: TestProbas
    best: int  # the best member by CV score, plain or TTA: what ships alone
    n_boot: int
    seed: int
    base: int  # the plain member of `best` (itself when plain): its k-fold bag, its fold models

    def paired(self, proba: Any, pred: Any, b_proba: np.ndarray, against: str) -> Paired:
        b_pred = b_proba.argmax(1)
        boot = evaluate.paired_bootstrap(
            self.y, pred, b_pred, proba, b_proba, n_boot=self.n_boot, seed=self.seed
        )
        mc = evaluate.mcnemar(self.y, pred, b_pred)
        return Paired(
            against=against,
            accuracy=Interval(**boot["accuracy"]),
            log_loss=Interval(**boot["log_loss"]),
            mcnemar_b=mc["b"],
            mcnemar_c=mc["c"],
            mcnemar_p=mc["p_value"],
            n_boot=self.n_boot,
            seed=self.seed,
        )

    def vs_network(self, proba: Any, pred: Any) -> Paired:
        folds = self.probas.folds
        boot = evaluate.paired_against_many(
            self.y, pred, proba, folds.argmax(2), folds, self.n_boot, self.seed
        )
        return Paired(
            against="one network",
            accuracy=Interval(**boot["accuracy"]),
            log_loss=Interval(**boot["log_loss"]),
            n_boot=self.n_boot,
            seed=self.seed,
        )


def _mean_scores(each: list[Scores]) -> Scores:
    """The mean of several networks' scores (no confusion matrix: counts do not average)."""
    return Scores(
        **{
            k: float(np.mean([getattr(s, k) for s in each]))
            for k in ("accuracy", "macro_f1", "log_loss", "brier", "ece")
        },
        per_class_recall=np.mean([s.per_class_recall for s in each], axis=0).tolist(),
        confusion=None,
    )


def _cost(parts: list[Cost | None], networks_share: float = 1.0) -> Cost | None:
    """The summed cost of members (None when any is unmeasured); `networks_share` scales one
    member to a fraction of it (one fold model of k: 1/k)."""
    if not parts or any(p is None for p in parts):
        return None
    known = [p for p in parts if p is not None]
    return Cost(
        networks=max(1, round(sum(p.networks for p in known) * networks_share)),
        ms_per_image=sum(p.ms_per_image for p in known) * networks_share,
        parameters=round(sum(p.parameters for p in known) * networks_share),
        bytes=round(sum(p.bytes for p in known) * networks_share),
    )


def ladder(
    s: Scored,
    members: list[Member],
    fitted: dict[str, Any],
    choice: Choice,
    final: Any,
    costs: dict[str, Cost],
    refits: Sequence[Refit] = (),
    student: str = "",
) -> list[Rung]:
    """Every rung, bottom up; `student` labels the distilled student's (TestProbas.student)."""
    P, folds, best = s.probas.members, s.probas.folds, members[s.base]
    k = len(folds)
    each = [scores(p, s.y) for p in folds]
    network = Rung(
        name="one network",
        kind="network",
        label=f"{best.name}: each of its {k} fold models alone (mean over folds)",
        adds=ADDS["one network"],
        test=_mean_scores(each),
        spread=Spread(
            accuracy=(min(e.accuracy for e in each), max(e.accuracy for e in each)),
            log_loss=(min(e.log_loss for e in each), max(e.log_loss for e in each)),
        ),
        cost=_cost([costs.get(best.name)], 1 / k),
    )
    bag_p = P[s.base]
    vs_net = s.vs_network(bag_p, bag_p.argmax(1))
    rungs = [network, *_refits(s, refits, costs)]
    rungs.append(
        Rung(
            name="k-fold bag",
            kind="bag",
            label=f"{best.name}: the mean of its {k} fold models (the best member by CV score)",
            adds=ADDS["k-fold bag"],
            test=scores(bag_p, s.y),
            vs_below=vs_net,
            vs_network=vs_net,
            cost=_cost([costs.get(best.name)]),
        )
    )
    rungs += _tta_bag(s, members, costs, bag_p)
    for name, comb in fitted.items():
        rungs.append(
            _combined(s, name, "combiner", name, comb, members, costs, "k-fold bag", bag_p)
        )
    t = getattr(final, "temperature_", None)
    label = (f"{choice.shipped} alone" if choice.alone else f"{choice.shipped} ensemble") + (
        f", temperature-scaled (T = {t:.3g})" if t else ""
    )
    if choice.alone:  # the shipped member is `best`: the bag, or the bag with its views
        below = "k-fold bag with TTA" if s.best != s.base else "k-fold bag"
        b_proba = P[s.best]
    else:
        below, b_proba = choice.best_method, fitted[choice.best_method].predict_proba(P)
    rungs.append(_combined(s, "final", "final", label, final, members, costs, below, b_proba))
    if s.probas.student is not None:
        rungs.append(_student(s, student, final.predict_proba(P), costs))
    return rungs


def _student(s: Scored, label: str, final_p: np.ndarray, costs: dict[str, Cost]) -> Rung:
    """The distilled student, compared with what it imitates (final) and with one network."""
    p = s.probas.student
    assert p is not None
    return Rung(
        name="student",
        kind="student",
        label=label,
        adds=ADDS["student"],
        test=scores(p, s.y),
        vs_below=s.paired(p, p.argmax(1), final_p, "final"),
        vs_network=s.vs_network(p, p.argmax(1)),
        cost=_cost([costs.get("student")]),
    )


def _combined(
    s: Scored,
    name: str,
    kind: Any,
    label: str,
    comb: Any,
    members: list[Member],
    costs: dict[str, Cost],
    below: str,
    b_proba: np.ndarray,
) -> Rung:
    """A rung that combines members through a fitted combiner `comb`; `below` names the rung it
    is compared with, whose test probabilities are `b_proba`."""
    P = s.probas.members
    proba, pred = comb.predict_proba(P), comb.predict(P)
    used = [costs.get(m.name) for m, w in zip(members, comb.weights_, strict=True) if w > 0]
    return Rung(
        name=name,
        kind=kind,
        label=label,
        adds=ADDS[name],
        test=scores(proba, s.y, pred),
        vs_below=s.paired(proba, pred, b_proba, below),
        vs_network=s.vs_network(proba, pred),
        cost=_cost(used),
    )


def _refits(s: Scored, refits: Sequence[Refit], costs: dict[str, Cost]) -> list[Rung]:
    """One rung per refit network, compared with one network (the fold models each alone)."""
    probas = s.probas.refits if s.probas.refits is not None else np.empty((0,))
    rungs = []
    for refit, p in zip(refits, probas, strict=True):
        vs = s.vs_network(p, p.argmax(1))
        rungs.append(
            Rung(
                name=f"{refit.model} on all rows",
                kind="refit",
                label=f"{refit.name}: trial {refit.trial}'s configuration trained once on "
                "every training row",
                adds=ADDS["refit"],
                test=scores(p, s.y),
                vs_below=vs,
                vs_network=vs,
                cost=_cost([costs.get(refit.name)]),
            )
        )
    return rungs


def _tta_bag(
    s: Scored, members: list[Member], costs: dict[str, Cost], bag_p: np.ndarray
) -> list[Rung]:
    """The best configuration's bag over its test-time views, compared with the bag: none when
    the study declares no views."""
    name = members[s.base].name
    tta = [i for i, m in enumerate(members) if m.spec.views and m.base == name]
    if not tta:
        return []
    p, m = s.probas.members[tta[0]], members[tta[0]]
    return [
        Rung(
            name="k-fold bag with TTA",
            kind="bag",
            label=f"{m.name}: its {len(s.probas.folds)} fold models over the image and the views "
            f"{', '.join(m.spec.views)}",
            adds=ADDS["k-fold bag with TTA"],
            test=scores(p, s.y),
            vs_below=s.paired(p, p.argmax(1), bag_p, "k-fold bag"),
            vs_network=s.vs_network(p, p.argmax(1)),
            cost=_cost([costs.get(m.name)]),
        )
    ]
