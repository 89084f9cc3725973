"""Snapshot runs: the best configuration of a model retrained with M cosine cycles, one snapshot
member per cycle (Huang et al. 2017). Workers run them after the search (one per model, claimed
by a file so that two workers do not both train it); the ensemble stage runs any still missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from workbench.cv import CrossValidator, run_state
from workbench.events import RunRef
from workbench.search.storage import best_trial, open_storage, study_name
from workbench.tracking import Tracker


def run_snapshots(
    cv: CrossValidator, tracker: Tracker, cycles: int, claim: bool = False
) -> Path | None:
    """A snapshot ensemble (Huang et al. 2017) of the model's best configuration: its k folds
    retrained with `cycles` cosine cycles, one snapshot member per cycle (in snap-<m>/).

    Done once per study; with `claim`, a worker skips a run another worker has claimed. A run
    stopped half-way resumes its completed folds, unless the best configuration changed.
    Returns the folder, or None when the model has no completed trial (or another has it).
    """
    cfg = cv.cfg
    study = optuna.load_study(study_name=study_name(cfg, cv.model), storage=open_storage(cfg))
    best = best_trial(study)
    store = cv.run_store
    out = store.snapshots(cv.model)
    if best is None:
        return None
    plan = {"trial": best.number, "cycles": cycles}
    done, started = out / "trial.json", out / "run.json"
    if done.exists() and json.loads(done.read_text()).get("plan") == plan:
        return out
    if claim:
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return None  # the best may still change: the parent runs it after the search
        out.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(out / ".claimed", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
    if not (started.exists() and json.loads(started.read_text()) == plan):
        for old in out.glob("[!.]*"):  # made from an older best: start over
            store.discard(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(plan))
    hp = {
        **cfg.models[cv.model].params,
        **best.params,
        "schedule": "cosine_restarts",
        "cycles": cycles,
    }
    hp["epochs"] = max(int(hp.get("epochs", cfg.train.epochs)), cycles)  # >= 1 epoch a cycle
    label = f"snapshots-of-{best.number}"
    run = tracker.start_trial(cv.model, label, hp)
    try:
        result = cv.run(hp, out, RunRef(cv.model, label, run))
    except BaseException as e:
        tracker.end_trial(run, run_state(e), {})
        raise
    manifest = store.seal(out)
    done.write_text(json.dumps({"plan": plan, "files": manifest}))
    tracker.end_trial(run, "COMPLETE", result.summary(), files=manifest["uri"])
    return out
