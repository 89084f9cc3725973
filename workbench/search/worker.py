"""The worker loop: run trials, model after model (or, with a budget, as the families compete),
until every study has its trials; then wait for other workers' trials, to retry any whose worker
dies. See workbench/search/__init__.py for what a worker does when others die.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench.config import StudyConfig
from workbench.cv import CrossValidator
from workbench.data import ImageData, Split
from workbench.errors import SearchError
from workbench.events import Events
from workbench.search import budget, followups
from workbench.search.storage import (
    TAKEN,
    followup_kinds,
    followup_study,
    open_storage,
    study_name,
)
from workbench.search.trials import (
    FAILURES_IN_A_ROW,
    Objective,
    Surplus,
    TrialFailed,
    pruner_for,
    sampler_for,
)
from workbench.store import RunStore
from workbench.tracking import FoldRuns, Tracker
from workbench.train import Interrupted


def _has_work(study: optuna.Study, target: int) -> bool:
    """A queued trial (a retry, an enqueued one), or fewer than `target` trials taken."""
    trials = study.get_trials(deepcopy=False, states=TAKEN)
    return any(t.state == TrialState.WAITING for t in trials) or len(trials) < target


def _running_elsewhere(study: optuna.Study) -> list[FrozenTrial]:
    """Running trials of workbench workers (a trial records its worker when it starts)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t in running if "worker" in t.user_attrs]


def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not should_stop():
        time.sleep(0.2)


def run_worker(
    cfg: StudyConfig,
    data: ImageData,
    split: Split,
    tracker: Tracker,
    *,
    worker: int = 0,
    models: list[str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run trials, model after model, until every study has its configured number of trials.

    Then wait while other workers' trials run: if one's worker dies, its trial is failed after 3
    missed heartbeats and its retry runs here. Failed trials (a full disk, a corrupt file) are
    recorded (user attr `error`) and do not count; FAILURES_IN_A_ROW of one model stop the
    worker (SearchError), since something is wrong beyond one trial.
    """
    try:
        _work(cfg, data, split, tracker, worker, models, should_stop)
    finally:  # the MLflow calls still queued (fold runs, uploads) are made before we return
        tracker.flush()


def _work(
    cfg: StudyConfig,
    data: ImageData,
    split: Split,
    tracker: Tracker,
    worker: int,
    models: list[str] | None,
    should_stop: Callable[[], bool],
) -> None:
    storage = open_storage(cfg, tracker)
    names = models or list(cfg.models)
    studies = {
        m: optuna.load_study(
            study_name=study_name(cfg, m),
            storage=storage,
            sampler=sampler_for(cfg, m, worker),
            pruner=pruner_for(cfg),
        )
        for m in names
    }
    events, store = Events([FoldRuns(tracker)]), RunStore(cfg.out, tracker.remote())
    deadline = budget.read(studies[names[0]])  # the command's, set by the parent
    stop = _or(should_stop, deadline.passed) if deadline else should_stop

    # one CrossValidator per model (it holds the model's training rows and folds), shared by
    # the model's search trials and its follow-up runs
    cvs = {m: CrossValidator(cfg, m, data, split, events, stop, store, worker) for m in names}

    def fits(m: str, kind: str = "") -> Callable[[], bool]:  # a refit: 1 training, k/(k-1) rows
        folds = 2 if kind == "refit" else cfg.cv.folds
        return partial(budget.can_finish, studies[m], deadline, cvs[m].max_epochs(), folds)

    def objective(m: str, follow_up: str = "") -> Objective:
        return Objective(cvs[m], tracker, worker, follow_up=follow_up)

    # (name, study, objective, has work?): every model's search, then its follow-up runs
    jobs: list[budget.Job] = [
        (
            m,
            studies[m],
            objective(m),
            _and(partial(_has_work, studies[m], cfg.trials_for(m)), fits(m)),
        )
        for m in names
    ]
    for kind in followup_kinds(cfg):
        for m in names:
            runs = followup_study(cfg, m, kind, storage)
            queued = partial(_has_work, runs, 0)  # a queued (or retried) follow-up run
            new = partial(followups.queue, cfg, m, kind, studies[m], runs)
            work = _and(_or(queued, new), fits(m, kind))
            jobs.append((f"{m}/{kind}", runs, objective(m, kind), work))
    failures = {name: 0 for name, *_ in jobs}
    waiting_for: set[tuple[str, int]] = set()
    while not stop():
        for _, study, *_ in jobs:
            optuna.storages.fail_stale_trials(study)  # FAIL, then StaleTrial queues a retry
        job = next((j for j in budget.in_turn(cfg, jobs, deadline) if j[3]()), None)
        if job is None:
            running = {
                (name, t.number) for name, study, *_ in jobs for t in _running_elsewhere(study)
            }
            if not running or deadline is not None:  # with a budget: none fits, none to retry
                break
            if not running <= waiting_for:
                waiting_for |= running
                listed = ", ".join(f"{m} #{n}" for m, n in sorted(running))
                print(
                    f"worker {worker}: every study has its trials; waiting for {listed} in "
                    f"other workers (a trial without heartbeat for {3 * cfg.search.heartbeat} s "
                    f"is failed and retried here)",
                    flush=True,
                )
            _pause(min(cfg.search.heartbeat, 2), should_stop)  # ends soon after they do
            continue
        name, study, obj, _ = job
        assert isinstance(obj, Objective)
        try:
            ended = _run_one(study, obj)
        except Interrupted:
            if deadline is None or should_stop():  # Ctrl-C: the worker stops
                raise
            print(f"worker {worker}: the budget's search time is spent; its trial is queued again")
            break
        failed = ended is not None and ended.state == TrialState.FAIL
        failures[name] = failures[name] + 1 if failed else 0
        if ended is not None and failures[name] >= FAILURES_IN_A_ROW:
            raise _too_many(name, failures[name], ended)


def _too_many(job: str, count: int, last: FrozenTrial) -> SearchError:
    model, _, kind = job.partition("/")
    runs = {"snapshots": "snapshot runs", "refit": "refits"}.get(kind, "trials")
    error = last.user_attrs.get("error", "an error the worker's log shows")
    return SearchError(
        f"model '{model}': {count} {runs} in a row failed, the last (trial {last.number}) with "
        f"{error}; this worker stops, since something is wrong beyond one trial"
    )


def _or(first: Callable[[], bool], second: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: first() or second()


def _and(first: Callable[[], bool], second: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: first() and second()


def _run_one(study: optuna.Study, objective: Objective) -> FrozenTrial | None:
    """One trial; returns it as it ended, or None for one that is not ours to count (surplus, or
    failed by another worker while it ran)."""
    ended: list[FrozenTrial] = []
    try:
        study.optimize(
            objective,
            n_trials=1,
            catch=(TrialFailed, Surplus),
            callbacks=[lambda _, trial: ended.append(trial)],
        )
    except ValueError:  # Optuna's "Cannot tell a FAIL trial": another worker failed it
        if objective.superseded is None:
            raise
        print(
            f"{study.study_name} trial {objective.superseded}: failed by another worker while it "
            f"ran here (its heartbeats stalled); its retry runs it again",
            flush=True,
        )
        return None
    if not ended or ended[0].user_attrs.get("surplus"):
        return None
    return ended[0]
