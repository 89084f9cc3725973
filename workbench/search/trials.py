"""Trials: the objective (k-fold CV of sampled hyperparameters), its sampler and pruner, and the
follow-up runs. The loop that runs them is workbench/search/worker.py; see
workbench/search/__init__.py for pruning and what a worker does when others die.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import Trial

from workbench.config import Choice, IntRange, Param, StudyConfig
from workbench.cv import CrossValidator, Pruned, Report, run_state
from workbench.errors import SpaceError
from workbench.events import RunRef
from workbench.runtime import derive_seed
from workbench.search import fidelity, followups, room
from workbench.search.storage import (
    TAKEN,
    requeue,
)
from workbench.tracking import Tracker
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


def pruner_for(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner in ("hyperband", "asha"):  # rungs in fold 0, then a test per fold
        return fidelity.FidelityPruner(s.pruner, p_threshold=s.wilcoxon_p)
    if s.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            s.percentile,
            n_startup_trials=s.pruner_startup_trials,
            n_warmup_steps=s.pruner_warmup_epochs,
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=s.pruner_startup_trials, n_warmup_steps=s.pruner_warmup_epochs
    )


def sampler_for(cfg: StudyConfig, model: str, worker: int) -> optuna.samplers.BaseSampler:
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
        usage = fidelity.Usage()  # epochs per fold, counted by the report hook
        if self.follow_up:
            of = int(trial.user_attrs["of_trial"])
            hp, out = dict(trial.user_attrs["hp"]), store.followup(model, self.follow_up, of)
            label = seed_label = f"{self.follow_up}-of-{of}"
            report = None  # one run of a chosen configuration: nothing to prune
        else:
            spec = cfg.models[model]
            hp = {**spec.params, **sample_params(trial, spec.space)}
            out, label, seed_label = store.trial(model, first), trial.number, first
            report = self._reporter(trial, out, usage)
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
                usage.record(trial)  # the leaderboard's "used": epochs x folds
            for key, value in {**summary, "fold_scores": scores}.items():
                trial.set_user_attr(key, value)
            manifest = store.seal(out)
            trial.set_user_attr("files", manifest)
        except BaseException as e:
            self.tracker.end_trial(run, run_state(e), {})
            self._after_failure(trial, e, out)
            if isinstance(e, Pruned):
                usage.record(trial)
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

    def _reporter(self, trial: Trial, out: Path, usage: fidelity.Usage) -> Report:
        """Report each epoch at step fold * max_epochs + epoch, and under hyperband/asha each
        completed fold's score (search/fidelity.py); raise Pruned when hopeless. `usage`
        counts the epochs trained per fold."""
        metric = "val_accuracy" if self.cv.cfg.cv.metric == "accuracy" else "val_loss"
        stride = self.cv.max_epochs()
        multi_fidelity = self.cv.cfg.search.pruner in ("hyperband", "asha")
        folds = fidelity.FoldReports.begin(trial, self.cv, out) if multi_fidelity else None

        def report(fold: int, epoch: int, metrics: dict[str, float]) -> None:
            usage.count(fold)
            if not np.isfinite(metrics["val_loss"]):
                trial.set_user_attr("diverged", True)
                raise Pruned(f"validation loss is {metrics['val_loss']} (diverged)")
            if folds is not None:
                folds.before(fold)
            trial.report(metrics[metric], step=fold * stride + epoch)
            if trial.should_prune():
                at = f"fold {fold} epoch {epoch}: {metric}={metrics[metric]:.4f}"
                raise Pruned(f"{at}; {folds.reason()}" if folds is not None and folds.done else at)

        return report
