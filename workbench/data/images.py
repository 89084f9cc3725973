"""A dataset as one uint8 pixel array, and `Rows`: the index view that folds and batches hold.

`ImageData.pixels` is (N, C, H, W) uint8, memory-mapped read-only from the image store
(workbench/data/imagestore.py), so every worker process shares one copy in the page cache.
Nothing downstream copies it whole: a fold, a member's test rows or a batch is an index array,
and a batch is gathered by index and turned into float in [0, 1] (pixels / scale) on the
training device. The float32 copies this replaces cost 4 bytes a pixel per copy: 737 MB for
CIFAR-10, made again per model and per fold in every worker.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workbench.errors import DataError

_STATS_VALUES = 1 << 21  # float32 values per step of channel_stats: 8 MB, whatever the size


@dataclass(frozen=True, eq=False)  # eq=False: tensors/arrays have no single truth value
class ImageData:
    pixels: torch.Tensor  # (N, C, H, W) uint8 (float only when a test builds one by hand)
    y: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: tuple[str, ...]  # class names, index = label
    source: str  # human description, e.g. "idx:/data/mnist (10000 images)"
    source_test: np.ndarray | None = None  # row indices of the source's own test split, if any
    scale: float = 255.0  # the pixel value of full intensity: images are pixels / scale
    preprocess: dict[str, Any] = field(default_factory=dict)  # how files became pixels
    skipped: tuple[str, ...] = ()  # files left out (data.on_bad_file = "skip"), with the reason
    fingerprint: str = ""  # sha256 of pixels, labels and classes (12 hex); "" = compute on use
    pages: Pages | None = None  # the store's memory map under `pixels`; None in memory
    names: tuple[str, ...] = ()  # each row's file as its source names it; () for array sources
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a table's other columns

    def __post_init__(self) -> None:
        x, y = self.pixels, self.y
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{self.source}: images must be (N, C, H, W) with N labels, but got pixels "
                f"{tuple(x.shape)} and labels {tuple(y.shape)}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise DataError(
                f"{self.source}: labels must lie in [0, {len(self.classes)}) for classes "
                f"{list(self.classes)}, but got labels {int(y.min())}..{int(y.max())}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.pixels.shape[1:]
        return (c, h, w)

    def rows(self, index: np.ndarray | torch.Tensor | None = None) -> Rows:
        """The rows `index` (default: all) as a view: nothing is copied until a batch is drawn."""
        idx = torch.arange(len(self.y)) if index is None else torch.as_tensor(index)
        return Rows(self.pixels, self.y, idx.long(), self.scale, self.pages)

    def images(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Float32 images in [0, 1] of the rows `index`: a copy, so only for a few rows."""
        rows = self.rows(index)
        return rows.batch(torch.arange(len(rows)))


