"""Many hosts without a shared filesystem, on loopback: a real PostgreSQL server (the Optuna
storage), a real `mlflow server --serve-artifacts` with its own artifact folder, and "hosts" that
are empty working directories sharing nothing but those two URLs and the study file.

Host A runs `workbench study` (the parent and one worker), host B adds trials with
`workbench worker`, then host C, which ran nothing, runs `workbench ensemble`: it must find every
completed trial, fetch their files from MLflow and write the results host A writes for them.
And a worker killed on one host has its trial retried on another, from the folds it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from conftest import CLI_ENV, TINY, mlflow_server, run_cli, wait_held
from mlflow import MlflowClient

from workbench import search
from workbench.config import load_study
from workbench.runtime import HOLD
from workbench.tracking import Tracker

STUDY = (
    TINY.format(out="runs")  # relative: each host writes under its own working directory
    .replace("trials = 3", 'trials = 6\npruner = "none"')  # every trial completes
    .replace("[tracking]\nenabled = false", '[tracking]\nenabled = true\nartifacts = "mlflow"')
    + "[ensemble]\ntop_k = 6\n"
)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` that serves artifacts from its own folder."""
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(folder, "--serve-artifacts", "--artifacts-destination", "artifacts") as api:
        yield api


def make_hosts(tmp_path: Path, names: str, file: str, text: str) -> dict[str, Path]:
    """One empty working directory per "host", each with its own copy of the study file."""
    hosts = {name: tmp_path / name for name in names}
    for host in hosts.values():
        host.mkdir()
        (host / file).write_text(text)
    return hosts


def results(host: Path) -> dict:
    return json.loads((host / "runs" / "tiny" / "ensemble" / "results.json").read_text())


def test_two_hosts_search_and_a_third_ensembles_from_the_servers_alone(
    postgres: Callable[[str], str], tracking_server: str, tmp_path: Path
) -> None:
    storage, api = postgres("hosts"), tracking_server
    env = {**CLI_ENV, "WORKBENCH_STORAGE": storage, "MLFLOW_TRACKING_URI": api}
    hosts = make_hosts(tmp_path, "abc", "tiny.toml", STUDY)
    # host A searches first (3 of the 6 trials, --trials 3), then host B adds the other 3: one
    # after the other, so that each surely runs some (concurrent workers: tests/test_workers.py)
    a = run_cli("study", "tiny.toml", "--workers", "1", "--trials", "3", cwd=hosts["a"], env=env)
    assert a.returncode == 0, a.stdout + a.stderr
    b = run_cli("worker", "tiny.toml", "--index", "1", cwd=hosts["b"], env=env)
    assert b.returncode == 0, b.stdout + b.stderr
    study = optuna.load_study(study_name="tiny/mlp", storage=storage)
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}  # both hosts ran trials

    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for t in complete:  # each trial's files went to MLflow, in the run store's layout
        uri = t.user_attrs["files"]["uri"]
        assert uri.startswith("mlflow-artifacts:/") and uri.endswith(f"/{t.user_attrs['dir']}")
    on_b = {t.number for t in complete if t.user_attrs["worker"] == 1}
    assert len(complete) == 6 and len(on_b) == 3
    trials_a = hosts["a"] / "runs" / "tiny" / "trials" / "mlp"
    assert not {int(p.name) for p in trials_a.iterdir()} & on_b  # A never had B's folders

    c = run_cli("ensemble", "tiny.toml", cwd=hosts["c"], env=env)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "skipped member" not in c.stdout
    assert not (hosts["c"] / "runs" / "tiny" / "trials").exists()  # it trained nothing
    fetched = [p for p in (hosts["c"] / "runs" / "tiny" / "cache").iterdir() if p.is_dir()]
    assert len(fetched) == len(results(hosts["c"])["members"])  # one copy per member
    # host A's own ensemble, now that B's last trial is done too (a rerun: same command)
    again = run_cli("ensemble", "tiny.toml", cwd=hosts["a"], env=env)
    assert again.returncode == 0, again.stdout + again.stderr

    got, want = results(hosts["c"]), results(hosts["a"])
    best6 = sorted(complete, key=lambda t: t.value or 0.0, reverse=True)[:6]
    assert sorted(m["name"] for m in got["members"]) == sorted(
        f"mlp/trial-{t.number}" for t in best6
    )
    # the same members, CV and test metrics; their inference costs are timed on each host
    assert [m.pop("cost")["parameters"] for m in got["members"]] == [
        m.pop("cost")["parameters"] for m in want["members"]
    ]
    assert got["members"] == want["members"]
    for name, method in want["methods"].items():
        assert got["methods"][name]["weights"] == method["weights"]
        assert got["methods"][name]["test"] == method["test"]
    assert got["final"]["test"] == want["final"]["test"] and got["choice"] == want["choice"]


