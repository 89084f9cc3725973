"""Many hosts without a shared filesystem, on loopback: a real PostgreSQL server (the Optuna
storage), a real `mlflow server --serve-artifacts` with its own artifact folder, and "hosts" that
are empty working directories sharing nothing but those two URLs and the study file.

Host A runs `workbench study` (the parent and one worker), host B joins with `workbench worker`,
then host C, which ran nothing, runs `workbench ensemble`: it must find every completed trial,
fetch their files from MLflow and write the results that host A writes for the same trials.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from conftest import CLI_ENV, TINY, mlflow_server, run_cli

STUDY = (
    TINY.format(out="runs")  # relative: each host writes under its own working directory
    .replace("trials = 3", "trials = 6")
    .replace("[tracking]\nenabled = false", '[tracking]\nenabled = true\nartifacts = "mlflow"')
    + "[ensemble]\ntop_k = 6\n"
)


def results(host: Path) -> dict:
    return json.loads((host / "runs" / "tiny" / "ensemble" / "results.json").read_text())


def test_two_hosts_search_and_a_third_ensembles_from_the_servers_alone(
    postgres: Callable[[str], str], tmp_path: Path
) -> None:
    storage = postgres("hosts")
    with mlflow_server(
        tmp_path / "server", "--serve-artifacts", "--artifacts-destination", "artifacts"
    ) as api:
        env = {**CLI_ENV, "WORKBENCH_STORAGE": storage, "MLFLOW_TRACKING_URI": api}
        hosts = {name: tmp_path / name for name in "abc"}
        for host in hosts.values():
            host.mkdir()
            (host / "tiny.toml").write_text(STUDY)
        a = subprocess.Popen(
            [sys.executable, "-m", "workbench", "study", "tiny.toml", "--workers", "1"],
            cwd=hosts["a"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while True:  # host B joins once host A's parent has created the study
            try:
                study = optuna.load_study(study_name="tiny/mlp", storage=storage)
                break
            except KeyError:
                assert a.poll() is None and time.monotonic() < deadline, a.communicate()[0]
                time.sleep(0.5)
        b = run_cli("worker", "tiny.toml", "--index", "1", cwd=hosts["b"], env=env)
        out_a, _ = a.communicate(timeout=600)
        assert a.returncode == 0, out_a
        assert b.returncode == 0, b.stdout + b.stderr

        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert {t.user_attrs["worker"] for t in complete} == {0, 1}  # both hosts ran trials
        for t in complete:  # each trial's files were uploaded once, to its own MLflow run
            assert t.user_attrs["files"]["uri"].startswith("mlflow-artifacts:/")
            assert t.user_attrs["mlflow_run_id"] in t.user_attrs["files"]["uri"]
        on_b = {t.number for t in complete if t.user_attrs["worker"] == 1}
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
    assert got["members"] == want["members"]  # the same members, CV and test metrics
    for name, method in want["methods"].items():
        assert got["methods"][name]["weights"] == method["weights"]
        assert got["methods"][name]["test"] == method["test"]
    assert got["final"]["test"] == want["final"]["test"] and got["chosen"] == want["chosen"]
