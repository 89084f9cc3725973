"""Optuna storages and studies: one study per model, created by the parent before any worker.

See workbench/search/__init__.py for how many workers share one storage.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from workbench.config import StudyConfig, resume_key
from workbench.errors import StorageError
from workbench.store import RunStore
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
    default = f"sqlite:///{RunStore(cfg.out).file('optuna.db').resolve()}"
    return cfg.search.storage or os.environ.get("WORKBENCH_STORAGE") or default


def preload(cfg: StudyConfig) -> None:
    """Import what opening the storage imports, and configure the ORM's mappers, without
    connecting: a parent about to fork its workers does it once, for all of them. RDBStorage
    imports alembic, mako, pygments, the ORM models and the dialect on first use (+20 MB of
    proportional set size a process here); after the fork each process paid it again, and
    measured in a forked child, opening a storage and creating a study made 35.8 MB of its
    memory private, 15-17 MB once this ran before the fork."""
    import alembic.command
    import alembic.config
    import alembic.migration
    import alembic.script  # noqa: F401
    import sqlalchemy.orm
    from optuna.storages._rdb import models  # noqa: F401  (optuna's own lazy import)

    with contextlib.suppress(Exception):  # a missing driver: open_storage says so, in full
        sqlalchemy.create_engine(storage_url(cfg)).dispose()  # the dialect and its driver
    sqlalchemy.orm.configure_mappers()


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
        hint = " (pip install 'psycopg[binary]')" if "psycopg" in first else ""
        shown = shown_url(url)
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


def missing_studies(cfg: StudyConfig) -> list[str]:
    """The model studies that the storage lacks, read without creating anything: no file, no
    table (a SQLite file that does not exist, or a database without Optuna's tables, holds none).
    The storage is assumed reachable (the CLI's preflight checks it first)."""
    url, names = storage_url(cfg), [study_name(cfg, m) for m in cfg.models]
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return names
    storage = RDBStorage(url, skip_table_creation=True, skip_compatibility_check=True)
    try:
        existing = set(optuna.get_all_study_names(storage))
    except sqlalchemy.exc.SQLAlchemyError:  # no Optuna tables in this database yet
        existing = set()
    finally:
        storage.engine.dispose()
    return [n for n in names if n not in existing]


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
    WAITING trial, `failed_trial` = the first number, the user attrs copied), keeps the trial
    folder's completed folds for that retry (or deletes the folder when the trial is out of
    retries), closes its MLflow trial run as FAILED (its fold runs are closed when the search
    stage ends) and says so in the log.
    """

    out: Path  # the study's output folder
    grace_s: int  # seconds without a heartbeat before a trial counts as dead
    tracker: Tracker | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
        attrs = trial.user_attrs
        retried = len(trial.system_attrs.get("retry_history", [])) < MAX_RETRY
        if "dir" in attrs and not retried:
            RunStore(self.out).discard(self.out / attrs["dir"])
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
        print(
            f"{study.study_name} trial {trial.number}: no heartbeat from {owner} for "
            f"{self.grace_s} s: failed; "
            + ("queued again with the same parameters" if retried else "retried enough, dropped"),
            flush=True,
        )


def requeue(study: optuna.Study, number: int) -> None:
    """Queue a copy of running trial `number` (same parameters, user attrs and retry history as
    a heartbeat retry), for a trial stopped by the user rather than failed by its objective."""
    (trial,) = (t for t in study.get_trials(deepcopy=False) if t.number == number)
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial)


def shown_url(url: str) -> str:
    """The URL as an error message may show it: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: it holds no password we could find
        return url


def followup_kinds(cfg: StudyConfig) -> list[str]:
    """The follow-up runs the study file asks for (search/followups.py)."""
    if not cfg.ensemble.enabled:
        return []
    kinds = {"snapshots": cfg.ensemble.snapshots > 1, "refit": cfg.ensemble.refit}
    return [k for k, on in kinds.items() if on]


def followup_study_name(cfg: StudyConfig, model: str, kind: str) -> str:
    """The study of a model's follow-up runs: `<study>/<model>/snapshots` or `.../refit`."""
    return f"{study_name(cfg, model)}/{kind}"


def followup_study(cfg: StudyConfig, model: str, kind: str, storage: Any) -> optuna.Study:
    """The model's study of `kind` follow-up runs (search/followups.py), created on first use
    (by the parent, or by a worker of a storage made before such runs were trials)."""
    return optuna.create_study(
        storage=storage,
        study_name=followup_study_name(cfg, model, kind),
        direction=DIRECTIONS[cfg.cv.metric],
        load_if_exists=True,
    )


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
        for kind in followup_kinds(cfg):  # before any worker: two creating one race
            followup_study(cfg, model, kind, storage)
    return studies


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if (k in old) != (k in new):  # a key one side lacks, even one whose value is None
                was = repr(old[k]) if k in old else "absent"
                now = repr(new[k]) if k in new else "absent"
                out.append(f"{prefix}{k} ({was} -> {now})")
            else:
                out += _diff(old[k], new[k], f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None
