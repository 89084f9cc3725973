"""The image store: each dataset decoded once into one uint8 file that every process maps.

The parent (`workbench study`) reads the source once, on every core for photo folders, and writes
`<key>.npy` (N, C, H, W) uint8 and `<key>.json` (labels, classes, fingerprint, preprocessing)
into the study's `images/` folder, each atomically, the JSON last: it marks the store complete.
The key hashes the source's files (path, size, modification time) and the decoding policy, so
the next run, or a worker, finds the store while the source is unchanged and maps it read-only
(copy-on-write): no decoding, no copy, one set of pages in the page cache for all processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.config import DataConfig
from workbench.data.images import Decoded, ImageData, Pages, fingerprint_of
from workbench.data.photos import Policy
from workbench.data.sources import Source, find_source
from workbench.data.space import check_room
from workbench.files import atomic_write

_VERSION = 2  # of the store's format and decoding: a change makes every store be rebuilt
_PROGRESS_MIN = 256  # files: smaller sources decode without a progress bar


def load_data(cfg: DataConfig, path: str | None = None, folder: Path | None = None) -> ImageData:
    """The dataset named by `cfg` (`path`: the CLI's --data), from the store in `folder`.

    Builds the store when it is missing or the source changed, once its size is known to fit on
    the disk and in memory (workbench/data/space.py). With `folder = None` the data are
    decoded into memory and nothing is kept (tests, benchmarks)."""
    source = find_source(cfg, path)
    key = source_key(source)
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            check_room(source, Path(tmp), in_memory=True)
            data = _build(source, key, Path(tmp))
            return _in_memory(data)
    found = open_store(folder, key)
    if found is not None:
        return found
    check_room(source, folder)  # before decoding: a store that cannot fit is one line
    return _build(source, key, folder)


def source_key(source: Source) -> str:
    """16 hex chars of sha256 over what decides the pixels: files, sizes, times, the policy."""
    cfg = source.cfg
    stats = []
    table = (source.root,) if source.root is not None and source.root.is_file() else ()
    for f in (*table, *source.files):
        st = f.stat() if f.exists() else None  # a table may name a missing file: skipped or not
        stats.append((str(f.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1))
    what = {
        "version": _VERSION,
        "source": cfg.source,
        "dataset": cfg.dataset,
        "policy": Policy(cfg.size, cfg.resize_policy).as_dict(),
        "on_bad_file": cfg.on_bad_file,
        "table": [cfg.columns.path, cfg.columns.label, cfg.suffix],
        "val": cfg.val,
        "files": stats,
    }
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def open_store(folder: Path, key: str) -> ImageData | None:
    """The complete store `key` in `folder`, mapped copy-on-write; None if absent or damaged."""
    meta_path, npy = folder / f"{key}.json", folder / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        pixels, pages = _map(npy)
    except (OSError, ValueError):
        return None
    if list(pixels.shape) != meta["shape"]:
        return None
    return ImageData(
        torch.from_numpy(pixels),
        torch.tensor(meta["labels"], dtype=torch.int64),
        tuple(meta["classes"]),
        meta["source"],
        None if meta["source_test"] is None else np.array(meta["source_test"], np.int64),
        meta["scale"],
        meta["preprocess"],
        tuple(meta["skipped"]),
        meta["fingerprint"],
        pages,
        tuple(meta["names"]),
        {k: tuple(v) for k, v in meta["columns"].items()},
    )


def _map(npy: Path) -> tuple[np.ndarray, Pages]:
    """The uint8 array in `npy`, mapped copy-on-write (writable, so torch takes it as is, and
    shared until written: nothing writes it), with the map for `Pages.release`."""
    with npy.open("rb") as f:
        fmt = np.lib.format
        header = (
            fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        )
        shape, fortran, dtype = header(f)
        if dtype != np.uint8 or fortran:
            raise ValueError(f"{npy} holds {dtype} (fortran order: {fortran}), not C-order uint8")
        offset = f.tell()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    count = int(np.prod(shape))
    pixels = np.frombuffer(mapped, np.uint8, count, offset).reshape(shape)
    return pixels, Pages(mapped, offset, count // max(shape[0], 1))


def _build(source: Source, key: str, folder: Path) -> ImageData:
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=f".build-{key}-"))
    try:
        decoded = _read(source, scratch)
        meta = _meta(decoded)
        npy = folder / f"{key}.npy"
        atomic_write(npy, lambda f: np.lib.format.write_array(f, decoded.pixels))
        atomic_write(folder / f"{key}.json", lambda f: f.write(json.dumps(meta).encode()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for old in folder.glob("*.json"):  # a store of the source before it changed
        if old.stem != key:
            old.unlink(missing_ok=True)
            old.with_suffix(".npy").unlink(missing_ok=True)
    opened = open_store(folder, key)
    assert opened is not None, f"the image store {folder / key} was just written"
    return opened


def _read(source: Source, scratch: Path) -> Decoded:
    if len(source.files) < _PROGRESS_MIN or source.listing is None:
        return source.read(scratch)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"decoding {len(source.files)} images", total=len(source.files))
        advance: Callable[[int], None] = lambda n: bar.advance(task, n)  # noqa: E731
        return source.read(scratch, advance)


def _meta(d: Decoded) -> dict[str, Any]:
    return {
        "version": _VERSION,
        "shape": list(d.pixels.shape),
        "labels": d.labels.tolist(),
        "classes": list(d.classes),
        "source": d.source,
        "source_test": None if d.source_test is None else d.source_test.tolist(),
        "scale": d.scale,
        "preprocess": {**d.preprocess, "channels": int(d.pixels.shape[1]), "scale": d.scale},
        "skipped": list(d.skipped),
        "names": list(d.names),
        "columns": {k: list(v) for k, v in d.columns.items()},
        "fingerprint": fingerprint_of(d.pixels, d.labels, d.classes),
    }


def _in_memory(data: ImageData) -> ImageData:
    """A store's data copied into memory, so that its files may be deleted."""
    return dataclasses.replace(data, pixels=data.pixels.clone(), pages=None)
