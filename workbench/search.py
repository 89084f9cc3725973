"""The search: one Optuna study per model, each trial scored by stratified k-fold cross-validation.

Only this module imports optuna. The parent creates every study before any worker starts (two
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

On disk, per completed trial: `<out>/trials/<model>/<number>/fold-<k>.pt` (k fold checkpoints) and
`oof.npz` (rows: data indices, y, proba: out-of-fold class probabilities, every training row once).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from workbench.config import Choice, IntRange, Param, StudyConfig, resume_key
from workbench.cv import CrossValidator, Pruned, Report, run_state
from workbench.data import ImageData, Split
from workbench.errors import CheckpointError, StorageError
from workbench.runtime import derive_seed
from workbench.tracking import Tracker

DIRECTIONS: dict[str, Literal["maximize", "minimize"]] = {
    "accuracy": "maximize",
    "log_loss": "minimize",
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)  # trials that fill a study
MAX_RETRY = 2  # retries of a trial whose worker died (a third death leaves it FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats and their retry callback are "experimental" since Optuna 2.8; they are the only way
# an RDB storage learns that a worker died, so workbench relies on them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def study_name(cfg: StudyConfig, model: str) -> str:
    return f"{cfg.name}/{model}"


def storage_url(cfg: StudyConfig) -> str:
    """The study file's URL, else WORKBENCH_STORAGE, else SQLite in the output folder."""
    default = f"sqlite:///{(cfg.out / 'optuna.db').resolve()}"
    return cfg.search.storage or os.environ.get("WORKBENCH_STORAGE") or default


