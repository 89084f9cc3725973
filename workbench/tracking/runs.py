"""The MLflow record of a study. Only this module imports mlflow.

Shape: one experiment per study file; under it `study:<model>` runs, nested `<model>/trial-<n>`
runs, nested `<model>/trial-<n>/fold-<k>` runs, and `ensemble` runs. Tags make them filterable
(`workbench.kind`, `workbench.model`, `optuna.trial_number`, `optuna.state`). Runs are addressed by
id through `MlflowClient` (no fluent active-run stack), so many worker processes can write at once.
Per-epoch metrics are buffered and sent in one `log_batch` per fold (`log_metric` costs 6-9 ms a
call here; a batch of 1,000 values ~0.1 s). The calls of the training path (fold runs, a trial's
params and end, uploads) run on a background thread (writer.py), in order; the other methods
first wait for it, so what they read includes every write queued before. With tracking disabled
every method is a no-op.

No run is left RUNNING by a failure we can see: a fold or trial run is ended (FAILED) even when
logging its artifact fails, a trial ends the fold runs it left open, and when the search stage
ends the parent closes any trial or fold run a dead worker left RUNNING (a killed process cannot
close its own). With MLflow 3 the pyfunc model is a LoggedModel of the ensemble run (its outputs;
`runs:/<id>/model` loads it), stored under `<artifacts>/models/<model id>/`, not a run artifact.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.config import StudyConfig, fingerprint, resolved
from workbench.errors import StorageError
from workbench.results import EnsembleResult
from workbench.tracking import experiment as ui
from workbench.tracking.experiment import DataRef, TrialScore
from workbench.tracking.settings import artifact_root, flatten, git_commit, tracking_uri
from workbench.tracking.writer import Writer

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# a tracking server's client prints "View run ... at: <url>" for every run it ends (and fetches
# the run again to do it): hundreds of lines a study in the worker logs. The parent prints one
# line instead (`Tracker.where`).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables"
logging.getLogger("alembic").setLevel(logging.WARNING)

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "KILLED": "KILLED"}
BATCH_PARAMS = 100  # MLflow's limits per log_batch call: 100 params or tags, 1,000 metrics
BATCH_METRICS = 1000
WRITER = Writer()  # one per process, shared by its trackers: a flush waits for all of them


def preload(cfg: StudyConfig) -> None:
    """Import MLflow's client and stores without connecting (no thread, no socket): a parent
    about to fork its workers does it once, for all of them (2.5 s and 74 MB a process here)."""
    if cfg.tracking.enabled:
        import mlflow.entities
        import mlflow.store.tracking.rest_store
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        from mlflow import MlflowClient  # noqa: F401


FOLLOW_UP_KIND = {"snapshots": "snapshot", "refit": "refit"}  # a run label's workbench.kind


class Tracker:
    """Everything a study sends to MLflow; one instance per process."""

    def __init__(
        self, cfg: StudyConfig, enabled: bool | None = None, data: DataRef | None = None
    ) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled if enabled is None else enabled
        self.data = data  # the study's data: the dataset input of study, trial, ensemble runs
        self._configs: dict[str, str] = {}  # trial run -> its configuration (workbench.config)
        self.fingerprint = fingerprint(resolved(cfg))
        self.commit = git_commit() if self.enabled else "unknown"
        self._buffers: dict[str, list[Any]] = {}
        self._open_folds: dict[str, list[str]] = {}  # trial run -> its fold runs not yet ended
        self._study_runs: dict[str, str] = {}
        self._experiment_id = ""
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
            WRITER.background = self.uri.startswith(("http://", "https://"))

    @property
    def uri(self) -> str:
        return tracking_uri(self.cfg) if self.enabled else ""

    def flush(self) -> None:
        """Wait until every queued MLflow call of this process has been made."""
        WRITER.flush()

    def remote(self) -> Any:
        """The run store's remote: MLflow's artifact store with `tracking.artifacts = "mlflow"`,
        else None (files stay on the host that wrote them)."""
        if not (self.enabled and self.cfg.tracking.artifacts == "mlflow"):
            return None
        from workbench.tracking.artifacts import MlflowArtifacts

        return MlflowArtifacts(self)

    # --- experiment and study runs (the parent creates them before any worker starts) ----------

    def experiment_id(self) -> str:
        if not self._experiment_id:
            name = self.cfg.tracking.experiment or self.cfg.name
            exp = self.client.get_experiment_by_name(name)
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise StorageError(
                    f"the MLflow experiment '{name}' in {self.uri} is deleted; restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}), delete it "
                    f"for good (mlflow gc), or set tracking.experiment to a new name."
                )
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    name, artifact_location=artifact_root(self.cfg), tags={ui.KIND_TAG: ui.TRAINING}
                )
            else:  # one made before workbench set its kind opens on the GenAI view: fix it
                self._experiment_id = exp.experiment_id
                if ui.KIND_TAG not in exp.tags:
                    self.client.set_experiment_tag(exp.experiment_id, ui.KIND_TAG, ui.TRAINING)
        return self._experiment_id

    def describe(self, study_file: Path) -> None:
        """The experiment's note: the study file's leading comment, the data, how to compare."""
        if self.enabled:
            note = ui.experiment_note(self.cfg, ui.description(study_file), self.data)
            self.client.set_experiment_tag(self.experiment_id(), ui.NOTE_TAG, note)

    def where(self) -> str:
        """One line: where the experiment is in the UI (a server's page, or how to serve it)."""
        if not self.enabled:
            return "MLflow: off (tracking.enabled = false)"
        name = self.cfg.tracking.experiment or self.cfg.name
        return ui.where(name, self.uri, self.experiment_id())

    def log_data(self, run_id: str, context: str) -> None:
        """The study's data as the run's dataset input (MLflow keeps one copy per digest)."""
        if self.data is not None:
            self.client.log_inputs(run_id, [ui.dataset_input(self.data, context)])

    def tags(self, kind: str, model: str = "", **extra: Any) -> dict[str, str]:
        tags = {
            "workbench.kind": kind,
            "workbench.study": self.cfg.name,
            "workbench.config_fingerprint": self.fingerprint,
            "mlflow.source.git.commit": self.commit,
        }
        if model:  # its family (the registry's architecture) groups runs across model sections
            tags["workbench.model"] = model
            tags["workbench.family"] = self._family(model)
        return {**tags, **{k: str(v) for k, v in extra.items()}}

    def _family(self, model: str) -> str:
        spec = self.cfg.models.get(model)
        return (spec.arch if spec else None) or model

    def find_runs(self, filter_string: str) -> list[Any]:
        WRITER.flush()
        return list(
            self.client.search_runs([self.experiment_id()], filter_string, max_results=5000)
        )

    def _ours(self, model: str) -> str:
        """Filter for this study's runs of one model (an experiment may hold several studies)."""
        study, model = _quote(self.cfg.name), _quote(model)
        return f"tags.`workbench.study` = {study} and tags.`workbench.model` = {model}"

    def study_run(self, model: str, create: bool = False) -> str:
        """The one `study:<model>` run; a resumed study reuses it (and marks it RUNNING again)."""
        if not self.enabled:
            return ""
        WRITER.flush()
        if model not in self._study_runs:
            found = self.find_runs(f"tags.`workbench.kind` = 'study' and {self._ours(model)}")
            if found:
                run_id = sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
                if create:
                    self.client.update_run(run_id, status="RUNNING")
            elif create:
                run_id = self.client.create_run(
                    self.experiment_id(), run_name=f"study:{model}", tags=self.tags("study", model)
                ).info.run_id
                self._log_config(run_id)
            else:
                raise RuntimeError(f"no MLflow study run for '{model}': the parent creates it")
            if create:  # a resume on changed data adds the new digest
                self.log_data(run_id, "train")
            self._study_runs[model] = run_id
        return self._study_runs[model]

    def _log_config(self, run_id: str) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(resolved(self.cfg)).items()]
        self._log_params(run_id, params)
        self.client.log_dict(run_id, resolved(self.cfg), "config/study.resolved.json")

    def end_study(
        self,
        model: str,
        summary: dict[str, float],
        status: str = "FINISHED",
        history: Sequence[TrialScore] = (),
    ) -> None:
        """End the search stage of one model: close what dead workers left RUNNING, log the
        summary values that changed and the search's history (a resume that ran nothing adds
        nothing), tag the best trial run, end the study run."""
        if not self.enabled:
            return
        WRITER.flush()
        run_id = self.study_run(model)
        orphans = self.find_runs(
            f"attributes.status = 'RUNNING' and tags.`workbench.kind` != 'study' and "
            f"{self._ours(model)}"
        )
        for run in orphans:
            self.client.set_tag(
                run.info.run_id,
                "workbench.note",
                "left RUNNING by a worker that ended without closing it; "
                "closed when the search stage ended",
            )
            self._end(run.info.run_id, "FAIL")
        old = self.client.get_run(run_id).data.metrics
        changed = {k: v for k, v in summary.items() if not _same(old.get(k), v)}
        self.log_metrics(run_id, changed)
        ui.log_history(self.client, run_id, ui.series(self.cfg.cv.metric, history))
        best = {s.run_id for s in history if s.is_best and s.run_id}
        tagged = self.find_runs(f"tags.`workbench.best` = 'true' and {self._ours(model)}")
        ui.tag_best(self.client, best, {r.info.run_id for r in tagged})
        self.client.set_terminated(run_id, status)

    # --- trials and folds (workers) ------------------------------------------------------------

    @staticmethod
    def _name(model: str, label: int | str) -> str:
        """Trial runs are `<model>/trial-<n>`; follow-up runs carry their own label
        (`<model>/snapshots-of-<n>`, `<model>/refit-of-<n>`)."""
        return f"{model}/trial-{label}" if isinstance(label, int) else f"{model}/{label}"

    def start_trial(self, model: str, label: int | str, params: dict[str, Any]) -> str:
        """Create the trial (or snapshot) run and return its id; its params follow in the
        background."""
        if not self.enabled:
            return ""
        from mlflow.entities import Param

        config = ui.config_id(self._family(model), params)
        run_id = WRITER.call(lambda: self._create_trial_run(model, label, config))
        batch = [Param(k, str(v)) for k, v in params.items()]
        WRITER.defer(lambda: self._log_params(run_id, batch))
        WRITER.defer(lambda: self.log_data(run_id, "train"))
        return run_id

    def _create_trial_run(self, model: str, label: int | str, config: str) -> str:

        # an Optuna trial is a `trial` run; a follow-up run (string label "snapshots-of-3",
        # "refit-of-3") is a `snapshot` or `refit` run, and has no Optuna trial of the search
        extra = (
            {"optuna.study": f"{self.cfg.name}/{model}", "optuna.trial_number": label}
            if isinstance(label, int)
            else {}
        )
        run = self.client.create_run(
            self.experiment_id(),
            run_name=self._name(model, label),
            tags=self.tags(
                "trial" if isinstance(label, int) else FOLLOW_UP_KIND[str(label).split("-of-")[0]],
                model,
                **{
                    "mlflow.parentRunId": self.study_run(model),
                    "optuna.state": "RUNNING",
                    "workbench.config": config,
                    **extra,
                },
            ),
        )
        self._configs[run.info.run_id] = config
        return str(run.info.run_id)

    def start_fold(self, trial_run: str, model: str, label: int | str, fold: int) -> str:
        if not self.enabled:
            return ""
        extra: dict[str, Any] = {"optuna.trial_number": label} if isinstance(label, int) else {}
        if trial_run in self._configs:
            extra["workbench.config"] = self._configs[trial_run]
        run = self.client.create_run(
            self.experiment_id(),
            run_name=f"{self._name(model, label)}/fold-{fold}",
            tags=self.tags(
                "fold",
                model,
                **{
                    "mlflow.parentRunId": trial_run,
                    "workbench.fold": fold,
                    "workbench.run": label,
                    **extra,
                },
            ),
        )
        self._open_folds.setdefault(trial_run, []).append(run.info.run_id)
        return str(run.info.run_id)

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Buffered: sent with the fold's end, in one batch."""
        if self.enabled:
            self._buffer(run_id, metrics, step=epoch)

    def end_fold(
        self,
        run_id: str,
        state: str,
        best_epoch: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        if not self.enabled:
            return
        for folds in self._open_folds.values():
            if run_id in folds:
                folds.remove(run_id)
        if best_epoch is not None:
            self._buffer(run_id, {"best_epoch": best_epoch}, step=0)
        self._end(run_id, state, tags)

    def end_trial(
        self, run_id: str, state: str, summary: dict[str, float], files: str | None = None
    ) -> None:
        """End a trial (or snapshot) run, in the background; `files` is the run store's URI of
        its sealed folder (tagged `workbench.files`: the files stay where the store wrote
        them, written once)."""
        if self.enabled:
            WRITER.defer(lambda: self._end_trial(run_id, state, summary, files))

    def _end_trial(
        self, run_id: str, state: str, summary: dict[str, float], files: str | None
    ) -> None:
        # a fold run still open ended with its trial (e.g. saving its checkpoint failed)
        self._configs.pop(run_id, None)
        for fold_run in self._open_folds.pop(run_id, []):
            self.end_fold(fold_run, "FAIL" if state == "COMPLETE" else state)
        self._buffer(run_id, summary, step=0)
        self._end(run_id, state, {"workbench.files": files} if files else None)

    def _end(self, run_id: str, state: str, tags_: dict[str, str] | None = None) -> None:
        """Send the run's buffered metrics with its state tag in one batch, then end it: two
        calls per run (each call is a few ms of SQLite or HTTP; bench item 2 counts them)."""
        from mlflow.entities import RunTag

        metrics = self._buffers.pop(run_id, [])
        tags = [RunTag(k, v) for k, v in {"optuna.state": state, **(tags_ or {})}.items()]
        for i in range(0, max(len(metrics), 1), BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS], tags=tags)
            tags = []
        self.client.set_terminated(run_id, STATUS[state])

    def _buffer(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffers.setdefault(run_id, []).extend(
            Metric(k, float(v), now, step) for k, v in values.items()
        )

    def _log_params(self, run_id: str, params: list[Any]) -> None:
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(run_id, params=params[i : i + BATCH_PARAMS])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        WRITER.flush()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    # --- the ensemble stage (workbench/tracking/model.py) ---------------------------------------

    def log_ensemble(self, results: EnsembleResult, model: Any) -> str:
        """An `ensemble` run (the ladder, the final model's test metrics, results.json, the
        loadable model: a `ModelPackaged`) with one child run per method; its id ("" when off)."""
        if not self.enabled:
            return ""
        from workbench.tracking.model import log_ensemble

        WRITER.flush()
        return log_ensemble(self, results, model)


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter (a model section may be named `it's`)."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _same(old: float | None, new: float) -> bool:
    """Is `new` the value already logged (NaN equals NaN)?"""
    return old is not None and (old == new or (math.isnan(old) and math.isnan(float(new))))
