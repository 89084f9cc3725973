"""Multi-fidelity search (`[search] pruner = "hyperband"` or `"asha"`): epochs of fold 0 in rungs,
then a fold-level test against the best trial.

A trial reports each epoch's validation metric at step `fold * max_epochs + epoch` (as under the
median pruner) and, under these pruners, each completed fold's score (the CV's own: the fold
model's OOF rows, as in the trial's `fold_scores`) at step `FOLD_STEP + fold`. `FidelityPruner`
decides on two levels:

1. Fold 0, per epoch: Optuna's HyperbandPruner or SuccessiveHalvingPruner (asynchronous
   successive halving, ASHA) with resource = epochs trained in fold 0: rungs at 1, 3, 9, ...
   epochs (min_resource 1, REDUCTION_FACTOR 3; Hyperband's max_resource = the model's max epochs,
   hence floor(log3(max epochs)) + 1 brackets). A trial that passes every rung fold 0 holds goes
   on to the other folds; no rung is held there.
2. After each completed fold: a one-sided Wilcoxon signed-rank test of the trial's completed
   fold scores against the best completed trial's on the same folds (the folds are seeded once
   per study: fold k is the same task in every trial). The trial is pruned when p < `wilcoxon_p`
   and its mean over those folds is also worse (Optuna's WilcoxonPruner does the same, with its
   "average_is_best" safety). A fold's score is reported when the next fold reports its first
   epoch (the report hook is per epoch), so the decision costs one epoch of the next fold.

The smallest one-sided p-value with k paired folds is 2^-k (every fold worse): with
`wilcoxon_p = 0.1` the test can prune from the 4th completed fold on (2^-4 = 0.0625), never with
3 or fewer (2^-3 = 0.125). With 5 folds it acts once, before the last fold; with fewer it never
acts, and only the rungs of fold 0 prune.

The p-value is exact, counted over the 2^n sign assignments (no scipy in the workers: see
workbench/data/splits.py). Zero differences follow Optuna's WilcoxonPruner (scipy's
`zero_method="zsplit"`): zeros are ranked with the rest and half of each zero's rank counts on
each side; tied absolute differences get their average rank. This equals scipy.stats.wilcoxon
(method "auto": its exact distribution without ties or zeros, its exact permutation test with
them, for n <= 13). Only trials that finish every fold complete (the OOF contract): a pruned
trial is PRUNED and never an ensemble member.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from optuna.pruners import BasePruner, HyperbandPruner, SuccessiveHalvingPruner
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, Trial

from workbench.cv import CrossValidator
from workbench.errors import ConfigError
from workbench.evaluate import scores
from workbench.search.storage import best_trial

FOLD_STEP = 1_000_000  # fold k's score is reported at FOLD_STEP + k; epoch steps stay below
REDUCTION_FACTOR = 3  # each rung keeps the best third (Hyperband's and ASHA's usual eta)
MAX_EPOCHS = "max_epochs"  # user attr: the model's max epochs per fold (Hyperband's max_resource)


def signed_rank_p(d: np.ndarray, alternative: Literal["less", "greater"] = "less") -> float:
    """Exact one-sided p-value of the Wilcoxon signed-rank test of differences `d` ("less": that
    they tend below 0), with zeros split ("zsplit") and tied |d| at their average rank."""
    d = np.asarray(d, dtype=float) * (1.0 if alternative == "less" else -1.0)
    twice = np.rint(2 * _average_ranks(np.abs(d))).astype(np.int64)  # ranks are k/2: exact ints
    observed = int(twice[d > 0].sum())  # each zero adds half its rank to every assignment alike
    counts = np.zeros(int(twice.sum()) + 1)  # counts[s]: sign assignments with 2 x statistic s
    counts[0] = 1.0
    for r in twice[d != 0]:  # each nonzero difference positive or negative; zeros stay zero
        counts[r:] = counts[r:] + counts[: len(counts) - r]
    return float(counts[: observed + 1].sum() / counts.sum())


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `a`, ties sharing their average rank (scipy's rankdata "average")."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for value in np.unique(a):
        tied = a == value
        ranks[tied] = ranks[tied].mean()
    return ranks


class FidelityPruner(BasePruner):
    """Rungs over the epochs of fold 0 (Hyperband or ASHA), then a one-sided Wilcoxon test per
    completed fold against the best completed trial (see the module docstring)."""

    def __init__(self, rungs: Literal["hyperband", "asha"], p_threshold: float = 0.1) -> None:
        if not 0.0 < p_threshold <= 1.0:
            raise ValueError(f"`0 < p_threshold <= 1` must hold, but got {p_threshold=}")
        self.rungs, self.p_threshold = rungs, p_threshold
        # made at the first report in fold 0: Hyperband's brackets need the model's max epochs,
        # which the trial records (the pruner is made per study, from the config alone)
        self._epochs: BasePruner | None = None

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        folds = fold_scores(trial)
        if folds:  # past fold 0
            return self._worse_than_best(study, folds)
        stride = trial.user_attrs.get(MAX_EPOCHS)  # set by FoldReports.begin
        if stride is None or max(trial.intermediate_values, default=0) >= stride:
            return False  # not a trial in its fold 0
        return self._rung_pruner(int(stride)).prune(study, _epochs_trained_view(trial))

    def _rung_pruner(self, max_epochs: int) -> BasePruner:
        if self._epochs is None:
            self._epochs = (
                SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR)
                if self.rungs == "asha"
                else HyperbandPruner(1, max_epochs, reduction_factor=REDUCTION_FACTOR)
            )
        return self._epochs

    def _worse_than_best(self, study: Study, mine: dict[int, float]) -> bool:
        best = best_trial(study)
        theirs = list(best.user_attrs.get("fold_scores", [])) if best else []
        folds = sorted(k for k in mine if k < len(theirs))
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
        d = sign * (np.array([mine[k] for k in folds]) - np.array([theirs[k] for k in folds]))
        if not folds or not np.isfinite(d).all() or d.mean() >= 0:  # as good on average: keep
            return False
        return signed_rank_p(d, "less") < self.p_threshold


def fold_scores(trial: FrozenTrial) -> dict[int, float]:
    """The trial's completed folds' scores, as reported at FOLD_STEP + fold."""
    return {s - FOLD_STEP: v for s, v in trial.intermediate_values.items() if s >= FOLD_STEP}


def epoch_values(trial: FrozenTrial) -> dict[int, float]:
    """The trial's per-epoch reports, by step (fold * max_epochs + epoch)."""
    return {s: v for s, v in trial.intermediate_values.items() if s < FOLD_STEP}