def open_storage(cfg: StudyConfig, tracker: Tracker | None = None) -> RDBStorage:
    """An RDB storage with heartbeats: a dead worker's trial is failed and retried (`StaleTrial`;
    with `tracker`, its MLflow run is closed too)."""
    url = storage_url(cfg)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    beat = cfg.search.heartbeat
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=beat,
            grace_period=3 * beat,
            heartbeat_stale_trial_callback=StaleTrial(cfg.out, 3 * beat, tracker),
        )
    except Exception as e:  # sqlalchemy's errors, a missing driver, a refused connection
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (pip install psycopg2-binary)" if "psycopg2" in first else ""
        shown = _without_password(url)
        raise StorageError(
            f"cannot open the Optuna storage {shown!r}: {first}{hint}. Check the URL in "
            f"search.storage or WORKBENCH_STORAGE (e.g. postgresql://user:pass@host/db) and that "
            f"the server runs."
        ) from None
    if storage.engine.dialect.name == "sqlite" and storage.engine.url.database not in (
        None,
        "",
        ":memory:",
    ):
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine: sqlalchemy.engine.Engine) -> None:
    """Begin every SQLite transaction with BEGIN IMMEDIATE (the write lock; SQLAlchemy's pysqlite
    recipe), so that a read-then-write of Optuna's (pop a waiting trial, fail a stale one) is
    atomic across processes. Other connections wait for the lock (`timeout`, 60 s)."""

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own

    def on_begin(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", on_connect)
    sqlalchemy.event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections opened before the hooks (table checks) reopen with them


@dataclass
class StaleTrial:
    """Called (by the worker that notices) for a trial whose heartbeats stopped: its worker died.

    Queues a retry with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback: a new
    WAITING trial, `failed_trial` = the first number), deletes the half-written trial folder,
    closes its MLflow trial run as FAILED (its fold runs are closed when the search stage ends)
    and says so in the log.
    """

    out: Path  # the study's output folder
    grace_s: int  # seconds without a heartbeat before a trial counts as dead
    tracker: Tracker | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
        attrs = trial.user_attrs
        if "dir" in attrs:
            shutil.rmtree(self.out / attrs["dir"], ignore_errors=True)
        run = attrs.get("mlflow_run_id")
        if self.tracker is not None and run:
            try:
                self.tracker.end_trial(run, "FAIL", {})
            except Exception as e:  # the record can wait for the stage's end; the search cannot
                print(f"warning: could not close MLflow run {run}: {e}", flush=True)
        owner = (
            f"worker {attrs['worker']} (pid {attrs.get('pid')} on {attrs.get('host')})"
            if "worker" in attrs
            else "its worker"
        )
        retried = len(trial.system_attrs.get("retry_history", [])) < MAX_RETRY
        print(
            f"{study.study_name} trial {trial.number}: no heartbeat from {owner} for "
            f"{self.grace_s} s: failed; "
            + ("queued again with the same parameters" if retried else "retried enough, dropped"),
            flush=True,
        )


def _without_password(url: str) -> str:
    """The URL as an error message may show it: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: it holds no password we could find
        return url


def create_studies(cfg: StudyConfig, storage: RDBStorage) -> dict[str, optuna.Study]:
    """Create (or load) one study per model; refuse to resume one made from an incompatible file."""
    key = resume_key(cfg)
    studies = {}
    for model in cfg.models:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name(cfg, model),
            direction=DIRECTIONS[cfg.cv.metric],
            load_if_exists=True,
        )
        old = study.user_attrs.get("resume_key")
        if old is None:
            study.set_user_attr("resume_key", key)
        elif old != key:
            changed = ", ".join(_diff(old, key)) or "(structure)"
            raise StorageError(
                f"study '{study.study_name}' in {storage_url(cfg)} was made from a different study "
                f"file; changed: {changed}. Undo the change, or set a new `name` (or delete "
                f"{cfg.out}) to start a new study."
            )
        studies[model] = study
    return studies


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


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


def trial_dir(cfg: StudyConfig, model: str, number: int) -> Path:
    return cfg.out / "trials" / model / f"{number:04d}"


class Surplus(Exception):
    """Other workers took the study's last trial first: this one ends (FAIL) before any work."""


def _surplus(trial: Trial, target: int) -> bool:
    """Do the trials numbered before this one (finished, running or queued) fill the study?"""
    taken = trial.study.get_trials(deepcopy=False, states=TAKEN)
    return sum(t.number < trial.number for t in taken) >= target


@dataclass
class Objective:
    """Score one trial: the mean over the k folds of the study's metric."""

    cv: CrossValidator
    worker: int = 0  # the worker's index, recorded on each trial it runs
    superseded: int | None = None  # our last trial, if another worker failed it while it ran

    def __call__(self, trial: Trial) -> float:
        self.superseded = None
        try:
            return self._run(trial)
        except UpdateFinishedTrialError:  # our heartbeats stalled past the grace period
            self.superseded = trial.number
            raise

    def _run(self, trial: Trial) -> float:
        cfg, model = self.cv.cfg, self.cv.model
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        if _surplus(trial, cfg.trials_for(model)):
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its trials; nothing run")
        spec = cfg.models[model]
        hp = {**spec.params, **sample_params(trial, spec.space)}
        out = trial_dir(cfg, model, trial.number)
        run = self.cv.tracker.start_trial(model, trial.number, hp)
        trial.set_user_attr("mlflow_run_id", run)
        trial.set_user_attr("dir", str(out.relative_to(cfg.out)))  # relative: portable
        t0 = time.perf_counter()
        try:
            result = self.cv.run(hp, out, run, trial.number, self._reporter(trial))
            scores = result.accuracy if cfg.cv.metric == "accuracy" else result.log_loss
            summary = {**result.summary(), "seconds": time.perf_counter() - t0}
            for key, value in {**summary, "fold_scores": scores}.items():
                trial.set_user_attr(key, value)
        except BaseException as e:
            shutil.rmtree(out, ignore_errors=True)  # only completed trials become members
            self.cv.tracker.end_trial(run, run_state(e), {})
            if isinstance(e, Pruned):
                raise optuna.TrialPruned(str(e)) from None
            raise
        self.cv.tracker.end_trial(run, "COMPLETE", summary, oof_path=out / "oof.npz")
        return float(np.mean(scores))

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


def run_snapshots(cv: CrossValidator, cycles: int, claim: bool = False) -> Path | None:
    """A snapshot ensemble (Huang et al. 2017) of the model's best configuration: its k folds
    retrained with `cycles` cosine cycles, one snapshot member per cycle (in snap-<m>/).

    Done once per study; with `claim`, a worker skips a run another worker has claimed.
    Returns the folder, or None when the model has no completed trial (or another has it).
    """
    cfg = cv.cfg
    study = optuna.load_study(study_name=study_name(cfg, cv.model), storage=open_storage(cfg))
    best = _best(study)
    out = cfg.out / "snapshots" / cv.model
    if best is None:
        return None
    done = out / "trial.json"
    if done.exists() and json.loads(done.read_text()) == {"trial": best.number, "cycles": cycles}:
        return out
    if claim:
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return None  # the best may still change: the parent runs it after the search
        out.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(out / ".claimed", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
    hp = {
        **cfg.models[cv.model].params,
        **best.params,
        "schedule": "cosine_restarts",
        "cycles": cycles,
    }
    hp["epochs"] = max(int(hp.get("epochs", cfg.train.epochs)), cycles)  # >= 1 epoch a cycle
    for old in out.glob("snap-*"):  # made from an older best, or half made
        shutil.rmtree(old)
    label = f"snapshots-of-{best.number}"
    run = cv.tracker.start_trial(cv.model, label, hp)
    try:
        result = cv.run(hp, out, run, label)
    except BaseException as e:
        cv.tracker.end_trial(run, run_state(e), {})
        raise
    done.write_text(json.dumps({"trial": best.number, "cycles": cycles}))
    cv.tracker.end_trial(run, "COMPLETE", result.summary(), oof_path=out / "oof.npz")
    return out


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
    recorded and do not count; more than three in a row of one model stops the worker, since
    something is wrong beyond one trial.
    """
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
    objectives = {
        m: Objective(CrossValidator(cfg, m, data, split, tracker, should_stop), worker)
        for m in names
    }
    failures = dict.fromkeys(names, 0)
    waiting_for: set[tuple[str, int]] = set()
    while not should_stop():
        for study in studies.values():
            optuna.storages.fail_stale_trials(study)  # FAIL, then StaleTrial queues a retry
        model = next((m for m in names if _has_work(studies[m], cfg.trials_for(m))), None)
        if model is None:
            running = {(m, t.number) for m in names for t in _running_elsewhere(studies[m])}
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
        ended = _run_one(studies[model], objectives[model])
        failed = ended is not None and ended.state == TrialState.FAIL
        failures[model] = failures[model] + 1 if failed else 0
        if failures[model] > 3:
            raise StorageError(f"{study_name(cfg, model)}: 4 trials in a row failed; see the log")
    if cfg.ensemble.enabled and cfg.ensemble.snapshots > 1:  # then the snapshot runs, shared out
        for model in names:
            if should_stop():
                break
            cv = CrossValidator(cfg, model, data, split, tracker, should_stop)
            run_snapshots(cv, cfg.ensemble.snapshots, claim=True)


def _run_one(study: optuna.Study, objective: Objective) -> FrozenTrial | None:
    """One trial; returns it as it ended, or None for one that is not ours to count (surplus, or
    failed by another worker while it ran)."""
    ended: list[FrozenTrial] = []
    try:
        study.optimize(
            objective,
            n_trials=1,
            catch=(OSError, CheckpointError, Surplus),
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
        done = [t for t in trials if t.state in FINISHED and t.duration]
        best = _best(study)
        starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
        out.append(
            ModelProgress(
                model=model,
                target=cfg.trials_for(model),
                complete=count[TrialState.COMPLETE],
                pruned=count[TrialState.PRUNED],
                failed=count[TrialState.FAIL],
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


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


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


def completed_trials(cfg: StudyConfig, model: str, storage: RDBStorage) -> list[TrialRecord]:
    """Completed trials of one model study, best first."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    records = [
        TrialRecord(
            model,
            t.number,
            float(t.value or 0.0),
            dict(t.params),
            dict(t.user_attrs),
            cfg.out / t.user_attrs["dir"],
            t.duration.total_seconds() if t.duration else None,
        )
        for t in trials
    ]
    return sorted(records, key=lambda r: r.value, reverse=DIRECTIONS[cfg.cv.metric] == "maximize")


def trial_rows(cfg: StudyConfig, model: str, storage: RDBStorage) -> list[dict[str, Any]]:
    """Every trial of a model study, any state, as plain values (for the report)."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    std_key = f"cv_{cfg.cv.metric}_std"
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue  # a trial that ran nothing: the study was full when it started
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value if t.state == TrialState.COMPLETE else last,
                "cv_std": t.user_attrs.get(std_key),
                "params": dict(t.params),
                "seconds": t.duration.total_seconds() if t.duration else None,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            }
        )
    return rows


def importances(cfg: StudyConfig, model: str, storage: RDBStorage) -> dict[str, float]:
    """Optuna's own hyperparameter importance (fANOVA) over completed trials; {} when it cannot
    be computed (fewer than two completed trials, or no parameter varies)."""
    study = optuna.load_study(study_name=study_name(cfg, model), storage=storage)
    try:
        found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}
    return {k: float(v) for k, v in found.items()}
