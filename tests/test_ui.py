"""The study where researchers look at it: the MLflow UI in Chromium, optuna-dashboard over HTTP.

A tiny study (digits, 3 folds, 2 epochs, 3 mlp trials, 2 workers) runs against a real
`mlflow server`, as on many hosts. Then: its console and worker logs (one line saying where the
experiment is, no per-run "View run" lines); its record read over MLflow's REST API (the
experiment's kind and note, dataset inputs, the search's history, the group-by tags, the README's
filter recipes); headless Chromium on the printed link (it must land on the runs table) and on
the chart view (the `history` section first, drawn as lines); and `workbench dashboard`, whose
API must list the study's Optuna studies. Expected values come from the Optuna storage, the
split file and scikit-learn, not from the tracker.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from cdp import Browser
from conftest import CLI_ENV, ROOT, TINY, free_port, mlflow_server, run_cli, wait_until_up

ABOUT = "# The UI test's study: tiny digits, 3 folds.\n# Its second line.\n"
EPOCHS = 2  # TINY's [train] epochs


@dataclass
class Study:
    tmp: Path
    file: Path
    out: Path  # <output_dir>/tiny
    api: str  # the tracking server's base URL
    run: subprocess.CompletedProcess[str]

    def call(self, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> Any:
        url = f"{self.api}/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def experiment(self) -> dict[str, Any]:
        got = self.call("api/2.0/mlflow/experiments/get-by-name", experiment_name="tiny")
        return dict(got["experiment"])

    def runs(self, filter_string: str = "") -> list[dict[str, Any]]:
        body = {
            "experiment_ids": [self.experiment()["experiment_id"]],
            "filter": filter_string,
            "max_results": 1000,
        }
        return list(self.call("api/2.0/mlflow/runs/search", body).get("runs", []))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        got = self.call("api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)
        return sorted((int(m["step"]), float(m["value"])) for m in got.get("metrics", []))

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        storage = f"sqlite:///{self.out / 'optuna.db'}"
        return optuna.load_study(study_name="tiny/mlp", storage=storage).trials


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def name(run: dict[str, Any]) -> str:
    return str(run["info"]["run_name"])


def kind(run: dict[str, Any]) -> str:
    return tags(run).get("workbench.kind", "")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    tmp = tmp_path_factory.mktemp("ui")
    with mlflow_server(tmp / "server") as api:
        file = tmp / "tiny.toml"
        text = ABOUT + TINY.format(out=tmp / "runs")
        on = f'[tracking]\nenabled = true\nuri = "{api}"'
        file.write_text(text.replace("[tracking]\nenabled = false", on))
        run = run_cli("study", str(file), "--workers", "2", cwd=tmp, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        yield Study(tmp, file, tmp / "runs" / "tiny", api, run)


def page(study: Study) -> str:
    """The experiment's link as the study printed it: its one `MLflow:` line."""
    lines = [line for line in study.run.stdout.splitlines() if line.startswith("MLflow:")]
    assert len(lines) == 1, study.run.stdout
    return lines[0].rsplit(" ", 1)[-1]


# --- the console and the logs ---------------------------------------------------------------------


