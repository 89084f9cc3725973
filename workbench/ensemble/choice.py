"""What ships: the best combiner, or the best member alone when the combiner's edge is noise.

Both are judged on the same out-of-fold rows, each row predicted by a model that did not see it:
the member's OOF probabilities come from its fold models, the combiner's from fitting it on the
other folds of the OOF rows (stage.cross_validated_proba). The per-row log-loss difference
(combiner − member, nats) is resampled by a paired bootstrap; the combiner ships only when the
whole 95 % interval lies below 0. A margin inside the noise (one study here: 0.003 nats on 1,200
rows, and the ensemble then lost on the test split) ships the member, whose k-fold bag is what
the user would otherwise have. Either choice is then temperature-scaled on the OOF rows when
`[ensemble] temperature` is on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import clone

from workbench import evaluate
from workbench.ensemble.combiners import SoftVoting, TemperatureScaling
from workbench.results import Choice, Interval


def choose(
    P: np.ndarray,
    y: np.ndarray,
    cv_proba: dict[str, np.ndarray],
    names: list[str],
    best: int,
    n_boot: int,
    seed: int,
    ship: str = "auto",
) -> Choice:
    """`cv_proba`: each method's cross-validated OOF probabilities (rows, classes); `P` the
    members' OOF probabilities; `best` the best member's index (by CV score). `ship`: the
    study's `[ensemble] ship`: "auto" (the rule above), or "ensemble" / "member" as asked."""
    loss = {n: float(evaluate.row_log_loss(p, y).mean()) for n, p in cv_proba.items()}
    method = min(loss, key=lambda n: loss[n])  # ties: the first configured
    d = evaluate.row_log_loss(cv_proba[method], y) - evaluate.row_log_loss(P[best], y)
    ci = Interval(**evaluate.interval(d, n_boot, seed))
    clear = ci.ci_high < 0.0
    alone = not clear if ship == "auto" else ship == "member"
    span = f"{ci.diff:+.4f} nats a row (95 % CI {ci.ci_low:+.4f} to {ci.ci_high:+.4f})"
    verdict = (
        "better by more than the noise"
        if clear
        else "worse by more than the noise"
        if ci.ci_low > 0.0
        else "within the noise"
    )
    then = (
        f"so the {'best member ships alone' if alone else 'ensemble ships'}"
        if ship == "auto"
        else f"and the study file asks for ship = {ship!r}"
    )
    return Choice(
        shipped=names[best] if alone else method,
        alone=alone,
        best_method=method,
        best_member=names[best],
        oof_vs_member=ci,
        reason=f"{method}'s out-of-fold log loss against {names[best]} alone is {span}: "
        f"{verdict}, {then}",
    )


def shipped_rule(
    choice: Choice,
    fitted: dict[str, Any],
    best: int,
    P: np.ndarray,
    y: np.ndarray,
    temperature: bool,
) -> Any:
    """The fitted combiner the final model runs: the chosen method, or the best member alone
    (a soft vote with all its weight), temperature-scaled on the OOF rows `P` when asked."""
    if choice.alone:
        inner: Any = SoftVoting(weights=np.eye(len(P))[best])
    else:
        inner = fitted[choice.best_method]
        if not temperature or isinstance(inner, TemperatureScaling):
            return inner  # hard voting is always temperature-scaled (stage._combiner)
        inner = clone(inner)
    return (TemperatureScaling(inner) if temperature else inner).fit(P, y)
