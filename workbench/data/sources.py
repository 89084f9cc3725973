"""Four data sources, each loaded whole into one tensor: digits, IDX files, torchvision, folders.

Every source returns an `ImageData`: x (N, C, H, W) float32 in [0, 1], y (N,) int64 class indices.
Holding the dataset as one tensor (as airbench does) keeps batching and augmentation on tensors,
with no DataLoader. Every failure raises `DataError` naming the file or key, the value and what
is valid.
"""

from __future__ import annotations

import difflib
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.config import DataConfig
from workbench.errors import DataError


@dataclass(frozen=True, eq=False)  # eq=False: tensors/arrays have no single truth value
class ImageData:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: tuple[str, ...]  # class names, index = label
    source: str  # human description, e.g. "idx:/data/mnist (10000 images)"
    source_test: np.ndarray | None = None  # row indices of the source's own test split, if any

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(
                f"{self.source}: images must be (N, C, H, W) with N labels, but got x "
                f"{tuple(self.x.shape)} and y {tuple(self.y.shape)}"
            )
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DataError(
                f"{self.source}: labels must lie in [0, {len(self.classes)}) for classes "
                f"{list(self.classes)}, but got labels {int(self.y.min())}..{int(self.y.max())}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (c, h, w)


def load_data(cfg: DataConfig, path: str | None = None) -> ImageData:
    """Load the whole dataset named by `cfg`; `path` (the CLI's --data) overrides `cfg.path`."""
    if cfg.source == "digits":
        return _load_digits()
    root = _existing_path(cfg, path or cfg.path)
    if cfg.source == "idx":
        return _load_idx(root)
    if cfg.source == "torchvision":
        return _load_torchvision(root, cfg.dataset)
    return _load_folder(root, cfg.resize)


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
    return p


_WANTS = {
    "idx": "a folder of MNIST-style *-images-idx3-ubyte[.gz] / *-labels-idx1-ubyte[.gz] files",
    "torchvision": "a torchvision dataset root, the folder passed as `root=`",
    "folder": "a folder with one subfolder of images per class",
}


def _from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    return t.float().div_(255.0)


def _labels(y: np.ndarray) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Labels within 0..9 keep classes "0".."9"; other label sets map sorted values to indices."""
    y = y.astype(np.int64)
    if len(y) == 0 or (y.min() >= 0 and y.max() <= 9):
        return torch.from_numpy(y), tuple(str(i) for i in range(10))
    values, index = np.unique(y, return_inverse=True)
    return torch.from_numpy(index.astype(np.int64)), tuple(str(v) for v in values)


# --- digits ------------------------------------------------------------------------------------


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    return ImageData(x, y, tuple(str(i) for i in range(10)), f"digits ({len(y)} images)")


# --- IDX files ---------------------------------------------------------------------------------

_IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?$")
_IDX_MAGIC = {"images": (2051, 3), "labels": (2049, 1)}  # magic number, number of dimensions


def _load_idx(path: Path) -> ImageData:
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
    return ImageData(_from_uint8(x), yt, classes, f"idx:{path} ({len(y)} images)", test)


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


def _load_torchvision(root: Path, name: str | None) -> ImageData:
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

    cls = getattr(datasets, name)
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
    return ImageData(
        _from_uint8(np.concatenate(images)),
        torch.from_numpy(y),
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


# --- image folders -----------------------------------------------------------------------------

_GRAY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")  # one channel; others -> RGB
_WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit pixels: divide by 65535, not 255


def _load_folder(root: Path, resize: tuple[int, int] | None) -> ImageData:
    """One subfolder per class (sorted names = classes), like torchvision's ImageFolder."""
    from PIL import Image

    files = _class_files(root, set(Image.registered_extensions()))
    headers = {f: _open(f) for fs in files.values() for f in fs}  # path -> (mode, (w, h))
    gray = all(mode in _GRAY for mode, _ in headers.values())
    if resize is None:
        sizes = {size: f for f, (_, size) in headers.items()}
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise DataError(
                f"images in {root} differ in size: {f1} is {s1[1]}x{s1[0]} and {f2} is "
                f"{s2[1]}x{s2[0]} (height x width); set `data.resize = [h, w]` in the study file "
                f"to resize every image to one size"
            )
    x = torch.from_numpy(np.stack([_pixels(f, gray, resize) for f in headers]))
    y = torch.tensor([k for k, fs in enumerate(files.values()) for _ in fs], dtype=torch.int64)
    return ImageData(x, y, tuple(files), f"folder:{root} ({len(y)} images)")


def _class_files(root: Path, extensions: set[str]) -> dict[str, list[Path]]:
    """{class name: sorted image files below its folder}; hidden files and other types skipped."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(folders) < 2:
        raise DataError(
            f"image folder {root} has {len(folders)} class subfolder(s) {[d.name for d in folders]}"
            f"; a classifier needs >= 2 (one subfolder of images per class)"
        )
    files = {}
    for d in folders:
        fs = sorted(
            f
            for f in d.rglob("*")
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
        )
        if not fs:
            raise DataError(f"class folder {d} holds no image files; add images or remove it")
        files[d.name] = fs
    return files


def _open(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"image file {path} cannot be read: {e}") from None


def _pixels(path: Path, gray: bool, resize: tuple[int, int] | None) -> np.ndarray:
    """Decode one image to float32 (C, H, W) in [0, 1]; `resize` is (height, width), bilinear."""
    from PIL import Image

    try:
        with Image.open(path) as f:
            im: Image.Image
            if gray and f.mode in _WIDE:  # 16-bit: float image in [0, 1] before any resize
                im = Image.fromarray(np.asarray(f.convert("I"), np.float32) / 65535.0)
            else:
                im = f.convert("L" if gray else "RGB")
            if resize is not None:
                im = im.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
            a = np.asarray(im, np.float32)
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise DataError(f"image file {path} cannot be read: {e}") from None
    if im.mode != "F":
        a = a / 255.0  # 8-bit
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# --- summaries ---------------------------------------------------------------------------------


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std over (N, H, W), e.g. for input normalisation."""
    stats = [torch.std_mean(x[:, c], correction=0) for c in range(x.shape[1])]
    return [float(m) for _, m in stats], [float(s) for s, _ in stats]
