"""Photo files to pixels: one decoding policy, run by every core into the image store's array.

Any size, aspect ratio and mode (grey, RGB, RGBA, palette, CMYK, 16-bit, EXIF-rotated) becomes one
(height, width) by the study's `data.resize_policy`:
- "center_crop": scale the image so it covers the target, then cut the centre, as torchvision's
  evaluation transforms (Resize(shorter side) + CenterCrop) do; nothing is distorted.
- "stretch": resize to the target whatever the aspect ratio.
`decode` is the one function that does it, for the store and for prediction later; the policy is
saved with the store and with every checkpoint (`ImageData.preprocess`).

Decoding is PIL's: JPEGs are decoded at a reduced DCT scale (`Image.draft`) when the target is at
most half their size, which is most of the cost saved on large photos.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workbench.config import DataConfig
from workbench.data.images import Decoded
from workbench.errors import DataError
from workbench.runtime import default_workers

if TYPE_CHECKING:
    from PIL import Image

_GRAY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one channel
_WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit pixels: 0..65535 -> 0..255
_POOL_MIN = 256  # files: below this, start-up of the decoding processes costs more than it saves
_CHUNK = 64  # files per task handed to a decoding process


@dataclass(frozen=True)
class Policy:
    size: tuple[int, int] | None  # (height, width); None: every file must already share one size
    resize: str  # "center_crop" or "stretch"

    def as_dict(self) -> dict[str, object]:
        return {"image_size": list(self.size) if self.size else None, "resize_policy": self.resize}


class BadImage(Exception):
    """A file that cannot be decoded, or does not have the one size the folder needs."""


def decode(path: Path, policy: Policy) -> tuple[np.ndarray, bool]:
    """One file -> (uint8 (H, W, 3), True if the source was greyscale); raises BadImage."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as f:
            if policy.size is not None and f.format == "JPEG":
                side = max(policy.size)  # EXIF may swap width and height: ask for the larger
                f.draft(f.mode, (side, side))  # the smallest DCT scale still >= side x side
            im = ImageOps.exif_transpose(f)
            gray = im.mode in _GRAY
            im = _eight_bit(im, gray)
            if policy.size is not None:
                box = _centre(im.size, policy.size) if policy.resize == "center_crop" else None
                im = im.resize(policy.size[::-1], Image.Resampling.BILINEAR, box=box)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot be decoded ({e})") from None
    return (np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a), gray