@dataclass(frozen=True, eq=False)
class Rows:
    """Some rows of a pixel array: a fold's training rows, its validation rows, the test rows."""

    pixels: torch.Tensor  # (N, C, H, W) the whole array, uint8 or float
    y: torch.Tensor  # (N,) labels of the whole array
    index: torch.Tensor  # (n,) int64: which rows of `pixels` these are
    scale: float = 255.0  # float images = pixels / scale
    pages: Pages | None = None  # the memory map under `pixels`, when it is a store's

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> Rows:
        """Every row of in-memory tensors; float x is taken as images in [0, 1] already."""
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        return cls(x, y, torch.arange(len(x)), scale)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor:
        return self.y[self.index]

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.pixels.shape[1:]
        return (c, h, w)

    def subset(self, positions: np.ndarray | torch.Tensor) -> Rows:
        """The rows at `positions` of this view (e.g. a fold inside the training rows)."""
        index = self.index[torch.as_tensor(positions).long()]
        return Rows(self.pixels, self.y, index, self.scale, self.pages)

    def to(self, device: torch.device | str) -> Rows:
        """The same rows over a copy of the whole pixel array on `device` (a GPU it fits on)."""
        return Rows(self.pixels.to(device), self.y, self.index, self.scale)

    def batch(self, positions: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float32 (B, C, H, W) in [0, 1] on `device`: gathered as uint8, converted there."""
        raw = self.pixels[self.index[positions.cpu()].to(self.pixels.device)]
        on_cpu = raw.device.type == "cpu"
        if on_cpu and raw.dtype == torch.uint8 and torch.device(device).type == "cuda":
            raw = raw.pin_memory().to(device, non_blocking=True)  # a quarter of float's bytes
        out = raw.to(device=device, dtype=torch.float32)
        return out.div_(self.scale) if self.scale != 1.0 else out

    def chunks(self, size: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """Every row in order, `size` at a time, as float batches (inference, statistics); each
        chunk's pages of a store are let go once it is gathered (`Pages.release`)."""
        for i in range(0, len(self), size):
            positions = torch.arange(i, min(i + size, len(self)))
            batch = self.batch(positions, device)
            if self.pages is not None:
                self.pages.release(self.index[positions])
            yield batch

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of the images over (rows, H, W), in float64."""
        c, h, w = self.shape
        total, squares = np.zeros(c), np.zeros(c)
        for xb in self.chunks(max(1, _STATS_VALUES // (c * h * w))):
            total += xb.sum(dim=(0, 2, 3), dtype=torch.float64).numpy()
            squares += xb.square().sum(dim=(0, 2, 3), dtype=torch.float64).numpy()
        count = max(len(self) * h * w, 1)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        return [float(m) for m in mean], [float(s) for s in std]


class Pages:
    """The memory map of a store's pixel file: `release(rows)` unmaps the pages of those rows.

    A pass over some rows maps far more than they hold: each page fault maps the 16 pages
    around it (the kernel's fault-around, 64 KB), so reading the 20 % test rows, scattered
    through a store, maps all of it (146 MB of proportional set size for 50,000 32x32 images,
    bench item 7; madvise(MADV_RANDOM) does not stop it). Released pages stay in the page cache
    and the next read maps them again. The map is copy-on-write and never written: MADV_DONTNEED
    would drop a written page's copy, and nothing here writes pixels."""

    def __init__(self, mapped: mmap.mmap, offset: int, row_bytes: int) -> None:
        self._map, self._offset, self._row = mapped, offset, row_bytes

    def release(self, rows: torch.Tensor) -> None:
        """Unmap the pages from the first to the last of `rows` (row numbers of the store)."""
        if not len(rows) or not hasattr(self._map, "madvise"):  # no madvise: Windows
            return
        lo = self._offset + int(rows.min()) * self._row
        hi = self._offset + (int(rows.max()) + 1) * self._row
        lo -= lo % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._map)) - lo)


def channel_stats(x: torch.Tensor | Rows) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std over (N, H, W), e.g. for input normalisation."""
    return (x if isinstance(x, Rows) else Rows.of(x, torch.zeros(len(x)))).channel_stats()


def fingerprint_of(pixels: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> str:
    """A short sha256 (12 hex chars) of the pixels, labels, shape and class names."""
    h = hashlib.sha256()
    h.update(repr((tuple(pixels.shape), tuple(classes))).encode())
    step = max(1, (1 << 26) // max(int(np.prod(pixels.shape[1:])), 1))  # 64 MB a step
    for i in range(0, len(pixels), step):
        h.update(np.ascontiguousarray(pixels[i : i + step]).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()[:12]


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Decoded:
    """What a source reader returns, before the image store writes it."""

    pixels: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64 in [0, len(classes))
    classes: tuple[str, ...]  # class names, index = label
    source: str  # human description, e.g. "idx:/data/mnist (10000 images)"
    source_test: np.ndarray | None = None  # row indices of the source's own test split, if any
    scale: float = 255.0  # the pixel value of full intensity
    preprocess: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # "path: reason" of files left out
    names: tuple[str, ...] = ()  # each row's file as its source names it; () for array sources
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a table's other columns
