"""Files written atomically (temp file in the same folder, then rename) and read with clear errors.

A crash or a full disk mid-write leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import hashlib
import os
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
