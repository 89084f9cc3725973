"""The data sources, read into one uint8 array: digits, IDX, torchvision datasets, folders, tables.

`Source.read` returns a `Decoded`: pixels (N, C, H, W) uint8, labels (N,) int64 class indices.
The image store (imagestore.py) writes it once and every process maps it; `Source.files` are
what its key hashes, so a changed source is read again. Every failure raises `DataError` naming
the file or key, the value and what is valid.
"""

from __future__ import annotations

import difflib
import gzip
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.config import DataConfig
from workbench.data import photos
from workbench.data.folders import list_folder
from workbench.data.images import Decoded
from workbench.data.table import KINDS, list_table
from workbench.errors import DataError


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from, and the files whose size and time say it is unchanged."""

    cfg: DataConfig
    root: Path | None  # None for the embedded digits; a table's file for data.source = "table"
    files: tuple[Path, ...]  # the files read (a table's: its image files)
    listing: photos.Listing | None = None  # image folders and tables: the files, their classes

    def read(self, scratch: Path, progress: Callable[[int], None] | None = None) -> Decoded:
        """Decode the whole source; `scratch` is a folder for the photo sources' array."""
        cfg, root = self.cfg, self.root
        if root is None:
            return _load_digits()
        if self.listing is not None:
            return photos.read_listing(cfg, self.listing, scratch, progress)
        if cfg.source == "idx":
            return _load_idx(root)
        return _load_torchvision(root, cfg.dataset)


def find_source(cfg: DataConfig, path: str | None = None) -> Source:
    """The source named by `cfg`; `path` (the CLI's --data) overrides `cfg.path`."""
    if cfg.source == "digits":
        return Source(cfg, None, ())
    root = _existing_path(cfg, path or cfg.path)
    if cfg.source == "idx":
        return Source(cfg, root, tuple(f for _, *pair in _idx_sets(root) for f in pair))
    if cfg.source == "torchvision":
        return Source(cfg, root, _torchvision_files(root, cfg.dataset))
    listing = list_table(cfg, root) if cfg.source == "table" else list_folder(root, cfg.val)
    return Source(cfg, root, listing.files, listing)