def _eight_bit(im: Image.Image, gray: bool) -> Image.Image:
    """Grey modes -> "L" (16-bit divided by 257), everything else -> "RGB" (alpha dropped)."""
    from PIL import Image

    if gray and im.mode in _WIDE:
        a = np.asarray(im.convert("I"), np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if gray and im.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB directly
    return im.convert("L" if gray else "RGB")


def _centre(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centre box of `size` (width, height) with the aspect ratio of `target` (h, w)."""
    w, h = size
    th, tw = target
    scale = max(th / h, tw / w)  # the image covers the target once scaled by this
    cw, ch = tw / scale, th / scale  # the kept region, in source pixels
    left, top = max((w - cw) / 2, 0.0), max((h - ch) / 2, 0.0)  # >= 0 despite rounding
    return (left, top, min(left + cw, w), min(top + ch, h))


@dataclass(frozen=True)
class Outcome:
    row: int
    gray: bool = False  # the source file was greyscale
    error: str | None = None  # why the file could not be decoded
    size: tuple[int, int] | None = None  # its (h, w) when it is not the one size wanted


def decode_rows(
    files: list[Path], out: Path, start: int, policy: Policy, shape: tuple[int, int]
) -> list[Outcome]:
    """Decode `files` into rows start.. of the (N, 3, H, W) uint8 array in the .npy file `out`.

    Runs in a decoding process (or in-process): each writes its own rows of the mapped file."""
    arr = np.load(out, mmap_mode="r+")
    results: list[Outcome] = []
    for i, path in enumerate(files, start):
        try:
            a, gray = decode(path, policy)
        except BadImage as e:
            results.append(Outcome(i, error=str(e)))
            continue
        if a.shape[:2] != shape:
            results.append(Outcome(i, gray, size=(a.shape[0], a.shape[1])))
            continue
        arr[i] = a.transpose(2, 0, 1)
        results.append(Outcome(i, gray))
    arr.flush()
    return results


def decode_all(
    files: list[Path],
    out: Path,
    policy: Policy,
    shape: tuple[int, int],
    progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Decode every file into `out` (already sized (N, 3, H, W)), on every core when it pays.

    `progress(n)` is called as each chunk of n files is done. Processes are forked: the parent
    has touched no CUDA or thread pool yet (this runs before any training), and fork avoids
    re-importing torch in each decoding process (~2 s each, measured here)."""
    starts = range(0, len(files), _CHUNK)
    chunks = [files[i : i + _CHUNK] for i in starts]
    cores = default_workers("cpu")
    parallel = len(files) >= _POOL_MIN and cores > 1
    done: list[Outcome] = []
    with (
        ProcessPoolExecutor(cores, mp_context=get_context("fork"))
        if parallel
        else contextlib.nullcontext()
    ) as pool:
        mapper = pool.map if pool is not None else map  # in order, chunk by chunk, either way
        parts = mapper(decode_rows, chunks, repeat(out), starts, repeat(policy), repeat(shape))
        for fs, part in zip(chunks, parts, strict=True):
            done += part
            if progress:
                progress(len(fs))
    return done


def first_size(path: Path) -> tuple[int, int]:
    """(height, width) of a file after EXIF rotation, from its header; raises BadImage."""
    from PIL import Image

    try:
        with Image.open(path) as f:
            w, h = f.size
            orientation = f.getexif().get(0x0112, 1)  # 5..8: rotated by 90 or 270 degrees
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot be decoded ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# --- a listing of files to decode ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Listing:
    """The image files of a folder or table source, in row order, with their classes."""

    files: tuple[Path, ...]
    labels: np.ndarray  # (files,) int64 index into classes
    classes: tuple[str, ...]  # class names, index = label
    names: tuple[str, ...]  # each file as its source names it (path below the folder, table cell)
    where: str  # the source for messages and the store's description: "folder:/data/pets"
    test: np.ndarray | None = None  # (files,) bool: the source's own held-out rows, if it has them
    columns: dict[str, tuple[str, ...]] | None = None  # a table's other columns, as text


def read_listing(
    cfg: DataConfig,
    listing: Listing,
    scratch: Path,
    progress: Callable[[int], None] | None = None,
) -> Decoded:
    """Decode every listed file by the study's policy; an undecodable file is an error or, with
    data.on_bad_file = "skip", a row left out (and named in `Decoded.skipped`)."""
    files = listing.files
    policy = Policy(cfg.size, cfg.resize_policy)
    try:  # without data.image_size every image must have the first one's size
        shape = policy.size or first_size(files[0])
    except BadImage as e:
        raise DataError(f"image file {files[0]} {e}") from None
    out = scratch / "decoding.npy"
    np.lib.format.open_memmap(out, "w+", np.uint8, (len(files), 3, *shape)).flush()
    done = decode_all(list(files), out, policy, shape, progress)
    odd = next((o for o in done if o.size is not None), None)
    if odd is not None and odd.size is not None:
        (h, w), (h2, w2) = shape, odd.size
        raise DataError(
            f"images of {listing.where} differ in size: {files[0]} is {h}x{w} and "
            f"{files[odd.row]} is {h2}x{w2} (height x width); set `data.image_size = [h, w]` in "
            f"the study file to make every image one size (data.resize_policy says how)"
        )
    bad = [(files[o.row], o.error) for o in done if o.error is not None]
    if bad and cfg.on_bad_file == "error":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"image file {bad[0][0]} {bad[0][1]}{more}; fix or remove it, or set "
            f'`data.on_bad_file = "skip"` to leave such files out'
        )
    keep = np.array([o.error is None for o in done])
    if not keep.any():
        raise DataError(
            f"no image of {listing.where} could be decoded; the first: {bad[0][0]} {bad[0][1]}"
        )
    gray = all(o.gray for o in done if o.error is None)
    pixels = np.load(out, mmap_mode="r")  # the store is written from this file, not memory
    if gray:  # a view: grey photos were decoded into three equal channels
        pixels = pixels[:, :1]
    if not keep.all():  # the one copy in memory: the rows kept, once files were skipped
        pixels = pixels[keep]
    kept = np.flatnonzero(keep)
    return Decoded(
        pixels,
        listing.labels[keep],
        listing.classes,
        f"{listing.where} ({len(kept)} images)",
        None if listing.test is None else np.flatnonzero(listing.test[keep]),
        preprocess={**policy.as_dict(), "image_size": list(shape)},
        skipped=tuple(f"{f}: {why}" for f, why in bad),
        names=tuple(listing.names[i] for i in kept),
        columns={k: tuple(v[i] for i in kept) for k, v in (listing.columns or {}).items()},
    )
