"""Shared fixtures: a tiny study (digits, 2-3 folds, 2 epochs, tracking off, output in tmp_path)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from workbench.config import StudyConfig, load_study
from workbench.runtime import configure_threads

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MNIST_T10K = SHARED / "data" / "mnist-t10k"

TINY = """
name = "tiny"
seed = 0
output_dir = "{out}"
[cv]
folds = 3
[search]
trials = 3
startup_trials = 2
pruner_startup_trials = 2
pruner_warmup_epochs = 1
[train]
epochs = 2
batch_size = 64
[tracking]
enabled = false
[models.mlp]
params = {{ width = 64 }}
[models.mlp.space]
lr = {{ low = 1e-3, high = 3e-2, log = true }}
dropout = {{ low = 0.0, high = 0.3 }}
"""

configure_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` (pyproject's marker): a test that needs a CUDA device is skipped, saying
    so, on a machine without one; that is platform, not a missing component. Anything the
    suite installs (chromium, PostgreSQL) fails its tests when absent instead."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
        for item in marked:
            item.add_marker(skip)


CLI_ENV = {**os.environ, "COLUMNS": "160", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m workbench ARGS` as a user runs it, in `cwd`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=cwd,
        env=env or CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (folders too, so a new empty one shows) and each file's sha256."""
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        )
        for p in sorted(folder.rglob("*"))
    }


def searched_tiny(tmp: Path) -> Path:
    """The tiny study in `tmp`, searched by 2 workers with its ensemble stage off (a test then
    runs the stage as it needs); the study file's path."""
    file = tmp / "tiny.toml"
    file.write_text(TINY.format(out=tmp / "runs") + "[ensemble]\nenabled = false\n")
    ran = run_cli("study", str(file), "--workers", "2", cwd=tmp, timeout=400)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return file


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(out=tmp_path / "runs"))
    return path


@pytest.fixture
def tiny_cfg(tiny_file: Path) -> StudyConfig:
    return load_study(tiny_file)


@contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """A real small disk: a tmpfs of `size` bytes mounted at `folder` (made if missing), so that
    the free space workbench reads is the kernel's answer; unmounted at the end. Mounting needs
    root, as CI has: elsewhere the test fails saying so (not a skip: CI must run it)."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(
            f"cannot mount a {size}-byte tmpfs at {folder}: {done.stderr.strip()}; the disk-space "
            f"tests need root (CI runs as root)"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True, timeout=60)


def wait_held(go: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> int:
    """Wait until the worker `proc`, started with WORKBENCH_TEST_HOLD = "<run>/<fold>:<go>",
    waits at its hold (workbench.runtime.hold_point): it wrote <go>.held, and stays there until
    <go> exists. Returns the pid it wrote; fails with the log's tail if `proc` ends first."""
    held, end = go.with_name(go.name + ".held"), time.monotonic() + timeout
    while not held.exists():
        if proc.poll() is not None or time.monotonic() > end:
            pytest.fail(f"the worker never reached its hold:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return int(held.read_text())


# --- real servers on loopback: PostgreSQL, MLflow -------------------------------------------------

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Callable[[str], str]]:
    """A private PostgreSQL server (trust auth on loopback, a temp folder, stopped at the end);
    yields `database(name)`, which creates a database and returns its URL."""
    if not PG_BINS:  # a failure, not a skip: CI must not pass without testing PostgreSQL
        pytest.fail(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: install Debian's "
            "`postgresql` package (`make system-deps` does; `make test` runs it)"
        )
    bin_ = PG_BINS[-1].parent
    root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"

    def pg(*argv: object) -> None:
        cmd = [*as_pg, *map(str, argv)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            pytest.fail(f"{Path(str(argv[0])).name} failed: {done.stdout}{done.stderr}")

    def database(name: str) -> str:
        pg(bin_ / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"  # as the README spells it

    started = False
    try:
        pg(bin_ / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = True
        pg(bin_ / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w", "start")
        yield database
    finally:
        if started:
            subprocess.run(
                [*as_pg, str(bin_ / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll `url` until it answers (90 s at most); fail with the log's tail if `proc` ends."""
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextmanager
def mlflow_server(folder: Path, *args: str, backend: str | None = None) -> Iterator[str]:
    """`mlflow server` on a free loopback port, its store (SQLite unless `backend`) and log in
    `folder`, extra `args` (e.g. --serve-artifacts); yields its URL once /health answers (~15 s
    here) and stops it, with its worker processes, at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", "1"]
    argv += ["--backend-store-uri", backend or f"sqlite:///{folder / 'mlflow.db'}", *args]
    with log.open("w") as sink:  # the server holds its own copy of the file descriptor
        server = subprocess.Popen(
            argv,
            cwd=folder,
            env={**CLI_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn runs in a child process
        )
    api = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{api}/health", server, log, "mlflow server")
        yield api
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --- the HTML report, read as a reader sees it ----------------------------------------------------


class Tables(HTMLParser):
    """Every <table id=...> as rows of (cell text, cell attributes); every <h2>/<h3> text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self.headings: list[str] = []
        self.rows_attrs: dict[str, list[dict]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table], self.rows_attrs[self._table] = [], []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            self.rows_attrs[self._table].append(a)
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
            self.tables[self._table][-1].append(("", a))
        elif tag in ("h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            row = self.tables[self._table][-1]
            row[-1] = (" ".join("".join(self._cell).split()), row[-1][1])
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag in ("h2", "h3") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None

    def handle_data(self, data: str) -> None:
        for buf in (self._cell, self._heading):
            if buf is not None:
                buf.append(data)


def synthetic_result(out: Path, methods: tuple[str, ...] = ("soft_voting",)) -> Any:
    """A real EnsembleResult of the ensemble stage on 3 synthetic members (random Dirichlet
    probabilities, 3 classes, 60 OOF and 30 test rows), stored under `out`; no training. The
    ensemble package is imported here, not with this module: forked-worker tests check that
    scikit-learn stays out of a search process."""
    import numpy as np

    from workbench.config import EnsembleConfig
    from workbench.ensemble.members import Member, MemberSpec
    from workbench.ensemble.stage import HeldOut, run_ensemble
    from workbench.results import TestProbas
    from workbench.store import RunStore

    rng = np.random.default_rng(0)
    y, y_test = rng.integers(0, 3, 60), rng.integers(0, 3, 30)
    members = [
        Member(MemberSpec(f"mlp/trial-{i}", "mlp", i, "trial", 0.5, out), oof, ())
        for i, oof in enumerate(rng.dirichlet(np.ones(3), size=(3, 60)))
    ]
    tests = rng.dirichlet(np.ones(3), size=(3, 30))
    return run_ensemble(
        members,
        y,
        HeldOut(y_test, ["0", "1", "2"], "split"),
        EnsembleConfig(methods=methods, bootstrap=100),
        RunStore(out),
        0,
        lambda best: TestProbas(tests, tests[best][None]),
        folds=3,
    )