def _existing_path(cfg: DataConfig, path: str | None) -> Path:
    if not path:
        raise DataError(
            f"data.path is not set: pass --data PATH or set data.path in the study file "
            f"(data.source = {cfg.source!r} reads {_WANTS[cfg.source]})"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data.path {str(p)!r} does not exist (data.source = {cfg.source!r} reads "
            f"{_WANTS[cfg.source]})"
        )
    if cfg.source in _FOLDERS and not p.is_dir():
        raise DataError(
            f"data.path {str(p)!r} is a file, but data.source = {cfg.source!r} reads "
            f"{_WANTS[cfg.source]}; point data.path (or --data) at that folder"
        )
    if cfg.source == "table" and not p.is_file():
        raise DataError(
            f"data.path {str(p)!r} is a folder, but data.source = 'table' reads "
            f"{_WANTS['table']}; point data.path (or --data) at the table, or use "
            f"data.source = 'folder' for a folder of class folders"
        )
    return p


_FOLDERS = ("torchvision", "folder")  # sources whose path must be a folder (idx: file or folder)
_WANTS = {
    "idx": "a folder of MNIST-style *-images-idx3-ubyte[.gz] / *-labels-idx1-ubyte[.gz] files",
    "torchvision": "a torchvision dataset root, the folder passed as `root=`",
    "folder": "a folder with one subfolder of images per class, or train/ and test/ of them",
    "table": f"a {' or '.join(KINDS)} file with a column of image paths and one of labels",
}


def _labels(y: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels within 0..9 keep classes "0".."9"; other label sets map sorted values to indices."""
    y = y.astype(np.int64)
    if len(y) == 0 or (y.min() >= 0 and y.max() <= 9):
        return y, tuple(str(i) for i in range(10))
    values, index = np.unique(y, return_inverse=True)
    return index.astype(np.int64), tuple(str(v) for v in values)


def _nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, C, H, W) -> contiguous (N, C, H, W)."""
    return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images)


# --- digits ------------------------------------------------------------------------------------


def _load_digits() -> Decoded:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _nchw(d.images.astype(np.uint8))  # values 0..16, kept exact: scale = 16
    y = d.target.astype(np.int64)
    return Decoded(x, y, tuple(str(i) for i in range(10)), f"digits ({len(y)} images)", scale=16.0)


# --- IDX files ---------------------------------------------------------------------------------

_IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?$")
_IDX_MAGIC = {"images": (2051, 3), "labels": (2049, 1)}  # magic number, number of dimensions


def _load_idx(path: Path) -> Decoded:
    sets = _idx_sets(path)
    parts = [(_read_idx(i, "images"), _read_idx(lab, "labels")) for _, i, lab in sets]
    for (_, i, lab), (xi, yi) in zip(sets, parts, strict=True):
        if len(xi) != len(yi):
            raise DataError(
                f"IDX image and label counts must agree, but {i} holds {len(xi)} images "
                f"and {lab} holds {len(yi)} labels"
            )
    if len({xi.shape[1:] for xi, _ in parts}) > 1:
        raise DataError(
            f"train and test images must have one size, but {sets[0][1]} holds "
            f"{parts[0][0].shape[1:]} images and {sets[1][1]} holds {parts[1][0].shape[1:]}"
        )
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test = np.arange(len(parts[0][1]), len(y), dtype=np.int64) if len(sets) == 2 else None
    yt, classes = _labels(y)
    return Decoded(_nchw(x), yt, classes, f"idx:{path} ({len(y)} images)", test)


def _idx_sets(path: Path) -> list[tuple[str, Path, Path]]:
    """[(prefix, images file, labels file)]: one set, or a train set then a t10k/test set."""
    candidates = [path] if path.is_file() else sorted(path.iterdir())
    sets: dict[str, tuple[Path, Path]] = {}
    for f in candidates:
        m = _IDX_IMAGES.match(f.name)
        if m is None or (m["prefix"] in sets and f.suffix == ".gz"):  # prefer the unzipped copy
            continue
        labels = [
            f.with_name(f"{m['prefix']}-labels{sep}idx1-ubyte{gz}")
            for gz in ("", ".gz")
            for sep in ("-", ".")
        ]
        found = [p for p in labels if p.is_file()]
        if not found:
            raise DataError(
                f"IDX images file {f} has no labels file beside it: expected {labels[0]}"
            )
        sets[m["prefix"]] = (f, found[0])
    if not sets:
        raise DataError(f"{path}: no IDX images file found; expected {_WANTS['idx']}")
    # the last word of the prefix: "train-" / "t10k-" (MNIST), "emnist-letters-test-" (EMNIST)
    role = {re.split(r"[-_.]", prefix)[-1]: prefix for prefix in sets}
    if len(sets) == 1:
        return [(k, *v) for k, v in sets.items()]
    test = role.get("t10k") or role.get("test")
    if len(sets) == 2 and "train" in role and test is not None:
        return [(p, *sets[p]) for p in (role["train"], test)]
    raise DataError(
        f"{path} holds {len(sets)} IDX image sets {sorted(sets)}; expected one set, or one "
        f"train-* and one t10k-*/test-* set. Point data.path at one images file instead."
    )


def idx_dims(root: Path) -> list[tuple[int, ...]]:
    """The sizes in the header of each IDX images file of `root`, (N, H, W) each: the first 16
    bytes of each read (decompressed), no pixels."""
    return [_idx_header(images) for _, images, _ in _idx_sets(root)]


def _idx_header(path: Path) -> tuple[int, ...]:
    magic, ndim = _IDX_MAGIC["images"]
    size = 4 + 4 * ndim  # bytes: magic + sizes
    try:
        with path.open("rb") as f:
            zipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if zipped else path.open("rb") as f:
            raw = f.read(size)
    except (OSError, EOFError):
        raw = b""
    if len(raw) < size or int.from_bytes(raw[:4], "big") != magic:
        _read_idx(path, "images")  # reads the file whole, and raises the error that says why
    return tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse one IDX file (gzip or plain) by hand: big-endian magic, then one uint32 per dim."""
    magic, ndim = _IDX_MAGIC[kind]
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"IDX file {path} cannot be read: {e}") from None
    header = 4 + 4 * ndim  # bytes: magic + sizes
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, header alone is {header}")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(
            f"IDX file {path} has magic number {got}, expected {magic} "
            f"(an idx{ndim}-ubyte {kind} file, uint8, {ndim} dimension(s))"
        )
    dims = [int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4)]
    want = header + int(np.prod(dims))
    if len(raw) != want:
        what = "is truncated" if len(raw) < want else "has trailing bytes"
        raise DataError(
            f"IDX file {path} {what}: header sizes {dims} need {want} bytes, found {len(raw)}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# --- torchvision -------------------------------------------------------------------------------

_TORCHVISION = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")


def _torchvision_class(name: str | None) -> type:
    if name is None:
        raise DataError(
            f"data.dataset is not set: data.source = 'torchvision' needs one of "
            f"{', '.join(_TORCHVISION)}"
        )
    if name not in _TORCHVISION:
        close = difflib.get_close_matches(str(name), _TORCHVISION, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(
            f"data.dataset = {name!r} is not a supported torchvision dataset; {hint}"
            f"supported: {', '.join(_TORCHVISION)}"
        )
    from torchvision import datasets

    return getattr(datasets, name)  # type: ignore[no-any-return]


def _torchvision_files(root: Path, name: str | None) -> tuple[Path, ...]:
    """The files of dataset `name` under `root` (CIFAR's batch folder, MNIST's raw folder)."""
    cls = _torchvision_class(name)
    folder = root / getattr(cls, "base_folder", cls.__name__)
    return tuple(f for f in sorted(folder.rglob("*")) if f.is_file())


def _load_torchvision(root: Path, name: str | None) -> Decoded:
    cls = _torchvision_class(name)
    try:
        train, test = (cls(str(root), train=t, download=False) for t in (True, False))
    except RuntimeError as e:
        raise DataError(
            f"torchvision {name} not found under data.path {root} ({e}); expected the files "
            f"{', '.join(_expected_files(cls, root))}. Download them on a machine with internet "
            f"access (torchvision.datasets.{name}(root, download=True)) and copy the root here."
        ) from None
    images, targets = [], []
    for ds in (train, test):
        a = np.asarray(ds.data)  # MNIST family: (N, H, W) tensor; CIFAR: (N, H, W, 3) array
        images.append(a if a.ndim == 3 else a.transpose(0, 3, 1, 2))
        targets.append(np.asarray(ds.targets, dtype=np.int64))
    y = np.concatenate(targets)
    test_rows = np.arange(len(targets[0]), len(y), dtype=np.int64)
    return Decoded(
        _nchw(np.concatenate(images)),
        y,
        tuple(str(c) for c in train.classes),
        f"torchvision:{name}:{root} ({len(y)} images)",
        test_rows,
    )


def _expected_files(cls: type, root: Path) -> list[str]:
    if hasattr(cls, "base_folder"):  # CIFAR: pickled batches in one folder
        names = [n for n, _ in cls.train_list + cls.test_list]  # type: ignore[attr-defined]
        return [str(root / cls.base_folder / n) for n in names]
    resources = cls.resources  # type: ignore[attr-defined]  # MNIST family: unzipped raw IDX
    raw = root / cls.__name__ / "raw"
    return [str(raw / os.path.splitext(os.path.basename(url))[0]) for url, _ in resources]
