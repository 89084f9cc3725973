"""Many workers on one storage: a killed worker, a full disk, races, and a real PostgreSQL server.

Rules checked here (see workbench/search.py):
- a worker killed mid-trial: its trial is failed after 3 missed heartbeats, its retry (same
  parameters) is run by a surviving worker, and trials completed before keep their files;
- a failed write fails the trial, not the study; a trial failed under a live worker does not
  stop it;
- two workers never run one trial twice, and a study ends with exactly its configured number
  of finished trials.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy
from conftest import free_port, run_cli, wait_held
from mlflow.exceptions import MlflowException
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from workbench import cli, cv, search
from workbench.config import StudyConfig, load_study
from workbench.cv import CrossValidator
from workbench.data import ImageData, Split, load_data, load_or_make_split
from workbench.errors import SearchError
from workbench.files import load_npz, save_npz
from workbench.runtime import HOLD
from workbench.tracking import Tracker
from workbench.train import load_model

ENV = {
    **os.environ,
    "COLUMNS": "160",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def edit(
    file: Path, search_keys: dict[str, Any], epochs: int = 2, mlflow: Path | None = None
) -> Path:
    """The tiny study file with [search] keys added, epochs set, tracking into `mlflow` (sqlite)."""
    text = file.read_text().replace("epochs = 2", f"epochs = {epochs}")
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in search_keys.items())
    text = text.replace("trials = 3\n", "") if "trials" in search_keys else text
    text = text.replace("[search]\n", f"[search]\n{lines}")
    if mlflow is not None:
        text = text.replace(
            "[tracking]\nenabled = false", f'[tracking]\nuri = "sqlite:///{mlflow}"'
        )
    file.write_text(text)
    return file


def wait_for(what: str, timeout: float, check: Callable[[], Any]) -> Any:
    """Poll `check` until it returns something true; fail naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def worker(file: Path, index: int, log: Path, hold: str = "") -> subprocess.Popen[bytes]:
    """`workbench worker FILE --index i`, as the parent starts it; `hold`: where it waits
    ("<run>/<fold>:<file>", workbench.runtime.hold_point), for a test to kill it there."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workbench", "worker", str(file), "--index", str(index)],
            cwd=file.parent,
            env={**ENV, HOLD: hold} if hold else ENV,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def counted(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def prepare(cfg: StudyConfig) -> tuple[ImageData, Split, optuna.Study]:
    """What the parent does before its workers start: the split, then the studies."""
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    return data, split, search.create_studies(cfg, search.open_storage(cfg))["mlp"]


# --- a worker killed mid-trial --------------------------------------------------------------------

HB = 1  # seconds between heartbeats here: a trial is stale after 3 s without one


def mid_trial(study: optuna.Study, index: int, tracked: bool) -> Callable[[], FrozenTrial | None]:
    """A trial worker `index` is training, once some trial is complete (None until then)."""

    def find() -> FrozenTrial | None:
        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return None
        for t in trials:
            if (
                t.state == TrialState.RUNNING
                and t.user_attrs.get("worker") == index
                and ("mlflow_run_id" in t.user_attrs or not tracked)
                and t.intermediate_values  # at least one epoch reported
            ):
                return t
        return None

    return find


def kill(proc: subprocess.Popen[bytes]) -> datetime:
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = datetime.now()  # naive local time, like Optuna's trial datetimes
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return killed_at


def check_retried(
    cfg: StudyConfig,
    study: optuna.Study,
    victim: FrozenTrial,
    before: list[FrozenTrial],
    killed_at: datetime,
) -> tuple[FrozenTrial, FrozenTrial]:
    """The killed trial ended FAIL by heartbeat and its one retry (same parameters) ran to the
    end; the study has exactly its trials; every trial completed before the kill kept its files."""
    trials = {t.number: t for t in study.get_trials()}
    dead = trials[victim.number]
    retries = [
        t
        for t in trials.values()
        if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number
    ]
    assert dead.state == TrialState.FAIL and dead.datetime_complete is not None
    assert len(retries) == 1, [(t.number, t.state.name) for t in trials.values()]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["worker"] == 0  # the survivor ran it
    assert len(counted(study)) == cfg.search.trials
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    others = [t for t in trials.values() if t.state == TrialState.FAIL and t is not dead]
    assert all(t.user_attrs.get("surplus") for t in others)  # no other failure: no duplicate
    for t in before:
        folder = cfg.out / t.user_attrs["dir"]
        assert trials[t.number].state == TrialState.COMPLETE
        assert load_npz(folder / "oof.npz")["proba"].shape[0] > 0
        for k in range(cfg.cv.folds):
            load_model(folder / f"fold-{k}.pt")
    # the retry ran in the dead trial's folder (keeping the folds it had finished) and sealed it
    assert retry.user_attrs["dir"] == dead.user_attrs["dir"]
    assert set(retry.user_attrs["files"]["files"]) >= {"oof.npz", "history.json", "fold-0.pt"}
    failed_after = (dead.datetime_complete - killed_at).total_seconds()
    assert failed_after < 3 * HB + 10
    assert retry.datetime_start and retry.datetime_complete
    print(
        f"\nkilled worker {victim.user_attrs['worker']} (pid {victim.user_attrs['pid']}) in "
        f"trial {victim.number} at epoch step {max(victim.intermediate_values)}; failed by "
        f"heartbeat {failed_after:.1f} s later; retry trial {retry.number} started "
        f"{(retry.datetime_start - killed_at).total_seconds():.1f} s and completed "
        f"{(retry.datetime_complete - killed_at).total_seconds():.1f} s after the kill"
    )
    return dead, retry


def test_the_next_worker_fails_a_killed_worker_s_trial_and_retries_it(
    tiny_file: Path, tmp_path: Path
) -> None:
    """One worker process is killed mid-trial; a worker started after it (here, in-process)
    runs the remaining trial, waits for the dead trial to go stale, then runs its retry."""
    file = edit(tiny_file, {"trials": 3, "heartbeat": HB, "pruner": "none"})
    cfg = load_study(file)
    data, split, study = prepare(cfg)
    go, log = tmp_path / "go", tmp_path / "worker-1.log"  # `go` is never made: it waits
    proc = worker(file, 1, log, hold=f"1/1:{go}")  # before fold 1 of trial 1 (0 is complete)
    try:
        assert wait_held(go, proc, log) == proc.pid
        victim = mid_trial(study, 1, tracked=False)()
        assert victim is not None and victim.number == 1, log.read_text()[-3000:]
        assert victim.user_attrs["pid"] == proc.pid
        before = study.get_trials(states=(TrialState.COMPLETE,))
        killed_at = kill(proc)
    finally:
        stop([proc])
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False), worker=0)
    check_retried(cfg, study, victim, before, killed_at)


def test_a_retry_trains_only_the_folds_its_killed_first_try_had_not_finished(
    tiny_file: Path, tmp_path: Path
) -> None:
    """A worker is killed (SIGKILL) as the fourth fold of five starts. Its retry keeps folds 1-3
    (files untouched, their out-of-fold rows the stored ones) and trains folds 4 and 5 only."""
    file = edit(tiny_file, {"trials": 1, "heartbeat": HB, "pruner": "none"})
    file.write_text(file.read_text().replace("folds = 3", "folds = 5"))
    cfg = load_study(file)
    data, split, study = prepare(cfg)
    folder = cfg.out / "trials" / "mlp" / "0000"
    go, log = tmp_path / "go", tmp_path / "worker-1.log"  # `go` is never made: it waits
    proc = worker(file, 1, log, hold=f"0/3:{go}")  # before fold 3 (the fourth) of trial 0
    try:
        wait_held(go, proc, log)  # it waits there until the kill: nothing of fold 3 is written
        assert (folder / "fold-2.npz").exists() and not (folder / "fold-3.npz").exists()
        kept = {k: load_npz(folder / f"fold-{k}.npz") for k in range(3)}
        stamps = {k: (folder / f"fold-{k}.pt").stat().st_mtime_ns for k in range(3)}
        digests = {
            k: hashlib.sha256((folder / f"fold-{k}.pt").read_bytes()).hexdigest() for k in range(3)
        }
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop([proc])
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False), worker=0)

    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == dead.params and retry.user_attrs["dir"] == "trials/mlp/0000"
    assert retry.user_attrs["folds_resumed"] == [0, 1, 2]
    stride = cfg.train.epochs  # pruning steps are fold * epochs + epoch
    assert {step // stride for step in retry.intermediate_values} == {3, 4}  # trained: 4 and 5
    for k in range(3):  # the kept folds were not trained again
        assert (folder / f"fold-{k}.pt").stat().st_mtime_ns == stamps[k]
        assert hashlib.sha256((folder / f"fold-{k}.pt").read_bytes()).hexdigest() == digests[k]
    oof = load_npz(folder / "oof.npz")
    y = data.y[split.train_idx].numpy()
    for k in range(5):
        fold = load_npz(folder / f"fold-{k}.npz")
        if k < 3:  # the stored rows, as the first try left them
            np.testing.assert_array_equal(fold["rows"], kept[k]["rows"])
            np.testing.assert_array_equal(oof["proba"][fold["rows"]], kept[k]["proba"])
        accuracy = float((fold["proba"].argmax(1) == y[fold["rows"]]).mean())
        assert retry.user_attrs["fold_scores"][k] == pytest.approx(accuracy)
    assert retry.value == pytest.approx(np.mean(retry.user_attrs["fold_scores"]))


@pytest.mark.slow
def test_two_worker_processes_one_killed_with_tracking(tiny_file: Path, tmp_path: Path) -> None:
    """`workbench study` as it runs: two worker processes, MLflow on; worker 1 is killed
    mid-trial, worker 0 finishes the study and the retry; the parent's end closes every run."""
    file = edit(
        tiny_file, {"trials": 4, "heartbeat": HB, "pruner": "none"}, mlflow=tmp_path / "mlflow.db"
    )
    cfg, _, _ = cli.prepare(file, None, None)  # the parent's part: split, studies, study runs
    study = search.create_studies(cfg, search.open_storage(cfg))["mlp"]
    Tracker(cfg).study_run("mlp", create=True)
    logs = [tmp_path / f"worker-{i}.log" for i in (0, 1)]
    go = tmp_path / "go"  # never made: worker 1 waits before fold 1 of its first trial
    procs = [worker(file, 0, logs[0]), worker(file, 1, logs[1], hold=f"*/1:{go}")]
    try:
        wait_held(go, procs[1], logs[1])
        # worker 0 meanwhile completes a trial: the kill comes after one, as the rules need
        victim = wait_for("worker 1 held, a trial complete", 120, mid_trial(study, 1, True))
        assert victim.user_attrs["pid"] == procs[1].pid
        before = study.get_trials(states=(TrialState.COMPLETE,))
        killed_at = kill(procs[1])
        assert procs[0].wait(timeout=180) == 0, logs[0].read_text()[-3000:]
    finally:
        stop(procs)
    check_retried(cfg, study, victim, before, killed_at)
    assert f"no heartbeat from worker 1 (pid {procs[1].pid}" in logs[0].read_text()

    # the parent ends the study runs: nothing RUNNING, the killed trial's run FAILED
    tracker = Tracker(cfg)
    tracker.end_study("mlp", {"trials_complete": 4})
    runs = tracker.find_runs("")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[victim.user_attrs["mlflow_run_id"]].info.status == "FAILED"
    trial_runs = [
        r.data.tags["optuna.trial_number"]
        for r in runs
        if r.data.tags.get("workbench.kind") == "trial"
    ]
    numbers = [str(t.number) for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert sorted(trial_runs) == sorted(numbers)  # one trial run per trial: none ran twice


# --- failures one trial at a time (in-process) ----------------------------------------------------


def test_a_full_disk_fails_the_trial_not_the_study(
    tiny_cfg: StudyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, split, study = prepare(tiny_cfg)

    def full_for_trial_1(path: Path, **arrays: Any) -> Path:
        if Path(path).parent.name == "0001":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_npz(path, **arrays)

    monkeypatch.setattr("workbench.cv.save_npz", full_for_trial_1)
    search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    trials = study.get_trials()
    assert trials[1].state == TrialState.FAIL
    assert len(counted(study)) == 3 and len(trials) == 4  # the worker went on
    assert not (tiny_cfg.out / "trials" / "mlp" / "0001").exists()  # no half-trial folder
    assert (tiny_cfg.out / "trials" / "mlp" / "0002" / "oof.npz").exists()


def test_a_trial_failed_under_a_live_worker_is_retried_and_the_worker_goes_on(
    tiny_cfg: StudyConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its heartbeats stalled past the grace period, so another worker failed trial 0 and queued
    a retry while it still ran: the live worker drops it (no files) and carries on."""
    data, split, study = prepare(tiny_cfg)
    storage = search.open_storage(tiny_cfg)
    real_run = CrossValidator.run

    def run(self: CrossValidator, hp: Any, out: Path, ref: Any, *args: Any) -> Any:
        if ref.label == 0:  # what fail_stale_trials does in the other worker
            (trial,) = study.get_trials(states=(TrialState.RUNNING,))
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            callback = storage.get_heartbeat_stale_trial_callback()
            assert callback is not None
            callback(study, storage.get_trial(trial._trial_id))
        return real_run(self, hp, out, ref, *args)

    monkeypatch.setattr(CrossValidator, "run", run)
    search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[1].state in FINISHED and trials[1].params == trials[0].params
    assert len(counted(study)) == 3
    # the retry owns the folder now: the superseded try left it alone, the retry sealed it
    assert trials[1].user_attrs["dir"] == "trials/mlp/0000"
    if trials[1].state == TrialState.COMPLETE:
        assert (tiny_cfg.out / "trials" / "mlp" / "0000" / "oof.npz").exists()
    assert "trial 0: failed by another worker while it ran here" in capsys.readouterr().out


def fail_trials(
    monkeypatch: pytest.MonkeyPatch, numbers: Callable[[int], bool], error: BaseException
) -> None:
    """The model factory raises `error` in the trials whose number `numbers` accepts."""
    real_run, real_create = CrossValidator.run, cv.create_model
    running: list[Any] = []

    def run(self: CrossValidator, hp: Any, out: Path, ref: Any, *args: Any) -> Any:
        running.append(ref.label)
        return real_run(self, hp, out, ref, *args)

    def create_model(*args: Any, **kwargs: Any) -> Any:
        if numbers(running[-1]):
            raise error
        return real_create(*args, **kwargs)

    monkeypatch.setattr(CrossValidator, "run", run)
    monkeypatch.setattr("workbench.cv.create_model", create_model)


@pytest.mark.parametrize(
    ("where", "error", "recorded"),
    [
        (
            "factory",
            ValueError("width must be positive, got -1"),
            "ValueError: width must be positive, got -1",
        ),
        (
            "factory",
            RuntimeError("mat1 and mat2 shapes\ncannot be multiplied"),
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        ),
        # MLflow's SQLite store under several workers: the trial's run cannot be created
        (
            "mlflow",
            MlflowException("(sqlite3.OperationalError) database is locked"),
            "MlflowException: (sqlite3.OperationalError) database is locked",
        ),
    ],
)
def test_any_error_in_a_trial_fails_that_trial_and_the_worker_goes_on(
    where: str,
    error: Exception,
    recorded: str,
    tiny_cfg: StudyConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, split, study = prepare(tiny_cfg)
    if where == "factory":
        fail_trials(monkeypatch, lambda n: n == 1, error)
    else:
        real = Tracker.start_trial

        def start_trial(self: Tracker, model: str, label: Any, params: Any) -> str:
            if label == 1:
                raise error
            return real(self, model, label, params)

        monkeypatch.setattr(Tracker, "start_trial", start_trial)
    search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["error"] == recorded
    assert "error" not in trials[0].user_attrs
    assert len(counted(study)) == 3 and len(trials) == 4  # the next trials ran
    assert not (tiny_cfg.out / "trials" / "mlp" / "0001").exists()  # a failed trial leaves none
    assert (tiny_cfg.out / "trials" / "mlp" / "0003" / "oof.npz").exists()
    assert f"tiny/mlp trial 1 failed: {recorded}\n" in capsys.readouterr().out
    (row,) = search.progress(tiny_cfg, search.open_storage(tiny_cfg))
    assert row.failed == 1


def test_failures_in_a_row_stop_the_worker_naming_the_model_the_count_and_the_last_error(
    tiny_cfg: StudyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, split, study = prepare(tiny_cfg)
    fail_trials(monkeypatch, lambda n: True, ValueError("no such width: -1"))
    with pytest.raises(SearchError) as stopped:
        search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    assert str(stopped.value) == (
        "model 'mlp': 4 trials in a row failed, the last (trial 3) with ValueError: no such "
        "width: -1; this worker stops, since something is wrong beyond one trial"
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert {t.user_attrs["error"] for t in trials} == {"ValueError: no such width: -1"}


def test_failures_not_in_a_row_do_not_stop_the_worker(
    tiny_cfg: StudyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, split, study = prepare(tiny_cfg)
    fail_trials(monkeypatch, lambda n: n in (0, 1, 2, 4, 5, 6), RuntimeError("flaky"))
    search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    states = [t.state for t in study.get_trials()]
    assert states[:4] == [TrialState.FAIL] * 3 + [states[3]] and states[3] in FINISHED
    assert states[4:7] == [TrialState.FAIL] * 3
    assert len(states) == 9 and len(counted(study)) == 3


def test_a_keyboard_interrupt_in_a_trial_still_ends_the_worker(
    tiny_cfg: StudyConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, split, study = prepare(tiny_cfg)
    fail_trials(monkeypatch, lambda n: n == 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]  # none after it
    assert "error" not in trials[1].user_attrs


def test_the_cli_says_in_one_line_why_a_worker_stopped(tiny_file: Path, tmp_path: Path) -> None:
    """`workbench study` whose model factory raises in every trial (patched in the forked
    worker by a sitecustomize module): the worker stops after 4 and the parent says why."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import workbench.cv\n\n\n"
        "def create_model(*args, **kwargs):\n"
        "    raise ValueError('no such width: -1')\n\n\n"
        "workbench.cv.create_model = create_model\n"
    )
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    result = run_cli(
        "study", str(tiny_file), "--workers", "1", cwd=tmp_path, env={**ENV, "PYTHONPATH": path}
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    log = tmp_path / "runs" / "tiny" / "logs" / "worker-0.log"
    line = (
        "worker 0 stopped: model 'mlp': 4 trials in a row failed, the last (trial 3) with "
        f"ValueError: no such width: -1; this worker stops, since something is wrong beyond one "
        f"trial (log: {log})"
    )
    assert line in result.stdout.splitlines(), out
    assert "Traceback" not in out
    said = log.read_text()
    assert all(
        f"tiny/mlp trial {n} failed: ValueError: no such width: -1\n" in said for n in range(4)
    )


# --- races --------------------------------------------------------------------------------------


def test_creating_the_studies_twice_gives_the_same_studies(tiny_cfg: StudyConfig) -> None:
    """The parent creates them before any worker starts; a resume (or a second parent) loads them.
    (The MLflow study run is reused the same way: tests/test_tracking.py.)"""
    first = search.create_studies(tiny_cfg, search.open_storage(tiny_cfg))
    again = search.create_studies(tiny_cfg, search.open_storage(tiny_cfg))
    assert first["mlp"]._study_id == again["mlp"]._study_id
    assert again["mlp"].user_attrs == first["mlp"].user_attrs
    assert len(optuna.get_all_study_summaries(search.open_storage(tiny_cfg))) == 1


def test_a_worker_that_started_a_trial_too_many_runs_nothing(
    tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers both saw room for the last trial and both started one: the later number ends
    at once (FAIL, user attr `surplus`, no parameters, no folder) and is counted nowhere."""
    cfg = load_study(tiny_file, trials=2)
    data, split, study = prepare(cfg)
    real, lied = search.worker._has_work, []

    def stale_read(s: optuna.Study, target: int) -> bool:  # says "room" once, when it is full
        if len(counted(s)) == 2 and not lied:
            lied.append(True)
            return True
        return real(s, target)

    monkeypatch.setattr(search.worker, "_has_work", stale_read)
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))
    trials = study.get_trials()
    assert [t.state for t in trials][2:] == [TrialState.FAIL]
    assert trials[2].user_attrs["surplus"] and trials[2].params == {}
    assert len(counted(study)) == 2
    assert not (cfg.out / "trials" / "mlp" / "0002").exists()
    (row,) = search.progress(cfg, search.open_storage(cfg))
    assert (row.complete + row.pruned, row.failed) == (2, 0)
    assert [r["number"] for r in search.trial_rows(cfg, "mlp", search.open_storage(cfg))] == [0, 1]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_never_take_the_same_queued_trial(
    backend: str, tiny_cfg: StudyConfig, request: pytest.FixtureRequest
) -> None:
    """Optuna takes a queued (WAITING) trial, a retry say, by reading its state, then writing
    RUNNING. Worker B tries to take it between worker A's read and write: only one may get it.
    (On SQLite, without BEGIN IMMEDIATE, both did.)"""
    cfg = tiny_cfg
    if backend == "postgresql":
        url = request.getfixturevalue("postgres")("race")
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"storage": url})})
    a, b = search.open_storage(cfg), search.open_storage(cfg)
    study = search.create_studies(cfg, a)["mlp"]
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING))
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    took: dict[str, bool] = {}

    def take(name: str, storage: search.RDBStorage) -> None:
        took[name] = storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING)

    b_tries = threading.Thread(target=take, args=("b", b))

    def after_a_reads(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not b_tries.ident and statement.lstrip().startswith("SELECT") and "trials" in statement:
            b_tries.start()
            b_tries.join(timeout=1.0)  # B finishes now, or waits for A's lock

    sqlalchemy.event.listen(a.engine, "after_cursor_execute", after_a_reads)
    take("a", a)
    b_tries.join(timeout=60)
    assert took == {"a": True, "b": False}


# --- a real PostgreSQL server (the `postgres` fixture: conftest.py) ------------------------------


def test_two_workers_share_a_postgresql_storage(
    postgres: Callable[[str], str], tiny_file: Path, tmp_path: Path
) -> None:
    url = postgres("study")
    env = {**ENV, "WORKBENCH_STORAGE": url}
    first = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    study = optuna.load_study(study_name="tiny/mlp", storage=url)
    trials = study.get_trials()
    assert len(counted(study)) == 3  # exactly the configured trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    assert {t.user_attrs["worker"] for t in counted(study)} <= {0, 1}
    assert not (tmp_path / "runs" / "tiny" / "optuna.db").exists()  # nothing went to SQLite

    again = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "every model study is complete" in again.stdout
    assert len(optuna.load_study(study_name="tiny/mlp", storage=url).trials) == len(trials)


def test_a_postgresql_server_that_is_not_there_gets_one_clear_line(
    tiny_file: Path, tmp_path: Path
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # nothing listens
    result = run_cli("study", str(tiny_file), cwd=tmp_path, env={**ENV, "WORKBENCH_STORAGE": url})
    assert result.returncode == 2
    said = " ".join(result.stdout.split())
    assert f"error: cannot open the Optuna storage '{url}'" in said
    assert "Connection refused" in said or "could not connect" in said.lower()
    assert "Traceback" not in result.stdout + result.stderr
