"""Trials: the objective (k-fold CV of sampled hyperparameters), pruning, the worker loop and the
follow-up runs. See workbench/search/__init__.py for pruning and what a worker does when others die.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, Trial, TrialState

from workbench.config import Choice, IntRange, Param, StudyConfig
from workbench.cv import CrossValidator, Pruned, Report, run_state
from workbench.data import ImageData, Split
from workbench.errors import SearchError, SpaceError
from workbench.events import Events, RunRef
from workbench.runtime import derive_seed
from workbench.search import followups, room
from workbench.search.storage import (
    TAKEN,
    followup_kinds,
    followup_study,
    open_storage,
    requeue,
    study_name,
)
from workbench.store import RunStore
from workbench.tracking import FoldRuns, Tracker
from workbench.train import Interrupted


def sample_params(trial: Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Draw one value per searched hyperparameter; names are the study file's own."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if isinstance(p, Choice):
            out[name] = trial.suggest_categorical(name, list(p.choices))  # type: ignore[arg-type]
        elif isinstance(p, IntRange):
            out[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
        else:
            out[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return out


def _pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            s.percentile,
            n_startup_trials=s.pruner_startup_trials,
            n_warmup_steps=s.pruner_warmup_epochs,
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=s.pruner_startup_trials, n_warmup_steps=s.pruner_warmup_epochs
    )


def _sampler(cfg: StudyConfig, model: str, worker: int) -> optuna.samplers.BaseSampler:
    seed = derive_seed(cfg.seed, model, "sampler", worker)  # differs per worker, fixed per study
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=cfg.search.startup_trials, multivariate=True
    )


class Surplus(Exception):
    """Other workers took the study's last trial first: this one ends (FAIL) before any work."""


class TrialFailed(Exception):
    """Any other error stopped the trial (a full disk, a factory's ValueError, MLflow's "database
    is locked"): it ends FAIL with user attr `error`, and the worker goes on to the next."""


FAILURES_IN_A_ROW = 4  # of one model stop the worker: something is wrong beyond one trial


def _surplus(trial: Trial, target: int) -> bool:
    """Do the trials numbered before this one (finished, running or queued) fill the study?"""
    taken = trial.study.get_trials(deepcopy=False, states=TAKEN)
    return sum(t.number < trial.number for t in taken) >= target