KILLED = (
    TINY.format(out="runs")
    .replace('name = "tiny"', 'name = "killed"')  # its own MLflow experiment on the shared server
    .replace("folds = 3", "folds = 5")
    .replace("trials = 3", 'trials = 1\nheartbeat = 1\npruner = "none"')
    .replace("[tracking]\nenabled = false", '[tracking]\nenabled = true\nartifacts = "mlflow"')
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_trial_killed_on_one_host_resumes_on_another_from_the_folds_it_finished(
    postgres: Callable[[str], str],
    tracking_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, api = postgres("killed"), tracking_server
    env = {**CLI_ENV, "WORKBENCH_STORAGE": storage, "MLFLOW_TRACKING_URI": api}
    hosts = make_hosts(tmp_path, "ab", "killed.toml", KILLED)
    # the parent's part, here in-process: the Optuna study and the MLflow study run
    monkeypatch.setenv("WORKBENCH_STORAGE", storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", api)
    cfg = load_study(hosts["a"] / "killed.toml")
    study = search.create_studies(cfg, search.open_storage(cfg))["mlp"]
    study_run = Tracker(cfg).study_run("mlp", create=True)
    client = MlflowClient(api)

    def uploaded() -> set[str]:  # what host B has sent of the trial's folder so far
        return {Path(f.path).name for f in client.list_artifacts(study_run, "trials/mlp/0000")}

    # host B trains the one trial; it waits as its fourth fold would start, and is killed there
    on_b = hosts["b"] / "runs" / "killed" / "trials" / "mlp" / "0000"
    go, log = tmp_path / "go", hosts["b"] / "worker.log"  # `go` is never made: B waits
    with log.open("w") as sink:
        b = subprocess.Popen(
            [sys.executable, "-m", "workbench", "worker", "killed.toml", "--index", "1"],
            cwd=hosts["b"],
            env={**env, HOLD: f"0/3:{go}"},  # before fold 3 (the fourth) of trial 0
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_held(go, b, log)
        deadline = time.monotonic() + 180
        while "fold-2.npz" not in uploaded():  # uploads run beside the held worker
            assert time.monotonic() < deadline, "host B never uploaded its third fold"
            time.sleep(0.1)
        assert (on_b / "fold-2.npz").exists() and not (on_b / "fold-3.npz").exists()
        digests = {k: sha256(on_b / f"fold-{k}.pt") for k in range(3)}
        os.kill(b.pid, signal.SIGKILL)
        assert b.wait(timeout=30) == -signal.SIGKILL
    finally:
        if b.poll() is None:
            b.kill()

    # host A, which never saw B's folder: its worker fails the stale trial and runs the retry
    a = run_cli("worker", "killed.toml", "--index", "0", cwd=hosts["a"], env=env)
    assert a.returncode == 0, a.stdout + a.stderr
    dead, retry = study.get_trials()
    assert dead.state == optuna.trial.TrialState.FAIL and dead.user_attrs["worker"] == 1
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["worker"] == 0
    assert retry.params == dead.params
    assert retry.user_attrs["folds_resumed"] == [0, 1, 2]  # fetched from MLflow
    stride = cfg.train.epochs  # pruning steps are fold * epochs + epoch
    assert {step // stride for step in retry.intermediate_values} == {3, 4}  # trained: 4 and 5
    on_a = hosts["a"] / "runs" / "killed" / "trials" / "mlp" / "0000"
    for k in range(3):  # byte for byte what host B trained
        assert sha256(on_a / f"fold-{k}.pt") == digests[k]
    manifest = retry.user_attrs["files"]
    assert manifest["uri"].startswith("mlflow-artifacts:/")
    assert {f"fold-{k}.pt" for k in range(5)} <= set(manifest["files"])
