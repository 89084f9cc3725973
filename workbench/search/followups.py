"""Follow-up runs are trials of the search. Once a model's search has no trial running or queued,
the first worker to see it queues, for the model's best configuration:

- a snapshot run (`[ensemble] snapshots = M`, study `<study>/<model>/snapshots`): the
  configuration retrained on the same folds with M cosine cycles, one snapshot member per cycle
  (Huang et al. 2017);
- a refit (`[ensemble] refit = true`, study `<study>/<model>/refit`): the configuration retrained
  once on every training row, no folds: the ladder's "one network on all rows", what a user
  would otherwise train and ship after a search.

A queued run's user attrs say what it trains (`of_trial`, `hp`, and `cycles` or `of_value`). Any
worker on any host runs it like a trial (heartbeats, retries, a sealed manifest), and two workers
that queued it at once leave the later copy a surplus. The ensemble stage only reads the result.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench.config import StudyConfig
from workbench.search.storage import (
    TAKEN,
    best_trial,
    followup_kinds,
    followup_study_name,
    study_name,
)


def plan(cfg: StudyConfig, model: str, best: FrozenTrial, kind: str) -> dict[str, Any]:
    """What the follow-up run of trial `best` trains (its user attrs)."""
    hp: dict[str, Any] = {**cfg.models[model].params, **best.params}
    if kind == "snapshots":
        cycles = cfg.ensemble.snapshots
        hp.update(schedule="cosine_restarts", cycles=cycles)
        hp["epochs"] = max(int(hp.get("epochs", cfg.train.epochs)), cycles)  # >= 1 epoch a cycle
        return {"of_trial": best.number, "cycles": cycles, "hp": hp}
    hp = refit_hp(cfg, model, best.params, best.user_attrs)
    return {"of_trial": best.number, "of_value": float(best.value or 0.0), "hp": hp}


def refit_hp(
    cfg: StudyConfig, model: str, params: dict[str, Any], attrs: dict[str, Any]
) -> dict[str, Any]:
    """A trial's configuration (its `params` and user `attrs`) for one network trained on every
    training row: a refit, or a distilled student. No validation rows to stop on: with early
    stopping, it trains the epochs the fold models kept, on average, plus one (their best
    epochs are recorded on the trial)."""
    hp: dict[str, Any] = {**cfg.models[model].params, **params}
    patience = int(hp.get("patience", cfg.train.patience))
    best_epochs = attrs.get("best_epochs")
    if patience and best_epochs:
        hp["epochs"] = round(sum(best_epochs) / len(best_epochs)) + 1
    hp["patience"] = 0
    return hp


def _key(trial: FrozenTrial | optuna.Trial) -> tuple[Any, Any]:
    """Which run a follow-up trial is: (the trial it retrains, its cycles; None for a refit)."""
    return trial.user_attrs.get("of_trial"), trial.user_attrs.get("cycles")


def queue(
    cfg: StudyConfig, model: str, kind: str, search: optuna.Study, runs: optuna.Study
) -> bool:
    """Queue the `kind` run of the model's best trial, unless the search can still change the
    best (a trial running or queued) or the run is queued, running or done already."""
    if search.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        return False
    best = best_trial(search)
    if best is None:
        return False
    attrs = plan(cfg, model, best, kind)
    want = (attrs["of_trial"], attrs.get("cycles"))
    if any(_key(t) == want for t in runs.get_trials(deepcopy=False, states=TAKEN)):
        return False
    runs.enqueue_trial(params={}, user_attrs=attrs)
    return True


def is_surplus(trial: optuna.Trial) -> bool:
    """Is there nothing for this trial to run: no run was queued for it (another worker popped
    the queued one first), or an earlier trial took the same run (two workers queued it)?"""
    if "of_trial" not in trial.user_attrs:
        return True
    taken = trial.study.get_trials(deepcopy=False, states=TAKEN)
    return any(t.number < trial.number and _key(t) == _key(trial) for t in taken)


def completed(
    cfg: StudyConfig, model: str, storage: Any, of_trial: int, kind: str
) -> FrozenTrial | None:
    """The completed `kind` run of trial `of_trial` as the study file asks for it, if any."""
    try:
        runs = optuna.load_study(study_name=followup_study_name(cfg, model, kind), storage=storage)
    except KeyError:
        return None
    want = (of_trial, cfg.ensemble.snapshots if kind == "snapshots" else None)
    done = runs.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return next((t for t in done if _key(t) == want), None)


def pending(cfg: StudyConfig, storage: Any) -> list[str]:
    """`<model>/<kind>` for each follow-up run of a best trial that has not completed yet."""
    waiting = []
    for model in cfg.models:
        best = best_trial(optuna.load_study(study_name=study_name(cfg, model), storage=storage))
        if best is None:
            continue
        for kind in followup_kinds(cfg):
            if completed(cfg, model, storage, best.number, kind) is None:
                waiting.append(f"{model}/{kind}")
    return waiting
