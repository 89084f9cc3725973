"""Preflight: everything outside the study file, checked once before any file is written or any
worker forked. Each check raises one WorkbenchError naming the key (or environment variable),
its value and what would do; the CLI prints it as one line and exits 2.

The checks read and connect; they create nothing: no folder, no SQLite file, no table, no
MLflow experiment. The one exception is a probe: an empty folder made in a folder that must
take new files, and removed at once (only trying tells: root passes every permission test, a
read-only mount or /proc refuses anyway). Which checks a command runs is `CHECKS`, always in
this order: the study file's device, the output folder, the storage and tracking, the data
(the report writes no trial, so it needs no device; `study` creates the studies the others
need). The image store's size is checked against the disk's free space where the store would
be built (workbench/data/space.py), before any image is decoded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from workbench import search, tracking
from workbench.cli.stages import REPORTS
from workbench.config import StudyConfig
from workbench.data.sources import find_source
from workbench.errors import ConfigError, DataError, StorageError
from workbench.runtime import gpu_count

Command = Literal["study", "worker", "ensemble", "report", "check"]
Check = Literal["device", "output", "storage", "studies", "tracking", "data"]
CHECKS: dict[Command, tuple[Check, ...]] = {
    "study": ("device", "output", "storage", "tracking", "data"),
    "check": ("device", "output", "storage", "tracking", "data"),
    "worker": ("device", "output", "storage", "studies", "tracking", "data"),
    "ensemble": ("output", "storage", "studies", "tracking", "data"),
    "report": ("output", "storage", "studies", "tracking", "data"),
}
CONNECT_TIMEOUT_S = 3  # a database server that has not answered in this long is unreachable


def run_checks(cfg: StudyConfig, file: Path, data_path: str | None, command: Command) -> None:
    """The checks `command` needs, in order: the first failure raises."""
    for check in CHECKS[command]:
        if check == "device":
            check_device(cfg, file)
        elif check == "output":
            check_output(cfg, file, report=command in ("study", "report", "check"))
        elif check == "storage":
            check_storage(cfg, file)
        elif check == "studies":
            check_studies(cfg, file)
        elif check == "tracking":
            check_tracking(cfg, file)
        else:
            check_data(cfg, data_path)


def check_device(cfg: StudyConfig, file: Path) -> None:
    """`device` names a device this machine has: 'cuda' (or 'cuda:N') needs N+1 visible CUDA
    devices, 'mps' Apple's Metal; 'auto' and 'cpu' always run."""
    name = cfg.device
    kind, _, index = str(name).partition(":")
    if kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"{file}: device = {name!r}, but MPS (Apple's Metal) is not available on this "
                f"machine; use device = 'auto' or 'cpu'"
            )
    elif kind == "cuda":
        gpus = gpu_count()
        if gpus == 0:
            hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = f" (CUDA_VISIBLE_DEVICES = {hidden!r})" if hidden is not None else ""
            raise ConfigError(
                f"{file}: device = {name!r}, but no CUDA device is visible on this machine"
                f"{why}; use device = 'auto' (a GPU where there is one) or 'cpu'"
            )
        if index and (not index.isdigit() or int(index) >= gpus):
            raise ConfigError(
                f"{file}: device = {name!r}, but this machine has {gpus} CUDA device(s): "
                f"cuda:0 to cuda:{gpus - 1}; use one of those, 'cuda' or 'auto'"
            )


def check_output(cfg: StudyConfig, file: Path, report: bool) -> None:
    """The study's output folder (and, for commands that write one, the reports folder) exists
    as a writable folder or can be created: its nearest existing ancestor is a writable folder."""
    why = _not_creatable(cfg.out)
    if why:
        raise ConfigError(
            f"{file}: output_dir = {cfg.output_dir!r}: the output folder {cfg.out} cannot be "
            f"created or written: {why}; set output_dir to a writable folder"
        )
    why = _not_creatable(REPORTS) if report else None
    if why:
        raise ConfigError(
            f"the report folder {REPORTS.absolute()} cannot be created or written: {why}; run "
            f"workbench from a folder where reports/ can be written"
        )


