"""Snapshot runs are trials of the search: one Optuna study per model, `<study>/<model>/snapshots`,
whose trials retrain the model's best configuration with M cosine cycles, one snapshot member per
cycle (Huang et al. 2017). Once a model's search has no trial running or queued, the first worker
to see it queues the run (user attrs `of_trial`, `cycles`, `hp`); any worker on any host runs it
like a trial (heartbeats, retries that keep finished folds, a sealed manifest), and two workers
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
    snapshot_study_name,
    study_name,
)


def snapshot_plan(cfg: StudyConfig, model: str, best: FrozenTrial) -> dict[str, Any]:
    """What a snapshot run of trial `best` trains: its configuration, cosine restarts, M cycles."""
    cycles = cfg.ensemble.snapshots
    hp = {
        **cfg.models[model].params,
        **best.params,
        "schedule": "cosine_restarts",
        "cycles": cycles,
    }
    hp["epochs"] = max(int(hp.get("epochs", cfg.train.epochs)), cycles)  # >= 1 epoch a cycle
    return {"of_trial": best.number, "cycles": cycles, "hp": hp}


def _of(trial: FrozenTrial | optuna.Trial) -> tuple[Any, Any]:
    return trial.user_attrs.get("of_trial"), trial.user_attrs.get("cycles")


def queue_snapshot(cfg: StudyConfig, model: str, search: optuna.Study, snaps: optuna.Study) -> bool:
    """Queue the snapshot run of the model's best trial, unless the search can still change
    the best (a trial running or queued) or the run is queued, running or done already."""
    if search.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        return False
    best = best_trial(search)
    if best is None:
        return False
    plan = snapshot_plan(cfg, model, best)
    if any(
        _of(t) == (best.number, plan["cycles"])
        for t in snaps.get_trials(deepcopy=False, states=TAKEN)
    ):
        return False
    snaps.enqueue_trial(params={}, user_attrs=plan)
    return True


def is_surplus_snapshot(trial: optuna.Trial) -> bool:
    """Is there nothing for this trial to run: no run was queued for it (another worker popped
    the queued one first), or an earlier trial took the same run (two workers queued it)?"""
    if "of_trial" not in trial.user_attrs:
        return True
    taken = trial.study.get_trials(deepcopy=False, states=TAKEN)
    return any(t.number < trial.number and _of(t) == _of(trial) for t in taken)


def completed_snapshot(
    cfg: StudyConfig, model: str, storage: Any, of_trial: int
) -> FrozenTrial | None:
    """The completed snapshot run of trial `of_trial` with the study file's cycles, if any."""
    try:
        snaps = optuna.load_study(study_name=snapshot_study_name(cfg, model), storage=storage)
    except KeyError:
        return None
    want = (of_trial, cfg.ensemble.snapshots)
    done = [
        t for t in snaps.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _of(t) == want
    ]
    return done[0] if done else None


def pending_snapshots(cfg: StudyConfig, storage: Any) -> list[str]:
    """Models whose best trial has no completed snapshot run yet (with snapshots on)."""
    if not (cfg.ensemble.enabled and cfg.ensemble.snapshots > 1):
        return []
    pending = []
    for model in cfg.models:
        best = best_trial(optuna.load_study(study_name=study_name(cfg, model), storage=storage))
        if best is not None and completed_snapshot(cfg, model, storage, best.number) is None:
            pending.append(model)
    return pending
