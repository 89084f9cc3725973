"""The MLflow record of a real study, read back the way a user reads it.

A tiny study (digits, 3 folds, 2 epochs, 3 mlp trials) runs with tracking on through the CLI in
two worker processes, then again (a resume that must add nothing). A real `mlflow server` then
serves the store, and every check goes through its REST API (urllib, no mlflow client here);
the logged pyfunc model is loaded in a fresh process and must predict what FinalEnsemble does.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import CLI_ENV, TINY, mlflow_server, run_cli, synthetic_result

import workbench
from workbench.config import load_study
from workbench.events import ModelPackaged
from workbench.tracking import Tracker, flatten

ENV = CLI_ENV
# a packaged model that is never logged: the tracker is off, or the run fails before it
NO_MODEL = ModelPackaged({}, "nowhere:nothing", [], [], np.zeros((1, 1, 8, 8)), np.zeros((1, 10)))
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr")
# the MLflow run status each Optuna trial state ends in, as the README states it (a pruned trial
# was stopped on purpose: KILLED, not FAILED); written out, not read from the product's own map
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def expected_commit() -> str:
    """What the tracker tags: the commit of workbench's own source, or "unknown"."""
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(workbench.__file__).parent,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


@dataclass
class Record:
    """A finished study with tracking on, and a running `mlflow server` over its store."""

    tmp: Path
    study_file: Path
    out: Path  # <output_dir>/tiny
    store: str  # the MLflow store's URI (SQLite)
    api: str  # the server's base URL
    first: subprocess.CompletedProcess[str]
    again: subprocess.CompletedProcess[str]

    def request(self, endpoint: str, body: dict[str, Any] | None = None, /, **query: Any) -> Any:
        """GET (or POST `body`) one endpoint: JSON for the APIs, bytes for get-artifact."""
        url = f"{self.api}/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url} -> {e.code}: {e.read().decode()[:500]}") from None
        return json.loads(raw) if endpoint.startswith(("api/", "ajax-api/")) else raw

    def experiment(self) -> dict[str, Any]:
        got = self.request("api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")
        return dict(got["experiment"])

    def runs(self) -> list[Run]:
        """Every run of the study's experiment, all pages."""
        runs: list[Run] = []
        body: dict[str, Any] = {
            "experiment_ids": [self.experiment()["experiment_id"]],
            "max_results": 1000,
        }
        while True:
            page = self.request("api/2.0/mlflow/runs/search", body)
            runs += [Run.of(r) for r in page.get("runs", [])]
            if not page.get("next_page_token"):
                return runs
            body["page_token"] = page["next_page_token"]

    def artifacts(self, run_id: str, path: str = "") -> dict[str, dict[str, Any]]:
        """path -> file info of the run's artifacts directly under `path`."""
        query = {"run_id": run_id, **({"path": path} if path else {})}
        files = self.request("api/2.0/mlflow/artifacts/list", **query).get("files", [])
        return {f["path"]: f for f in files}

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        got = self.request("api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)
        return list(got.get("metrics", []))


@dataclass
class Run:
    id: str
    name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    outputs: dict[str, Any]

    @classmethod
    def of(cls, r: dict[str, Any]) -> Run:
        data = r.get("data", {})
        return cls(
            r["info"]["run_id"],
            r["info"]["run_name"],
            r["info"]["status"],
            {t["key"]: t["value"] for t in data.get("tags", [])},
            {p["key"]: p["value"] for p in data.get("params", [])},
            {m["key"]: float(m["value"]) for m in data.get("metrics", [])},
            r.get("outputs", {}),
        )

    @property
    def kind(self) -> str:
        return self.tags.get("workbench.kind", "")

    @property
    def parent(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    tmp = tmp_path_factory.mktemp("tracking")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    study_file = tmp / "tiny.toml"
    text = TINY.format(out=tmp / "runs")
    assert "[tracking]\nenabled = false" in text
    text = text.replace(
        "[tracking]\nenabled = false", f'[tracking]\nenabled = true\nuri = "{store}"'
    )
    study_file.write_text(text)

    first = run_cli("study", str(study_file), "--workers", "2", cwd=tmp, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr

    # the server starts (~15 s) while the resume runs
    resume = subprocess.Popen(
        [sys.executable, "-m", "workbench", "study", str(study_file), "--workers", "2"],
        cwd=tmp,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # artifacts stay where the study put them (file:// under runs/mlflow/artifacts); the server
    # reads them itself, no proxy (mlflow-artifacts:/) in between
    artifacts = (tmp / "runs" / "mlflow" / "artifacts").as_uri()
    with mlflow_server(
        tmp / "server", "--default-artifact-root", artifacts, "--no-serve-artifacts", backend=store
    ) as api:
        out, _ = resume.communicate(timeout=300)
        again = subprocess.CompletedProcess(resume.args, resume.returncode, out, "")
        assert again.returncode == 0, out
        yield Record(tmp, study_file, tmp / "runs" / "tiny", store, api, first, again)


@pytest.fixture(scope="module")
def optuna_trials(record: Record) -> list[optuna.trial.FrozenTrial]:
    """The trials that ran. Two workers may both start the last one; the later sees the study
    full, marks its trial `surplus` and runs nothing (no MLflow run): those are left out here
    and checked on their own."""
    storage = f"sqlite:///{record.out / 'optuna.db'}"
    trials = optuna.load_study(study_name="tiny/mlp", storage=storage).trials
    return [t for t in trials if not t.user_attrs.get("surplus")]


def test_a_surplus_trial_runs_nothing_and_has_no_run(record: Record) -> None:
    storage = f"sqlite:///{record.out / 'optuna.db'}"
    trials = optuna.load_study(study_name="tiny/mlp", storage=storage).trials
    surplus = {t.number for t in trials if t.user_attrs.get("surplus")}
    numbers = {int(r.tags["optuna.trial_number"]) for r in record.runs() if r.kind == "trial"}
    assert not surplus & numbers
    assert all("mlflow_run_id" not in t.user_attrs for t in trials if t.number in surplus)
    assert len(trials) - len(surplus) >= 3  # the study's 3 trials ran


def test_one_experiment_one_study_run_and_nothing_left_running(record: Record) -> None:
    assert "every model study is complete" in record.again.stdout  # the second run resumed
    assert "reusing the stored test evaluation" in record.again.stdout
    # mlflow's "Add type hints to the `predict` method" warning is silenced at its source
    assert "type hints" not in record.first.stdout + record.first.stderr

    exp = record.experiment()
    assert (
        exp["artifact_location"] == (record.out.parent / "mlflow" / "artifacts").resolve().as_uri()
    )
    runs = record.runs()
    study_runs = [r for r in runs if r.kind == "study"]
    assert [(r.name, r.tags["workbench.model"]) for r in study_runs] == [("study:mlp", "mlp")]
    assert study_runs[0].status == "FINISHED"
    assert [r.name for r in runs if r.status == "RUNNING"] == []
    # the resume logged no second copy of the study's summary
    assert len(record.history(study_runs[0].id, "best_value")) == 1
    assert study_runs[0].metrics["trials_complete"] + study_runs[0].metrics["trials_pruned"] >= 3

    commit = expected_commit()
    fingerprints = {r.tags["workbench.config_fingerprint"] for r in runs}
    assert len(fingerprints) == 1 and len(next(iter(fingerprints))) == 12
    assert {r.tags["mlflow.source.git.commit"] for r in runs} == {commit}
    assert {r.tags["workbench.kind"] for r in runs} == {"study", "trial", "fold", "ensemble"}


def test_runs_nest_study_trial_fold_one_trial_run_per_optuna_trial(
    record: Record, optuna_trials: list[optuna.trial.FrozenTrial]
) -> None:
    runs = record.runs()
    by_id = {r.id: r for r in runs}
    (study_run,) = (r for r in runs if r.kind == "study")
    trial_runs = [r for r in runs if r.kind == "trial"]
    fold_runs = [r for r in runs if r.kind == "fold"]

    # one trial run per Optuna trial, also after the resume; the user attr points at it
    assert sorted(int(r.tags["optuna.trial_number"]) for r in trial_runs) == [
        t.number for t in optuna_trials
    ]
    for t in optuna_trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.name == f"mlp/trial-{t.number}"
        assert run.tags["optuna.trial_number"] == str(t.number)
        assert run.tags["optuna.study"] == "tiny/mlp"
        assert run.tags["optuna.state"] == t.state.name
        assert run.status == RUN_STATUS[t.state.name]
        assert run.parent == study_run.id

    for fold in fold_runs:
        trial = by_id[fold.parent or ""]
        assert trial.kind == "trial" and trial.parent == study_run.id
        assert fold.name == f"{trial.name}/fold-{fold.tags['workbench.fold']}"
        assert fold.tags["optuna.trial_number"] == trial.tags["optuna.trial_number"]
    for trial in trial_runs:
        folds = sorted(
            (f for f in fold_runs if f.parent == trial.id), key=lambda f: f.tags["workbench.fold"]
        )
        if trial.tags["optuna.state"] == "COMPLETE":
            assert [f.tags["workbench.fold"] for f in folds] == ["0", "1", "2"]
            assert {(f.status, f.tags["optuna.state"]) for f in folds} == {("FINISHED", "COMPLETE")}
        if trial.tags["optuna.state"] == "PRUNED":  # stopped inside its last fold: KILLED too
            assert trial.status == "KILLED" and 1 <= len(folds) <= 3
            assert (folds[-1].status, folds[-1].tags["optuna.state"]) == ("KILLED", "PRUNED")


def test_trial_runs_hold_the_optuna_params_and_cv_metrics(
    record: Record, optuna_trials: list[optuna.trial.FrozenTrial]
) -> None:
    runs = {r.id: r for r in record.runs()}
    fixed = {"width": "64"}  # models.mlp.params of the study file
    for t in optuna_trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert set(run.params) == set(fixed) | set(t.params)
        assert {k: run.params[k] for k in fixed} == fixed
        assert {k: float(run.params[k]) for k in t.params} == t.params  # exact: repr round-trips
        if t.state.name == "COMPLETE":
            for key in ("cv_accuracy", "cv_accuracy_std", "cv_log_loss", "cv_log_loss_std"):
                assert run.metrics[key] == pytest.approx(t.user_attrs[key])
            assert run.metrics["cv_accuracy"] == pytest.approx(t.value)


def test_fold_runs_hold_per_epoch_metrics_and_point_at_their_checkpoint(record: Record) -> None:
    epochs = load_study(record.study_file).train.epochs
    runs = record.runs()
    complete = {r.id for r in runs if r.kind == "trial" and r.tags["optuna.state"] == "COMPLETE"}
    fold = next(r for r in runs if r.kind == "fold" and r.parent in complete)
    number, k = int(fold.tags["optuna.trial_number"]), int(fold.tags["workbench.fold"])
    trial_dir = record.out / "trials" / "mlp" / f"{number:04d}"
    history = json.loads((trial_dir / "history.json").read_text())[k]  # per epoch, this fold
    for key in EPOCH_METRICS:
        got = record.history(fold.id, key)
        assert [m["step"] for m in got] == list(range(epochs)), key
        assert [m["value"] for m in got] == pytest.approx([h[key] for h in history]), key
    assert 0 <= fold.metrics["best_epoch"] < epochs

    # the run store holds the checkpoint (written once); the fold run names it and its sha256
    assert not record.artifacts(fold.id)
    ckpt = trial_dir / f"fold-{k}.pt"
    assert fold.tags["workbench.checkpoint"] == ckpt.resolve().as_uri()
    assert fold.tags["workbench.checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_study_and_trial_runs_hold_config_and_point_at_the_trial_files(record: Record) -> None:
    runs = record.runs()
    (study_run,) = (r for r in runs if r.kind == "study")
    assert "config/study.resolved.json" in record.artifacts(study_run.id, "config")
    got = record.request("get-artifact", run_uuid=study_run.id, path="config/study.resolved.json")
    resolved = json.loads((record.out / "study.resolved.json").read_text())
    assert json.loads(got) == resolved
    assert study_run.params == {k: v[:6000] for k, v in flatten(resolved).items()}

    complete = [r for r in runs if r.kind == "trial" and r.tags["optuna.state"] == "COMPLETE"]
    assert complete
    for trial in complete:
        number = int(trial.tags["optuna.trial_number"])
        folder = record.out / "trials" / "mlp" / f"{number:04d}"
        assert trial.tags["workbench.files"] == folder.resolve().as_uri()
        assert not record.artifacts(trial.id)  # nothing copied: the files are written once


def test_ensemble_run_holds_test_metrics_results_and_model(record: Record) -> None:
    results = json.loads((record.out / "ensemble" / "results.json").read_text())
    runs = record.runs()
    ensembles = [r for r in runs if r.kind == "ensemble" and r.parent is None]
    assert [r.name for r in ensembles] == ["ensemble"]  # the resume reused the evaluation
    ens = ensembles[0]
    assert ens.status == "FINISHED"
    for key in ("accuracy", "log_loss"):
        assert ens.metrics[f"test_{key}"] == pytest.approx(results["final"]["test"][key])
    # the ladder: every rung's test metrics, its gains with their CI ends, its cost
    for rung in results["ladder"]:
        at = f"rung/{rung['name']}/"
        assert ens.metrics[f"{at}test_accuracy"] == pytest.approx(rung["test"]["accuracy"])
        assert ens.metrics[f"{at}ms_per_image"] == pytest.approx(rung["cost"]["ms_per_image"])
        if rung["vs_network"]:
            gain = rung["vs_network"]["accuracy"]
            assert ens.metrics[f"{at}gain_vs_network_accuracy"] == pytest.approx(gain["diff"])
            assert ens.metrics[f"{at}gain_vs_network_accuracy_ci_low"] == pytest.approx(
                gain["ci_low"]
            )
    assert ens.tags["workbench.shipped"] == results["final"]["method"]
    assert results["choice"]["reason"] in ens.tags["mlflow.note.content"]  # the run's description

    children = {r.name: r for r in runs if r.parent == ens.id}
    assert set(children) == {f"ensemble/{m}" for m in results["methods"]}
    for method, values in results["methods"].items():
        child = children[f"ensemble/{method}"]
        assert child.status == "FINISHED" and child.tags["workbench.method"] == method
        assert child.metrics["test_accuracy"] == pytest.approx(values["test"]["accuracy"])
        assert child.metrics["test_log_loss"] == pytest.approx(values["test"]["log_loss"])

    assert "ensemble/results.json" in record.artifacts(ens.id, "ensemble")
    got = record.request("get-artifact", run_uuid=ens.id, path="ensemble/results.json")
    assert json.loads(got) == results

    # MLflow 3: the pyfunc model is a LoggedModel, an output of the run (not a run artifact)
    (output,) = ens.outputs["model_outputs"]
    model = record.request(f"api/2.0/mlflow/logged-models/{output['model_id']}")["model"]
    assert model["info"]["name"] == "model" and model["info"]["source_run_id"] == ens.id
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    listing = f"api/2.0/mlflow/logged-models/{output['model_id']}/artifacts/directories"
    files = {f["path"] for f in record.request(listing).get("files", [])}
    assert {"MLmodel", "python_model.pkl", "artifacts", "code"} <= files
    final = record.request(listing, artifact_directory_path="artifacts/final").get("files", [])
    assert "artifacts/final/ensemble.json" in {f["path"] for f in final}


LOAD = """
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(np.load(sys.argv[2])).to_csv(sys.argv[3], index=False)
print(sys.modules["workbench"].__file__)
"""


def test_logged_model_predicts_like_the_final_ensemble(record: Record) -> None:
    from workbench.cli import prepare
    from workbench.final import FinalEnsemble

    (ens,) = (r for r in record.runs() if r.kind == "ensemble" and r.parent is None)
    _, data, split = prepare(record.study_file, None, None)
    images = data.images(split.test_idx).numpy()
    np.save(record.tmp / "test_x.npy", images)
    fresh = record.tmp / "fresh"
    fresh.mkdir()
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD, f"runs:/{ens.id}/model", "../test_x.npy", "out.csv"],
        cwd=fresh,
        env={**ENV, "MLFLOW_TRACKING_URI": record.store},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "type hints" not in loaded.stderr
    # workbench came with the model (code_paths), not from this installation
    source = Path(loaded.stdout.strip().splitlines()[-1])
    assert source.parts[-3:] == ("code", "workbench", "__init__.py"), source
    assert source.resolve() != Path(workbench.__file__).resolve()
    table = pd.read_csv(fresh / "out.csv", dtype={"label": str})
    assert list(table.columns) == ["label", "probability", *[f"p_{d}" for d in range(10)]]
    got = table[[f"p_{d}" for d in range(10)]].to_numpy()
    expected = FinalEnsemble.load(record.out / "ensemble" / "final").predict_proba(images)
    assert got.shape == expected.shape == (len(split.test_idx), 10)
    assert table["label"].tolist() == [str(d) for d in expected.argmax(1)]
    np.testing.assert_allclose(table["probability"], expected.max(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# --- without a server ---------------------------------------------------------------------------


def test_flatten_names_nested_keys_with_dots_and_keeps_leaves_as_text() -> None:
    d = {
        "name": "tiny",
        "train": {"lr": 0.1, "epochs": 2, "augment": {"flip": False}},
        "methods": ["soft", "hard"],
        "empty": {},
        "uri": None,
    }
    assert flatten(d) == {
        "name": "tiny",
        "train.lr": "0.1",
        "train.epochs": "2",
        "train.augment.flip": "False",
        "methods": "['soft', 'hard']",
        "empty": "{}",  # an empty section is a leaf, not dropped
        "uri": "None",
    }
    assert flatten({"a": {"b": 1}}, prefix="x.") == {"x.a.b": "1"}
    assert flatten({}) == {}


def test_disabled_tracker_makes_no_store(
    tmp_path: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's own default would write ./mlruns or ./mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    before = sorted(p.name for p in tmp_path.iterdir())
    on = tiny_file.read_text().replace("enabled = false", "enabled = true")
    on_file = tmp_path / "on.toml"
    on_file.write_text(on)
    for tracker in (Tracker(load_study(tiny_file)), Tracker(load_study(on_file), enabled=False)):
        assert not tracker.enabled and tracker.uri == "" and not hasattr(tracker, "client")
        assert tracker.study_run("mlp", create=True) == ""
        run = tracker.start_trial("mlp", 0, {"lr": 0.1})
        fold = tracker.start_fold(run, "mlp", 0, 0)
        assert run == fold == ""
        tracker.log_epoch(fold, 0, {"val_loss": 1.0})
        tracker.end_fold(fold, "COMPLETE", best_epoch=0, tags={"workbench.checkpoint": "x"})
        tracker.end_trial(run, "COMPLETE", {"cv_accuracy": 0.5}, files=tmp_path.as_uri())
        tracker.end_study("mlp", {"best_value": 0.5})
        assert tracker.log_ensemble({}, NO_MODEL) == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "on.toml"])


def test_no_run_is_left_running_by_a_dead_worker_or_a_failure(
    tmp_path: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-trial cannot end its runs: the parent's end_study does (FAILED). A fold
    run left open by a failure after training ends with its trial; a failed ensemble log ends its
    runs FAILED. A resume that changed nothing logs nothing."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'm.db'}"
    tiny_file.write_text(
        tiny_file.read_text().replace("enabled = false", f'enabled = true\nuri = "{store}"')
    )
    cfg = load_study(tiny_file)
    parent, worker = Tracker(cfg), Tracker(cfg)
    study = parent.study_run("mlp", create=True)
    dead = worker.start_trial("mlp", 0, {"lr": 0.1})
    dead_fold = worker.start_fold(dead, "mlp", 0, 0)
    worker.log_epoch(dead_fold, 0, {"val_loss": 1.0})  # buffered, never sent: the worker died
    failed = worker.start_trial("mlp", 1, {"lr": 0.2})
    open_fold = worker.start_fold(failed, "mlp", 1, 0)  # trained; saving the checkpoint raised,
    worker.end_trial(failed, "FAIL", {})  # so only the trial is ended, and its open fold with it
    parent.end_study("mlp", {"best_value": math.nan, "trials_complete": 0})
    parent.study_run("mlp", create=True)  # a resume: the same study run, RUNNING again
    parent.end_study("mlp", {"best_value": math.nan, "trials_complete": 0})  # nothing changed

    client = MlflowClient(store)
    status = {r: client.get_run(r).info.status for r in (study, dead, dead_fold, failed, open_fold)}
    assert status == {
        study: "FINISHED",
        dead: "FAILED",
        dead_fold: "FAILED",
        failed: "FAILED",
        open_fold: "FAILED",
    }
    assert client.get_run(dead).data.tags["optuna.state"] == "FAIL"
    assert "workbench.note" in client.get_run(dead_fold).data.tags
    assert len(client.get_metric_history(study, "best_value")) == 1
    exp = parent.experiment_id()
    assert len(client.search_runs([exp], "tags.`workbench.kind` = 'study'")) == 1

    results = synthetic_result(tmp_path / "ensemble")
    real, calls = parent.log_metrics, []

    def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
        calls.append(run_id)
        if len(calls) == 2:  # the first method's child run
            raise RuntimeError("the tracking server went away")
        real(run_id, values, step)

    monkeypatch.setattr(parent, "log_metrics", log_metrics)
    with pytest.raises(RuntimeError, match="went away"):
        parent.log_ensemble(results, NO_MODEL)
    ensemble = client.search_runs([exp], "tags.`workbench.kind` = 'ensemble'")
    assert sorted(r.info.run_name for r in ensemble) == ["ensemble", "ensemble/soft_voting"]
    assert {r.info.status for r in ensemble} == {"FAILED"}


def test_a_trial_that_raises_ends_its_runs_failed_and_the_next_trial_runs(
    tmp_path: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 1's model factory raises: its trial run ends FAILED (optuna.state FAIL), the error
    is on the Optuna trial, and trials 2 and 3 run and finish with their own runs."""
    from mlflow import MlflowClient

    from workbench import cv, search
    from workbench.data import load_data, load_or_make_split

    store = f"sqlite:///{tmp_path / 'm.db'}"
    tiny_file.write_text(
        tiny_file.read_text().replace("enabled = false", f'enabled = true\nuri = "{store}"')
    )
    cfg = load_study(tiny_file)
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    study = search.create_studies(cfg, search.open_storage(cfg))["mlp"]
    Tracker(cfg).study_run("mlp", create=True)
    real_run, real_create, running = cv.CrossValidator.run, cv.create_model, []

    def run(self: cv.CrossValidator, hp: Any, out: Path, ref: Any, *args: Any) -> Any:
        running.append(ref.label)
        return real_run(self, hp, out, ref, *args)

    def create_model(*args: Any, **kwargs: Any) -> Any:
        if running[-1] == 1:
            raise RuntimeError("boom")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(cv.CrossValidator, "run", run)
    monkeypatch.setattr(cv, "create_model", create_model)
    search.run_worker(cfg, data, split, Tracker(cfg))
    trials = study.get_trials()
    assert [t.state.name for t in trials][:2] == ["COMPLETE", "FAIL"] and len(trials) == 4
    assert trials[1].user_attrs["error"] == "RuntimeError: boom"
    client = MlflowClient(store)
    failed = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert (failed.info.status, failed.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    folds = client.search_runs(
        [failed.info.experiment_id], f"tags.`mlflow.parentRunId` = '{failed.info.run_id}'"
    )
    assert folds == []  # the factory raised before its first fold began
    for t in trials[2:]:
        run_ = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run_.info.status == RUN_STATUS[t.state.name]


# --- what the UI opens on and draws, without a server (tests/test_ui.py: with one) -------------


def test_a_resumed_search_adds_only_its_new_points_and_the_best_tag_moves(
    tmp_path: Path, tiny_file: Path
) -> None:
    from mlflow import MlflowClient

    from workbench.tracking import TrialScore

    store = f"sqlite:///{tmp_path / 'm.db'}"
    tiny_file.write_text(
        tiny_file.read_text().replace("enabled = false", f'enabled = true\nuri = "{store}"')
    )
    tracker, client = Tracker(load_study(tiny_file)), MlflowClient(store)
    study = tracker.study_run("mlp", create=True)
    runs = [tracker.start_trial("mlp", n, {"lr": 0.1 * (n + 1)}) for n in range(3)]
    # trials 0 and 2 complete (1 was pruned); 2 is better. Written out, not derived.
    first = [TrialScore(0, 0.80, 0.02, 0.80, runs[0], True)]
    later = [TrialScore(0, 0.80, 0.02, 0.80, runs[0], False)]
    later.append(TrialScore(2, 0.90, math.nan, 0.90, runs[2], True))  # no std recorded
    tracker.end_study("mlp", {}, history=first)
    tracker.study_run("mlp", create=True)  # the resume
    tracker.end_study("mlp", {}, history=later)
    tracker.end_study("mlp", {}, history=later)  # nothing new: nothing logged

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(study, key)]

    assert history("history/cv_accuracy") == [(0, 0.80), (2, 0.90)]
    assert history("history/best_cv_accuracy") == [(0, 0.80), (2, 0.90)]
    assert history("history/cv_accuracy_std") == [(0, 0.02)]
    best = {r: client.get_run(r).data.tags.get("workbench.best") for r in runs}
    assert best == {runs[0]: None, runs[1]: None, runs[2]: "true"}


def test_the_experiment_gets_its_kind_once_and_the_line_says_where_it_is(
    tmp_path: Path, tiny_file: Path
) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(store)
    old = client.create_experiment("tiny")  # made before workbench set the kind
    tiny_file.write_text(
        "# What this study is for.\n#   Wrapped.\n"
        + tiny_file.read_text().replace("enabled = false", f'enabled = true\nuri = "{store}"')
    )
    tracker = Tracker(load_study(tiny_file))
    assert tracker.experiment_id() == old
    tracker.describe(tiny_file)
    tags = client.get_experiment(old).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("What this study is for. Wrapped.\n")
    assert tracker.where() == (
        f"MLflow: experiment 'tiny' in {store}; `make ui` serves the default store "
        f"(runs/mlflow): http://127.0.0.1:5000/#/experiments/{old}?workflowType=machine_learning"
    )


@pytest.mark.parametrize(
    ("source", "name", "uri"),
    [
        ("digits (1797 images)", "digits", "sklearn.datasets.load_digits"),
        ("idx:/data/mnist (10000 images)", "mnist", "file:///data/mnist"),
        ("torchvision:CIFAR10:/data/root (60000 images)", "CIFAR10", "file:///data/root"),
        ("folder:/data/photos (40 images)", "photos", "file:///data/photos"),
    ],
)
def test_the_dataset_input_names_the_source(source: str, name: str, uri: str) -> None:
    import torch

    from workbench.data import ImageData, Split
    from workbench.tracking import DataRef

    data = ImageData(torch.zeros(5, 3, 4, 6, dtype=torch.uint8), torch.zeros(5), ("a", "b"), source)
    split = Split(np.arange(4), np.arange(4, 5), "0123456789ab", "stratified")
    ref = DataRef.of(data, split)
    assert (ref.name, ref.source, ref.digest) == (name, uri, "0123456789ab")
    assert (ref.rows, ref.image, ref.classes, ref.train_rows, ref.test_rows) == (
        5,
        (3, 4, 6),
        2,
        4,
        1,
    )