def test_one_line_says_where_the_experiment_is_and_no_run_is_announced(study: Study) -> None:
    exp = study.experiment()["experiment_id"]
    assert page(study) == f"{study.api}/#/experiments/{exp}?workflowType=machine_learning"
    # the workers ended every fold run through the server: MLflow's client announced each one
    # with "View run ... at" before (measured: 12 lines in 2 worker logs for this study)
    folds = [r for r in study.runs() if kind(r) == "fold"]
    assert len(folds) >= 6 and all(r["info"]["status"] != "RUNNING" for r in folds)
    logs = sorted((study.out / "logs").glob("*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    for text in [study.run.stdout, study.run.stderr, *(p.read_text() for p in logs)]:
        assert text.count("View run") == 0 and "View experiment" not in text


# --- the record, over the REST API ----------------------------------------------------------------


def test_the_experiment_is_a_training_experiment_described_by_the_study_file(study: Study) -> None:
    exp_tags = {t["key"]: t["value"] for t in study.experiment()["tags"]}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
    note = exp_tags["mlflow.note.content"]
    assert note.startswith("The UI test's study: tiny digits, 3 folds. Its second line.\n")
    digest = str(np.load(study.out / "split.npz")["fingerprint"])
    assert f"digest `{digest}`" in note and "tags.workbench.best = 'true'" in note


def test_study_trial_and_ensemble_runs_name_the_data_as_their_input(study: Study) -> None:
    from sklearn.datasets import load_digits

    split = np.load(study.out / "split.npz")
    images = load_digits().images  # (1797, 8, 8): what the study read
    expected = {
        "num_rows": len(images),
        "image_shape": [1, *images.shape[1:]],
        "classes": 10,
        "train_rows": len(split["train_idx"]),
        "test_rows": len(split["test_idx"]),
        "split": "stratified",
    }
    runs = [r for r in study.runs() if kind(r) in ("study", "trial", "ensemble")]
    assert {kind(r) for r in runs} == {"study", "trial", "ensemble"}
    for run in runs:
        if kind(run) == "ensemble" and "mlflow.parentRunId" in tags(run):
            continue  # a method's child run: its parent names the data
        (given,) = run["inputs"]["dataset_inputs"]
        data = given["dataset"]
        assert (data["name"], data["digest"]) == ("digits", str(split["fingerprint"])), name(run)
        assert json.loads(data["source"]) == {"uri": "sklearn.datasets.load_digits"}
        assert json.loads(data["profile"]) == expected
        context = "test" if kind(run) == "ensemble" else "train"
        assert given["tags"] == [{"key": "mlflow.data.context", "value": context}]


def test_the_study_run_draws_the_search_one_point_per_complete_trial(study: Study) -> None:
    trials = study.trials()
    complete = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.number)
    assert len(complete) >= 2  # a line: the pruner spares the first 2 trials
    best, values = [], [float(t.value or 0) for t in complete]
    for v in values:  # accuracy: higher is better
        best.append(max(best[-1], v) if best else v)
    numbers = [t.number for t in complete]
    (run,) = (r for r in study.runs() if kind(r) == "study")
    assert study.history(run["info"]["run_id"], "history/cv_accuracy") == list(
        zip(numbers, values, strict=True)
    )
    assert study.history(run["info"]["run_id"], "history/best_cv_accuracy") == list(
        zip(numbers, best, strict=True)
    )
    spread = [float(t.user_attrs["cv_accuracy_std"]) for t in complete]
    assert study.history(run["info"]["run_id"], "history/cv_accuracy_std") == list(
        zip(numbers, spread, strict=True)
    )
    assert not math.isclose(min(values), max(values))  # the points differ: a line, not a dot

    # the best trial's run, and no other, is tagged for the first recipe
    top = max(complete, key=lambda t: float(t.value or 0))
    tagged = [r["info"]["run_id"] for r in study.runs() if tags(r).get("workbench.best") == "true"]
    assert tagged == [top.user_attrs["mlflow_run_id"]]


def test_trial_and_fold_runs_carry_family_and_configuration_for_group_by(study: Study) -> None:
    runs = study.runs()
    trial_runs = {r["info"]["run_id"]: r for r in runs if kind(r) == "trial"}
    by_params = {}
    for t in study.trials():
        if "mlflow_run_id" in t.user_attrs:
            run = trial_runs[t.user_attrs["mlflow_run_id"]]
            assert tags(run)["workbench.family"] == "mlp"  # [models.mlp]: arch = its name
            by_params[json.dumps(t.params, sort_keys=True)] = tags(run)["workbench.config"]
    assert len(set(by_params.values())) == len(by_params) >= 3  # one id per configuration
    for fold in (r for r in runs if kind(r) == "fold"):
        parent = trial_runs[tags(fold)["mlflow.parentRunId"]]
        assert tags(fold)["workbench.config"] == tags(parent)["workbench.config"]
        assert tags(fold)["workbench.family"] == "mlp"


def readme_recipes() -> dict[str, str]:
    """The README's recipes table: what to see -> the filter a user types."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Comparing runs in the MLflow UI")[1].split("\n#")[0]
    rows = re.findall(r"^\| ([^|]+?) \| `([^`]+)` \|", section, flags=re.M)
    return dict(rows)


def test_the_readme_recipes_select_what_they_say(study: Study) -> None:
    recipes = readme_recipes()
    assert list(recipes) == [
        "the best trial of each model",
        "one trial's folds",
        "the ensemble methods",
    ]
    complete = [t for t in study.trials() if t.state.name == "COMPLETE"]
    top = max(complete, key=lambda t: float(t.value or 0))
    results = json.loads((study.out / "ensemble" / "results.json").read_text())
    expected = {
        "the best trial of each model": ({f"mlp/trial-{top.number}"}, ("cv_accuracy_std",)),
        "one trial's folds": (
            {f"mlp/trial-{top.number}/fold-{k}" for k in range(3)},
            ("val_accuracy", "val_loss"),
        ),
        "the ensemble methods": (
            {f"ensemble/{m}" for m in results["methods"]},
            ("test_accuracy", "oof_cv_log_loss"),
        ),
    }
    for what, typed in recipes.items():
        typed = typed.replace("mlp/trial-3/", f"mlp/trial-{top.number}/")  # the README's example
        runs = study.runs(typed)
        names, metrics = expected[what]
        assert {name(r) for r in runs} == names, (what, typed)
        for run in runs:  # the metrics its "then" column charts
            have = {m["key"] for m in run["data"].get("metrics", [])}
            assert set(metrics) <= have, (what, name(run), sorted(have))


# --- in the browser -------------------------------------------------------------------------------


def browse(url: str, ready: str, shot: Path, height: int) -> str:
    """Chromium on `url` (a fresh profile: a first visit) until the JS condition `ready` holds
    (90 s at most); a screenshot; the DOM it built."""
    profile = shot.parent / shot.stem
    browser = Browser(profile, 1600, height)
    try:
        browser.open(url, ready)
        png = browser.screenshot(shot)
        dom = browser.dom()
    finally:
        browser.close()
    shot.with_suffix(".html").write_text(dom)  # beside the screenshot, for a failure's reader
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a drawn page, not a blank
    return dom


def test_the_printed_link_lands_on_the_runs_table(study: Study, tmp_path: Path) -> None:
    exp = study.experiment()["experiment_id"]
    rows = f"document.querySelectorAll('a[href^=\"#/experiments/{exp}/runs/\"]').length >= 2"
    dom = browse(page(study), rows, tmp_path / "experiment.png", 1000)
    top = {
        name(r): r["info"]["run_id"] for r in study.runs() if "mlflow.parentRunId" not in tags(r)
    }
    assert set(top) == {"study:mlp", "ensemble"}
    for run_name, run_id in top.items():  # each top-level run is a row linking to its page
        link = rf'href="#/experiments/{exp}/runs/{run_id}"><span[^>]*>{re.escape(run_name)}</span>'
        assert re.search(link, dom), run_name
    digest = str(np.load(study.out / "split.npz")["fingerprint"])
    assert dom.count(f"digits ({digest})") >= 2  # the Dataset column of both rows
    assert "The UI test's study: tiny digits, 3 folds." in dom  # the experiment's note


def test_the_chart_view_draws_the_search_history_as_lines(study: Study, tmp_path: Path) -> None:
    runs_page = page(study).replace("?", "/runs?") + "&compareRunsMode=CHART"
    lines = "document.querySelectorAll('path.js-line').length >= 3"  # the line charts drawn
    dom = browse(runs_page, lines, tmp_path / "charts.png", 1600)
    # each section's header, then its charts; the first section is the search's history
    header = r'data-testid="experiment-view-compare-runs-section-header".*?>([^<>]+)</div>'
    sections = [(m.start(), m[1]) for m in re.finditer(header, dom)]
    assert sections and sections[0][1] == "history", sections[:3]
    end = next(at for at, title in sections if title != "history")
    history = dom[sections[0][0] : end]
    for key in ("history/cv_accuracy", "history/best_cv_accuracy", "history/cv_accuracy_std"):
        assert key in history, key
    assert "barlayer" not in history  # no bar chart among them
    complete = sum(t.state.name == "COMPLETE" for t in study.trials())
    lines = re.findall(r'<path class="js-line" d="(M[^"]+)"', history)
    drawn = [d for d in lines if d.count("L") == complete - 1]  # one vertex per complete trial
    assert len(drawn) >= 3, lines  # one line per history chart, with every point
    assert history.count("study:mlp") >= 3  # each chart's legend names the study run


# --- optuna-dashboard -----------------------------------------------------------------------------


def test_dashboard_serves_the_study_storage_and_lists_its_studies(study: Study) -> None:
    port = free_port()
    log = study.tmp / "dashboard.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "workbench", "dashboard", str(study.file), "--port", str(port)],
            cwd=study.tmp,
            env=CLI_ENV,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/api/studies", server, log, "workbench dashboard")
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as r:
            listed = {s["study_name"]: s for s in json.loads(r.read())["study_summaries"]}
        storage = f"sqlite:///{study.out / 'optuna.db'}"
        assert set(listed) == set(optuna.get_all_study_names(storage))
        assert "tiny/mlp" in listed
        url = f"{base}/api/studies/{listed['tiny/mlp']['study_id']}"
        with urllib.request.urlopen(url, timeout=30) as r:
            trials = json.loads(r.read())["trials"]
        assert sorted(t["number"] for t in trials) == [t.number for t in study.trials()]
        server.send_signal(signal.SIGINT)  # Ctrl-C: it stops cleanly
        assert server.wait(timeout=30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    printed = log.read_text()
    page_ = f"{base}/dashboard/studies/{listed['tiny/mlp']['study_id']}"
    assert f"optuna-dashboard on {storage}: {base}/dashboard" in printed
    assert f"tiny/mlp: {page_}" in printed


def test_dashboard_without_a_study_says_so(tmp_path: Path, tiny_file: Path) -> None:
    done = run_cli("dashboard", str(tiny_file), "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "holds no study tiny/mlp" in done.stdout + done.stderr
    assert "run the study first" in done.stdout + done.stderr