def check_storage(cfg: StudyConfig, file: Path) -> None:
    """The Optuna storage can be opened: a SQLite file that is (or can be) created, or a
    database server that accepts a connection within CONNECT_TIMEOUT_S."""
    url = search.storage_url(cfg)
    shown = search.shown_url(url)
    where = (
        f"search.storage in {file}"
        if cfg.search.storage
        else "WORKBENCH_STORAGE"
        if os.environ.get("WORKBENCH_STORAGE")
        else "the default, in the output folder"
    )
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise StorageError(
            f"the Optuna storage {shown!r} ({where}) is not a database URL; expected e.g. "
            f"sqlite:///path/optuna.db or postgresql://user:pass@host/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        why = _sqlite_problem(parsed.database)
        if why:
            raise StorageError(f"cannot open the Optuna storage {shown!r} ({where}): {why}")
        return
    try:
        _connect(parsed)
    except Exception as e:  # a refused connection, a bad password, a missing driver
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (pip install 'psycopg[binary]')" if isinstance(e, ImportError) else ""
        raise StorageError(
            f"cannot open the Optuna storage {shown!r} ({where}): {first}{hint}; check the "
            f"URL and that the database server runs"
        ) from None


def check_studies(cfg: StudyConfig, file: Path) -> None:
    """Every model's study exists: the stages after the search read them, and a worker joins
    them; `workbench study` creates them."""
    missing = search.missing_studies(cfg)
    if not missing:
        return
    url = search.shown_url(search.storage_url(cfg))
    default = not (cfg.search.storage or os.environ.get("WORKBENCH_STORAGE"))
    here = ""
    if default and not Path(cfg.output_dir).is_absolute():  # a worker started elsewhere?
        here = f" (output_dir {cfg.output_dir!r} is relative to this folder, {Path.cwd()})"
    others = f" (nor {', '.join(repr(m) for m in missing[1:])})" if len(missing) > 1 else ""
    raise StorageError(
        f"no study {missing[0]!r}{others} in {url}{here}; run `workbench study {file}` first"
    )


def check_tracking(cfg: StudyConfig, file: Path) -> None:
    """With tracking on: a local MLflow store (SQLite) that can be created, or a tracking
    server that answers (workbench.tracking asks it, with a short timeout)."""
    if not cfg.tracking.enabled:
        return
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        why = _sqlite_problem(make_url(uri).database)
        if why:
            where = f"{file}: tracking.uri" if cfg.tracking.uri else "the MLflow store"
            raise StorageError(f"{where} = {uri!r} cannot be used: {why}")
    tracking.check_server(cfg)


def check_data(cfg: StudyConfig, data_path: str | None) -> None:
    """The data source exists and every file of it is readable (data.path, or --data)."""
    source = find_source(cfg.data, data_path)  # a missing path or unreadable listing: DataError
    for path in (source.root, *source.files) if source.root else ():
        if not os.access(path, os.R_OK):
            raise DataError(
                f"data.path: {path} is not readable by this user (data.source = "
                f"{cfg.data.source!r}); fix its permissions or point --data elsewhere"
            )


def check_out_file(path: Path, option: str, suffixes: tuple[str, ...] = ()) -> None:
    """A file a command will write (`--out`, `--onnx`), checked before any work: named with one
    of `suffixes` (the formats it can write), not a folder, in a folder that can be written."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(
            f"{option} {path}: the name must end in {' or '.join(suffixes)} (the formats it "
            f"writes); got {path.suffix or 'no suffix'!r}"
        )
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file, in it or elsewhere")
    why = _not_creatable(path.parent)
    if why:
        raise ConfigError(f"{option} {path}: its folder cannot be created or written: {why}")


# --- helpers ---------------------------------------------------------------------------------


def _not_creatable(folder: Path) -> str | None:
    """Why `folder` cannot be created or written, without creating anything; None if it can."""
    path = folder.absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:  # not Windows
        return f"{existing} is on a read-only filesystem"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    try:  # root passes os.access everywhere; a read-only mount or /proc still refuses
        os.rmdir(tempfile.mkdtemp(prefix=".workbench-probe-", dir=existing))
    except OSError as e:
        return f"{existing} refuses new folders ({e.strerror})"
    return None


def _sqlite_problem(database: str | None) -> str | None:
    """Why a SQLite database file cannot be opened for writing; None if it can be."""
    if not database or database == ":memory:":
        return None
    path = Path(database)
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not writable by this user"
        return None
    return _not_creatable(path.parent)


def _connect(url: sqlalchemy.engine.URL) -> None:
    """Open one connection (CONNECT_TIMEOUT_S at most) and run SELECT 1; no table is made."""
    timeout = {"connect_timeout": CONNECT_TIMEOUT_S}
    args = timeout if url.get_backend_name() in ("postgresql", "mysql", "mariadb") else {}
    engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
