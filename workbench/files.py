"""Files written atomically (temp file in the same folder, then rename) and read with clear errors.

A crash or a full disk mid-write leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import numpy as np

from workbench.errors import CheckpointError, WorkbenchError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(fileobj)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def load_npz(path: str | Path, what: str = "file") -> dict[str, np.ndarray]:
    """Load every array of an .npz; a missing, truncated or corrupt file raises CheckpointError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({e})") from None


def file_digest(path: str | Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


# bytes left free beyond what a step writes: the Optuna SQLite file and its journal, the logs and
# MLflow's local store grow by some kB a trial, and a disk filled to the last byte fails them all
DISK_RESERVE = 16 * 2**20


def free_space(path: str | Path) -> int:
    """Bytes free to this user on the disk that holds `path`, or would hold it once it is
    created (the disk of its nearest existing ancestor). The one place workbench asks."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def size_text(n: float) -> str:
    """Bytes as a person reads them, in decimal units: 950 B, 9.4 MB, 302.0 GB."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if round(n, 1) < 1000:  # 999,999 B is 1.0 MB, not 1000.0 kB
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


@contextmanager
def undone_on_error(root: Path) -> Iterator[None]:
    """On a WorkbenchError (the study cannot run as configured), remove what the block created
    under `root` (files, then the folders it made), so a check that fails after a first write
    leaves the folder as it was. Other exceptions (Ctrl-C) keep what was written."""
    before = set(root.rglob("*")) if root.exists() else set()
    root_existed = root.exists()
    try:
        yield
    except WorkbenchError:
        made = set(root.rglob("*")) - before if root.exists() else set()
        for p in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first
            if p.is_dir() and not p.is_symlink():
                with suppress(OSError):
                    p.rmdir()
            else:
                p.unlink(missing_ok=True)
        if not root_existed:
            for p in [root, *root.parents]:
                if p.exists() and not any(p.iterdir()):
                    p.rmdir()
                else:
                    break
        raise
