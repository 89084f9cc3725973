"""Size before work: what the image store will take, checked before a single image is decoded.

The store is (rows, channels, height, width) uint8, one byte a pixel a channel, so its size is
known from the source's listing and headers. Building it needs, on the disk of the output folder:
- a folder of photos: a scratch copy decoded as RGB, (rows, 3, H, W), beside the store it
  becomes (3 channels, or 1 when every photo is grey), so up to twice the store at once;
- IDX files and torchvision datasets: the store alone; they are decoded in memory first, which
  needs the machine's available memory too (`MEMORY_COPIES`).
Training maps the store (workbench/data/images.py): on the CPU no copy of it is held, and the
GPU copy is made only where it fits (workbench/cv.py). Each check raises one SpaceError with the
size, the space free and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from workbench.data import photos
from workbench.data.sources import Source, idx_dims
from workbench.errors import DataError, SpaceError
from workbench.files import DISK_RESERVE, free_space, size_text
from workbench.runtime import available_memory

DIGITS = (1797, 1, 8, 8)  # scikit-learn's digits: 1,797 images of 8x8, one channel
# copies of the store held in memory while decoding: idx, the files read whole, then the array
# made from them; torchvision, its datasets' arrays, their concatenation, the channels-first copy
MEMORY_COPIES = {"digits": 2, "idx": 2, "torchvision": 3, "folder": 0, "table": 0}


@dataclass(frozen=True)
class StoreSize:
    """The image store a source becomes: its shape where the headers tell it, and its bytes."""

    shape: tuple[int, int, int, int] | None  # (rows, channels, height, width); None: unknown
    bytes: int  # the store's file: rows x channels x height x width (uint8)
    scratch: int = 0  # bytes decoded beside it while it is built (a folder's RGB copy)
    memory: int = 0  # bytes held in memory while it is built

    def __str__(self) -> str:  # "1500 images x 3 channels x 8192 x 8192 pixels, one byte each"
        if self.shape is None:
            return "about the size of the source's files"
        n, c, h, w = self.shape
        return f"{n} images x {c} channel(s) x {h} x {w} pixels, one byte each"


def store_size(source: Source) -> StoreSize:
    """The store `source` becomes, from its listing and file headers only (nothing decoded)."""
    kind = source.cfg.source
    if source.root is None:
        shape: tuple[int, int, int, int] | None = DIGITS
    elif kind == "idx":
        dims = idx_dims(source.root)  # (N, H, W) of each images file
        shape = (sum(d[0] for d in dims), 1, dims[0][1], dims[0][2])
    elif source.listing is not None:  # photos: folders and tables
        shape = (len(source.files), 3, *_photo_size(source))
    else:  # torchvision: raw uint8 pixels in its files (MNIST's IDX, CIFAR's pickled batches)
        shape = None
    size = math.prod(shape) if shape else sum(f.stat().st_size for f in source.files)
    scratch = size if source.listing is not None else 0  # the scratch is RGB, as the bound above
    return StoreSize(shape, size, scratch, size * MEMORY_COPIES[kind])


def check_room(source: Source, folder: Path, in_memory: bool = False) -> StoreSize:
    """The store of `source` fits on the disk of `folder` (scratch included, DISK_RESERVE left
    free) and its decoding in memory; `in_memory`: the store is then copied into memory too."""
    size = store_size(source)
    disk, free = size.bytes + size.scratch, free_space(folder)
    if disk + DISK_RESERVE > free:
        what = f"data.path {source.root}" if source.root else "the digits"
        scratch = f" and needs {size_text(disk)} while its photos are decoded"
        raise SpaceError(
            f"the image store of {what} is {size_text(size.bytes)} ({size})"
            f"{scratch if size.scratch else ''}, but the disk of {folder} has "
            f"{size_text(free)} free, and workbench leaves {size_text(DISK_RESERVE)} of a disk "
            f"free; {_fix(source)}, or set output_dir to a folder on a disk with more room"
        )
    memory, available = size.memory + (size.bytes if in_memory else 0), available_memory()
    if memory > available:
        raise SpaceError(
            f"decoding data.source = {source.cfg.source!r} holds the images in memory: "
            f"{size_text(memory)} ({MEMORY_COPIES[source.cfg.source]} copies of {size}), but "
            f"this machine has {size_text(available)} of memory available; {_fix(source)}, "
            f"or run on a machine with more memory"
        )
    return size


def _photo_size(source: Source) -> tuple[int, int]:
    """(height, width) every photo becomes: data.image_size, else the first file's size."""
    if source.cfg.size is not None:
        return source.cfg.size
    try:
        return photos.first_size(source.files[0])
    except photos.BadImage as e:
        raise DataError(f"image file {source.files[0]} {e}") from None


def _fix(source: Source) -> str:
    if source.listing is None:
        return "use a subset of the images"
    now = f" (now {source.cfg.size[0]} x {source.cfg.size[1]})" if source.cfg.size else ""
    return f"lower data.image_size{now}, use a subset of the images"