@dataclass
class Objective:
    """Score one trial: the mean over the k folds of the study's metric. With `follow_up`
    ("snapshots" or "refit"), the trials are the model's follow-up runs of its best
    configuration (workbench/search/followups.py), not sampled; a refit scores as that
    configuration did (it has no validation rows of its own)."""

    cv: CrossValidator
    tracker: Tracker
    worker: int = 0  # the worker's index, recorded on each trial it runs
    superseded: int | None = None  # our last trial, if another worker failed it while it ran
    follow_up: str = ""  # "", "snapshots" or "refit"

    def __call__(self, trial: Trial) -> float:
        self.superseded = None
        try:
            return self._run(trial)
        except UpdateFinishedTrialError:  # our heartbeats stalled past the grace period
            self.superseded = trial.number
            raise
        except (Interrupted, optuna.TrialPruned, Surplus, SpaceError):  # each has its own path
            raise
        except Exception as e:  # not BaseException: a KeyboardInterrupt ends the worker
            raise self._failed(trial, e) from e

    def _failed(self, trial: Trial, e: Exception) -> TrialFailed:
        """Log the error in one line and record it on the trial (user attr `error`)."""
        error = " ".join(f"{type(e).__name__}: {e}".split())[:1000].removesuffix(":")
        print(f"{trial.study.study_name} trial {trial.number} failed: {error}", flush=True)
        try:
            trial.set_user_attr("error", error)
        except UpdateFinishedTrialError:  # another worker failed it meanwhile: its retry's now
            self.superseded = trial.number
            raise
        except Exception:  # the storage itself fails: the log line above is the record
            pass
        return TrialFailed(error)

    def _run(self, trial: Trial) -> float:
        cfg, model, store = self.cv.cfg, self.cv.model, self.cv.run_store
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        if (
            followups.is_surplus(trial)
            if self.follow_up
            else _surplus(trial, cfg.trials_for(model))
        ):
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its trials; nothing run")
        # a retry inherits its first try's user attrs: the same folder (kept folds), the same seeds
        first = int(trial.user_attrs.get("first_try", trial.number))
        label: int | str
        seed_label: int | str
        report: Report | None
        if self.follow_up:
            of = int(trial.user_attrs["of_trial"])
            hp, out = dict(trial.user_attrs["hp"]), store.followup(model, self.follow_up, of)
            label = seed_label = f"{self.follow_up}-of-{of}"
            report = None  # one run of a chosen configuration: nothing to prune
        else:
            spec = cfg.models[model]
            hp = {**spec.params, **sample_params(trial, spec.space)}
            out, label, seed_label = store.trial(model, first), trial.number, first
            report = self._reporter(trial)
        room.check(trial, self.cv, hp, out, first, self.follow_up)  # or stop, trial requeued
        run = self.tracker.start_trial(model, label, hp)
        trial.set_user_attr("mlflow_run_id", run)
        trial.set_user_attr("first_try", first)
        trial.set_user_attr("dir", store.relative(out))  # relative: portable
        if first != trial.number:  # a retry: the folds its earlier tries finished, from any host
            store.pull(out)
        t0 = time.perf_counter()
        try:
            if self.follow_up == "refit":  # one training on every row: the configuration's score
                history = self.cv.refit(hp, out, RunRef(model, label, run), seed_label)
                scores = [float(trial.user_attrs["of_value"])]
                summary = {**history[-1], "seconds": time.perf_counter() - t0}
            else:
                result = self.cv.run(hp, out, RunRef(model, label, run), report, seed_label)
                scores = result.accuracy if cfg.cv.metric == "accuracy" else result.log_loss
                summary = {**result.summary(), "seconds": time.perf_counter() - t0}
                trial.set_user_attr("folds_resumed", result.resumed)
                trial.set_user_attr("best_epochs", result.best_epochs)
            for key, value in {**summary, "fold_scores": scores}.items():
                trial.set_user_attr(key, value)
            manifest = store.seal(out)
            trial.set_user_attr("files", manifest)
        except BaseException as e:
            self.tracker.end_trial(run, run_state(e), {})
            self._after_failure(trial, e, out)
            if isinstance(e, Pruned):
                raise optuna.TrialPruned(str(e)) from None
            raise
        self.tracker.end_trial(run, "COMPLETE", summary, files=manifest["uri"])
        return float(np.mean(scores))

    def _after_failure(self, trial: Trial, e: BaseException, out: Path) -> None:
        """Ctrl-C: the trial goes back in the queue with its parameters, its completed folds
        kept for the retry. Failed under us by another worker: the folder is its retry's now.
        Otherwise (pruned, failed): only completed trials leave files."""
        if isinstance(e, Interrupted):
            requeue(trial.study, trial.number)
            trial.set_user_attr("interrupted", True)  # after the copy: the retry is not
            print(
                f"{trial.study.study_name} trial {trial.number}: interrupted; queued again with "
                f"the same parameters, its completed folds kept in {out}",
                flush=True,
            )
        elif not isinstance(e, UpdateFinishedTrialError):
            self.cv.run_store.discard(out)

    def _reporter(self, trial: Trial) -> Report:
        """Report each epoch at step fold * max_epochs + epoch; raise Pruned when hopeless."""
        metric = "val_accuracy" if self.cv.cfg.cv.metric == "accuracy" else "val_loss"
        stride = self.cv.max_epochs()

        def report(fold: int, epoch: int, metrics: dict[str, float]) -> None:
            if not np.isfinite(metrics["val_loss"]):
                trial.set_user_attr("diverged", True)
                raise Pruned(f"validation loss is {metrics['val_loss']} (diverged)")
            trial.report(metrics[metric], step=fold * stride + epoch)
            if trial.should_prune():
                raise Pruned(f"fold {fold} epoch {epoch}: {metric}={metrics[metric]:.4f}")

        return report


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
            sampler=_sampler(cfg, m, worker),
            pruner=_pruner(cfg),
        )
        for m in names
    }
    events, store = Events([FoldRuns(tracker)]), RunStore(cfg.out, tracker.remote())

    # one CrossValidator per model (it holds the model's training rows and folds), shared by
    # the model's search trials and its follow-up runs
    cvs = {
        m: CrossValidator(cfg, m, data, split, events, should_stop, store, worker) for m in names
    }

    def objective(m: str, follow_up: str = "") -> Objective:
        return Objective(cvs[m], tracker, worker, follow_up=follow_up)

    # (name, study, objective, has work?): every model's search, then its follow-up runs
    jobs: list[tuple[str, optuna.Study, Objective, Callable[[], bool]]] = [
        (m, studies[m], objective(m), partial(_has_work, studies[m], cfg.trials_for(m)))
        for m in names
    ]
    for kind in followup_kinds(cfg):
        for m in names:
            runs = followup_study(cfg, m, kind, storage)
            queued = partial(_has_work, runs, 0)  # a queued (or retried) follow-up run
            new = partial(followups.queue, cfg, m, kind, studies[m], runs)
            jobs.append((f"{m}/{kind}", runs, objective(m, kind), _either(queued, new)))
    failures = {name: 0 for name, *_ in jobs}
    waiting_for: set[tuple[str, int]] = set()
    while not should_stop():
        for _, study, *_ in jobs:
            optuna.storages.fail_stale_trials(study)  # FAIL, then StaleTrial queues a retry
        job = next((j for j in jobs if j[3]()), None)
        if job is None:
            running = {
                (name, t.number) for name, study, *_ in jobs for t in _running_elsewhere(study)
            }
            if not running:
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
        ended = _run_one(study, obj)
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


def _either(first: Callable[[], bool], second: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: first() or second()


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
