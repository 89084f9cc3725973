"""The search: one Optuna study per model, each trial scored by stratified k-fold cross-validation.

Only this package imports optuna. The parent creates every study before any worker starts (two
workers creating a new storage at once race); workers then call `run_worker`, which runs trials
until each study has its configured number of finished (complete + pruned) trials, so a second run
resumes rather than restarts.

Many workers, one storage. Each running trial sends a heartbeat every `search.heartbeat` seconds
and records who runs it (user attrs `worker`, `pid`, `host`). A trial without a heartbeat for 3
intervals belongs to a dead worker: the next worker to look fails it, deletes its half-written
folder, closes its MLflow run and queues a retry with the same parameters (at most twice). A worker
whose studies are all taken therefore waits while other workers' trials run, so that it can run
such a retry. Two workers that both saw room for the study's last trial both start one: the later
number sees that the earlier ones fill the study and ends at once as a FAIL with user attr
`surplus` (no parameters, no files, not counted anywhere). On SQLite every transaction begins
IMMEDIATE: without it Optuna's read-then-write steps are not atomic across processes, and two
workers can pop the same queued trial and run it twice.

Pruning. The folds are the same for every trial (seeded once per study), so "fold k, epoch e" is
the same task in every trial. A trial reports its current fold's validation metric at step
`k * max_epochs + e`, and the median (or percentile) pruner compares it with other trials at the
same step: a hopeless trial is stopped within its first fold, not after k full trainings.
Multi-fidelity pruners (hyperband, asha: search/fidelity.py) give fold 0's epochs in rungs and
test each completed fold against the best trial's. A time budget (search/budget.py) starts only
trials that can finish by the study's deadline and lets model families compete for trials.

Interrupted trials. Ctrl-C stops a worker after the current epoch; its running trial ends FAIL
with user attr `interrupted` and a copy with the same parameters is queued (as for a dead
worker), so the next worker to start runs it. A retry (of a dead worker's trial or of an
interrupted one) inherits its first try's folder, keeps the folds completed there and trains
only the missing ones, with the seeds the first try would have used (user attr `first_try`).
A trial whose files the disk cannot take (search/room.py, checked before it writes anything) is
queued again the same way (user attr `disk_short`), and its worker stops with a SpaceError that
says what the trial needs and what is free.

Follow-up runs are trials too (search/followups.py): once a model's search has nothing running
or queued, a worker queues one trial in the model's `<study>/<model>/snapshots` study
(`[ensemble] snapshots = M`: the best configuration retrained with M cosine cycles) and one in
`<study>/<model>/refit` (`[ensemble] refit = true`: retrained once on every training row); any
worker runs them, with the same heartbeats, retries and sealed files as a search trial.

On disk: the run store's layout (workbench/store.py). A completed trial records its folder
(`dir`, relative to the study's folder) and its manifest (`files`: URI, sha256 per file).
"""

from optuna.storages import RDBStorage

from workbench.search import budget, dashboard
from workbench.search.followups import pending as pending_followups
from workbench.search.followups import refit_hp
from workbench.search.results import (
    ModelProgress,
    TrialRecord,
    completed_trials,
    followup_record,
    importances,
    progress,
    scores,
    trial_rows,
)
from workbench.search.storage import (
    DIRECTIONS,
    FINISHED,
    TAKEN,
    StaleTrial,
    create_studies,
    followup_kinds,
    followup_study,
    followup_study_name,
    missing_studies,
    open_storage,
    preload,
    shown_url,
    storage_url,
    study_name,
)
from workbench.search.trials import Objective, sample_params
from workbench.search.worker import _has_work, run_worker

__all__ = [
    "DIRECTIONS",
    "FINISHED",
    "TAKEN",
    "ModelProgress",
    "Objective",
    "RDBStorage",
    "StaleTrial",
    "TrialRecord",
    "_has_work",
    "budget",
    "completed_trials",
    "create_studies",
    "dashboard",
    "followup_kinds",
    "followup_record",
    "followup_study",
    "followup_study_name",
    "importances",
    "missing_studies",
    "open_storage",
    "pending_followups",
    "preload",
    "progress",
    "refit_hp",
    "run_worker",
    "sample_params",
    "scores",
    "shown_url",
    "storage_url",
    "study_name",
    "trial_rows",
]