def _epochs_trained_view(trial: FrozenTrial) -> FrozenTrial:
    """The trial with step = epochs trained (epoch + 1), so that min_resource 1 means one
    epoch. A copy: the trial's own dict is Optuna's cache."""
    view = copy.copy(trial)
    view.intermediate_values = {s + 1: v for s, v in epoch_values(trial).items()}
    return view


@dataclass
class FoldReports:
    """Reports each completed fold's score at FOLD_STEP + fold, once, when a later fold reports
    an epoch (folds kept from an earlier try included)."""

    trial: Trial
    cv: CrossValidator
    out: Path  # the trial's folder, where cv.py writes each completed fold's record
    done: set[int] = field(default_factory=set)

    @classmethod
    def begin(cls, trial: Trial, cv: CrossValidator, out: Path) -> FoldReports:
        """Also records the model's max epochs per fold on the trial (Hyperband's max_resource)."""
        stride = cv.max_epochs()
        if cv.cfg.cv.folds * stride >= FOLD_STEP:
            raise ConfigError(
                f"`cv.folds x max epochs < {FOLD_STEP}` must hold for pruner = "
                f"'{cv.cfg.search.pruner}', but got {cv.cfg.cv.folds} x {stride}"
            )
        trial.set_user_attr(MAX_EPOCHS, stride)
        return cls(trial, cv, out)

    def before(self, fold: int) -> None:
        """Report the folds before `fold` not yet reported."""
        for k in range(fold):
            record = None if k in self.done else self.cv.run_store.read_fold(self.out, k)
            if record is not None:
                y = self.cv.y.numpy()[record.rows]
                score = scores(record.proba, y)[self.cv.cfg.cv.metric]
                self.trial.report(score, step=FOLD_STEP + k)
                self.done.add(k)

    def reason(self) -> str:
        """Why a trial past fold 0 was pruned."""
        return (
            f"its {len(self.done)} completed folds are worse than the best trial's on the same "
            f"folds (one-sided Wilcoxon signed-rank test)"
        )


@dataclass
class Usage:
    """What a trial trained, counted by its report hook: epochs per fold started."""

    epochs: dict[int, int] = field(default_factory=dict)

    def count(self, fold: int) -> None:
        self.epochs[fold] = self.epochs.get(fold, 0) + 1

    def record(self, trial: Trial) -> None:
        """User attrs `epochs_trained` (summed over folds) and `folds_started`; folds kept from
        an earlier try are not counted here (a completed trial lists them in `folds_resumed`)."""
        trial.set_user_attr("epochs_trained", sum(self.epochs.values()))
        trial.set_user_attr("folds_started", len(self.epochs))
