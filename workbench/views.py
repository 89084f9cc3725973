"""Test-time views of an image: the declared transforms a TTA member averages its predictions over.

`[ensemble] tta` lists names from this registry; a member's TTA variant predicts the image as it
is and each view of it, and takes the mean of the float64 softmax outputs. A name may stand for
several views:

    hflip      the image mirrored left-right                                        1 view
    vflip      the image mirrored top-bottom                                        1 view
    shift-N    the image moved N pixels up, down, left and right (zero-filled,       4 views
               as the training loop's `shift` augmentation fills), N in 1..16
    crops      the centre and the four corners at 7/8 of the side, each resized     5 views
               back (bilinear, as torchvision's RandomResizedCrop resizes)

Every view maps float images (B, C, H, W) in [0, 1] to the same shape in tensor ops that the
ONNX exporter writes (flip, roll, multiply, matmul), so the final module, its ONNX graph, the MLflow
model and `predict` all apply them. `register` adds a view (tests register one that scrambles
the image, to show a useless view gets no weight).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# (B, C, H, W) -> (B, C, H, W) torch tensors. The views use tensor methods and numpy only: this
# module imports no torch, so the study file's loader (workbench/config.py) can check the names
# while the ensemble stage stays torch-free (import-linter's contract).
View = Callable[[Any], Any]

TTA = "+tta"  # a TTA variant's name is its member's and this: "cnn/trial-6+tta"
_REGISTRY: dict[str, Callable[[], list[View]]] = {}
_SHIFT = re.compile(r"^shift-(\d+)$")
MAX_SHIFT = 16  # pixels: beyond it a "shift" is a different picture, even at 224 px
CROP = 7 / 8  # side of the five crops, as a share of the image's


def register(name: str) -> Callable[[Callable[[], list[View]]], Callable[[], list[View]]]:
    """Decorator: `name` stands for the views the decorated factory returns."""

    def add(factory: Callable[[], list[View]]) -> Callable[[], list[View]]:
        _REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    """The registered names, with the shift family written as its pattern."""
    return [*sorted(_REGISTRY), f"shift-N (N in 1..{MAX_SHIFT})"]


def problem(name: str) -> str | None:
    """Why `name` is not a view name, or None when it is one."""
    m = _SHIFT.match(name)
    if name in _REGISTRY or (m and 1 <= int(m.group(1)) <= MAX_SHIFT):
        return None
    return f"{name!r} is not a test-time view; valid: {', '.join(names())}"


def resolve(declared: Sequence[str]) -> list[View]:
    """Every view the declared names stand for, in order (the image itself is not one)."""
    out: list[View] = []
    for name in declared:
        if (why := problem(name)) is not None:
            raise ValueError(why)
        m = _SHIFT.match(name)
        out += _shifts(int(m.group(1))) if m and name not in _REGISTRY else _REGISTRY[name]()
    return out


def count(declared: Sequence[str]) -> int:
    """How many views the declared names stand for."""
    return len(resolve(declared))


@register("hflip")
def _hflip() -> list[View]:
    return [lambda x: x.flip(-1)]


@register("vflip")
def _vflip() -> list[View]:
    return [lambda x: x.flip(-2)]


def _kept(n: int, d: int) -> np.ndarray:
    """(n,) 1 where a line moved by d along an axis of n lines stays inside, 0 where it wrapped."""
    keep = np.ones(n, np.float32)
    if d > 0:
        keep[:d] = 0
    elif d < 0:
        keep[n + d :] = 0
    return keep


def _shifts(n: int) -> list[View]:
    """Moved by n pixels along each axis, both ways: rolled, and what wrapped round made 0."""

    def shift(dy: int, dx: int) -> View:
        def view(x: Any) -> Any:
            h, w = x.shape[-2:]
            rows, cols = x.new_tensor(_kept(h, dy))[:, None], x.new_tensor(_kept(w, dx))
            return x.roll((dy, dx), dims=(-2, -1)) * rows * cols

        return view

    return [shift(-n, 0), shift(n, 0), shift(0, -n), shift(0, n)]


def _resize_matrix(size: int, start: int, length: int) -> np.ndarray:
    """(size, size) weights that take lines start..start+length of an axis of `size` lines to
    `size` lines by bilinear interpolation at half-pixel centres: torch's `interpolate(mode=
    "bilinear", align_corners=False)`, to 1e-7 at 8 to 224 px (checked by hand against it).
    Applied as two matrix products, so the ONNX graph holds MatMuls, not a Resize."""
    out = np.zeros((size, size), np.float32)
    src = np.maximum((np.arange(size) + 0.5) * length / size - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), length - 1)
    hi = np.minimum(lo + 1, length - 1)
    frac = (src - lo).astype(np.float32)
    np.add.at(out, (np.arange(size), start + lo), 1 - frac)
    np.add.at(out, (np.arange(size), start + hi), frac)
    return out


@register("crops")
def _crops() -> list[View]:
    def crop(top: float, left: float) -> View:
        """The crop whose top-left corner is at (top, left) shares of the free margin."""

        def view(x: Any) -> Any:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * CROP)), max(1, round(w * CROP))
            y0, x0 = round((h - ch) * top), round((w - cw) * left)
            rows = x.new_tensor(_resize_matrix(h, y0, ch))
            cols = x.new_tensor(_resize_matrix(w, x0, cw))
            return rows @ x @ cols.T

        return view

    return [crop(0.5, 0.5), crop(0, 0), crop(0, 1), crop(1, 0), crop(1, 1)]
