"""What the studies hold, read back as plain values: progress, completed trials, leaderboards and
hyperparameter importance (for the console, the ensemble stage and the report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from workbench.config import StudyConfig
from workbench.search.fidelity import epoch_values
from workbench.search.followups import completed
from workbench.search.storage import DIRECTIONS, FINISHED, best_trial, study_name
from workbench.tracking import TrialScore


@dataclass(frozen=True)
class ModelProgress:
    model: str
    target: int
    complete: int
    pruned: int
    failed: int
    running: int
    best_value: float | None
    best_number: int | None
    best_params: dict[str, Any]
    mean_seconds: float | None  # wall time of a finished trial, on average
    first_start: float | None  # unix time of the first trial's start


def progress(cfg: StudyConfig, storage: RDBStorage) -> list[ModelProgress]:
    """Where every model study stands, read from the storage (works for remote workers too)."""
    out = []
    for model in cfg.models:
        study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
        trials = study.get_trials(deepcopy=False)
        trials = [t for t in trials if not t.user_attrs.get("surplus")]
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        interrupted = sum(  # Ctrl-C, or a disk without room for the trial's files
            t.state == TrialState.FAIL and bool({"interrupted", "disk_short"} & set(t.user_attrs))
            for t in trials
        )
        done = [t for t in trials if t.state in FINISHED and t.duration]
        best = best_trial(study)
        starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
        out.append(
            ModelProgress(
                model=model,
                target=cfg.trials_for(model),
                complete=count[TrialState.COMPLETE],
                pruned=count[TrialState.PRUNED],
                failed=count[TrialState.FAIL] - interrupted,  # those are queued again
                running=count[TrialState.RUNNING],
                best_value=best.value if best else None,
                best_number=best.number if best else None,
                best_params=best.params if best else {},
                mean_seconds=(
                    float(np.mean([t.duration.total_seconds() for t in done if t.duration]))
                    if done
                    else None
                ),
                first_start=min(starts) if starts else None,
            )
        )
    return out


@dataclass(frozen=True)
class TrialRecord:
    """A completed trial as the ensembling and report stages see it."""

    model: str
    number: int
    value: float
    params: dict[str, Any]
    attrs: dict[str, Any]
    dir: Path
    duration_s: float | None


def _record(cfg: StudyConfig, model: str, t: FrozenTrial) -> TrialRecord:
    """A completed trial (of the search, or a follow-up run) as the later stages see it."""
    return TrialRecord(
        model,
        t.number,
        float(t.value or 0.0),
        dict(t.params),
        dict(t.user_attrs),
        cfg.out / t.user_attrs["dir"],
        t.duration.total_seconds() if t.duration else None,
    )


def completed_trials(cfg: StudyConfig, model: str, storage: RDBStorage) -> list[TrialRecord]:
    """Completed trials of one model study, best first."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    records = [_record(cfg, model, t) for t in trials]
    return sorted(records, key=lambda r: r.value, reverse=DIRECTIONS[cfg.cv.metric] == "maximize")


def followup_record(
    cfg: StudyConfig, model: str, storage: RDBStorage, of: TrialRecord, kind: str
) -> TrialRecord | None:
    """The completed `kind` follow-up run (search/followups.py) of trial `of`'s configuration
    (its number and CV value are the configuration's), or None while there is none."""
    run = completed(cfg, model, storage, of.number, kind)
    return (
        None if run is None else replace(_record(cfg, model, run), number=of.number, value=of.value)
    )


def trial_rows(cfg: StudyConfig, model: str, storage: RDBStorage) -> list[dict[str, Any]]:
    """Every trial of a model study, any state, as plain values (for the report)."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    std_key = f"cv_{cfg.cv.metric}_std"
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue  # a trial that ran nothing: the study was full when it started
        epochs = epoch_values(t)  # not the fold scores a multi-fidelity pruner also reports
        last = epochs[max(epochs)] if epochs else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value if t.state == TrialState.COMPLETE else last,
                "cv_std": t.user_attrs.get(std_key),
                "params": dict(t.params),
                "seconds": t.duration.total_seconds() if t.duration else None,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                "used": _used(t.user_attrs),
                "epochs_trained": t.user_attrs.get("epochs_trained"),
            }
        )
    return rows


def _used(attrs: dict[str, Any]) -> str | None:
    """What a trial trained, e.g. "7 ep x 1 fold", "60 ep x 3 folds", "40 ep x 2 folds + 1 kept"
    (folds a retry kept from its first try); None for a trial that did not record it."""
    if "epochs_trained" not in attrs:
        return None
    folds, kept = int(attrs.get("folds_started", 0)), len(attrs.get("folds_resumed", []))
    used = f"{attrs['epochs_trained']} ep x {folds} fold{'s' if folds != 1 else ''}"
    return f"{used} + {kept} kept" if kept else used


def scores(cfg: StudyConfig, model: str, storage: RDBStorage) -> list[TrialScore]:
    """Every complete trial of a model study in trial-number order, with the best value so far:
    the search's history as the `study:<model>` MLflow run draws it."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=_number)
    best, better = best_trial(study), max if DIRECTIONS[cfg.cv.metric] == "maximize" else min
    out, so_far = [], None
    for t in trials:
        value = float(t.value if t.value is not None else math.nan)
        so_far = value if so_far is None else better(so_far, value)
        std = t.user_attrs.get(f"cv_{cfg.cv.metric}_std")
        out.append(
            TrialScore(
                number=t.number,
                value=value,
                std=math.nan if std is None else float(std),
                best_so_far=so_far,
                run_id=str(t.user_attrs.get("mlflow_run_id", "")),
                is_best=best is not None and best.number == t.number,
            )
        )
    return out


def _number(t: FrozenTrial) -> int:
    return t.number


def importances(cfg: StudyConfig, model: str, storage: RDBStorage) -> dict[str, float]:
    """Optuna's own hyperparameter importance (fANOVA) over completed trials; {} when it cannot
    be computed (fewer than two completed trials, or no parameter varies)."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    try:
        found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}
    return {k: float(v) for k, v in found.items()}
