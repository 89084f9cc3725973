"""The held-out split (made once, saved, checked against the data) and the CV folds inside it.

Only the final evaluation reads `Split.test_idx`; the search sees `train_idx` and cross-validates
inside it. The split is saved beside the results with the data's fingerprint, so a resumed study
uses the same rows, and changed data is an error rather than a silent leak of test rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.config import DataConfig
from workbench.data.images import ImageData, fingerprint_of
from workbench.errors import ConfigError, DataError
from workbench.files import load_npz, save_npz

_SEED_SPACE = 2**32  # numpy's RandomState seed must lie in [0, 2**32)


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Split:
    train_idx: np.ndarray  # int64 row indices into ImageData used by the search (CV happens inside)
    test_idx: np.ndarray  # held-out rows: only the final evaluation ever reads them
    fingerprint: str  # data_fingerprint of the data it was made from
    kind: str  # "stratified" or "source"


def data_fingerprint(data: ImageData) -> str:
    """A short sha256 (12 hex chars) of the pixels, labels, shape and class names; the image
    store computes it once when it is built."""
    if data.fingerprint:
        return data.fingerprint
    return fingerprint_of(data.pixels.numpy(), data.y.numpy(), data.classes)


def make_split(data: ImageData, cfg: DataConfig, seed: int) -> Split:
    """The source's own test rows when it has them (and cfg.use_source_test), else stratified."""
    n, fp = len(data.y), data_fingerprint(data)
    if data.source_test is not None and cfg.use_source_test:
        test = np.unique(np.asarray(data.source_test, dtype=np.int64))
        train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
        return Split(train, test, fp, "source")
    train, test = _stratified_holdout(data.y.cpu().numpy(), cfg.test_size, seed, data.classes)
    return Split(train, test, fp, "stratified")


def load_or_make_split(data: ImageData, cfg: DataConfig, seed: int, path: Path) -> Split:
    """Reuse the split saved at `path` (.npz) if it exists, else make it and save it atomically."""
    fp = data_fingerprint(data)
    if not Path(path).exists():
        split = make_split(data, cfg, seed)
        save_npz(
            path,
            train_idx=split.train_idx,
            test_idx=split.test_idx,
            fingerprint=np.array(split.fingerprint),
            kind=np.array(split.kind),
        )
        return split
    saved = load_npz(path, what="split file")
    missing = {"train_idx", "test_idx", "fingerprint", "kind"} - set(saved)
    if missing:
        raise DataError(f"split file {path} lacks {sorted(missing)}; delete it to make a new split")
    old = str(saved["fingerprint"])
    if old != fp:
        raise DataError(
            f"the data changed since the split in {path} was made: its fingerprint was {old}, "
            f"the data now loaded has {fp}. Load the same data, or delete the output folder to "
            f"start the study over with a new split."
        )
    return Split(
        saved["train_idx"].astype(np.int64),
        saved["test_idx"].astype(np.int64),
        old,
        str(saved["kind"]),
    )


def cv_folds(
    y: np.ndarray, folds: int, seed: int, classes: tuple[str, ...] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold: (train_pos, val_pos) positions into `y`; each position validated once.
    `classes` (the data's class names, indexed by label) name the class an error is about."""
    y = np.asarray(y)
    values, counts = np.unique(y, return_counts=True)
    k = int(np.argmin(counts))
    if folds > counts[k]:
        label = values[k] if classes is None else repr(classes[int(values[k])])
        raise ConfigError(
            f"`cv.folds` must be <= the smallest class count so every fold sees every class, but "
            f"cv.folds = {folds} and class {label} has {counts[k]} training row(s); "
            f"use cv.folds <= {counts[k]}"
        )
    fold_of = _stratified_folds(y, folds, seed)
    return [(np.flatnonzero(fold_of != i), np.flatnonzero(fold_of == i)) for i in range(folds)]


# The two stratified draws below are scikit-learn 1.9's, draw for draw: train_test_split(stratify=y)
# (StratifiedShuffleSplit) and StratifiedKFold(shuffle=True), with the same RandomState, so a seed
# gives the rows it always gave. They are written out in numpy because importing
# sklearn.model_selection costs 75 MB of heap and ~30 MB of libraries (SciPy, pandas, pyarrow) that
# every search process then holds (bench item 7, /proc/<pid>/smaps), for two functions of 20 lines.
# tests/test_data.py checks both against scikit-learn over many seeds and labelings.


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows per class in a stratified draw of `draws` rows: each class's share, floored, plus one
    row for the largest remainders until `draws` are placed (ties broken at random)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        (ties,) = np.where(remainder == value)
        add = min(len(ties), need)
        floored[rng.choice(ties, size=add, replace=False)] += 1
        need -= add
    return floored.astype(np.int64)


def _stratified_holdout(
    y: np.ndarray, test_size: float, seed: int, classes: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, sorted: test_size of the rows (rounded up), each class's share."""
    n = len(y)
    n_test = math.ceil(test_size * n)
    values, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    k = int(np.argmin(counts))
    if counts[k] < 2 or min(n_test, n - n_test) < len(values):
        raise DataError(
            f"cannot make a stratified split with data.test_size = {test_size} of {n} rows: each "
            f"class needs >= 2 rows and each part >= {len(values)} rows (one per class), but the "
            f"test part would have {n_test} and the smallest class {classes[int(values[k])]!r} "
            f"has {counts[k]} row(s)"
        )
    rng = np.random.RandomState(seed % _SEED_SPACE)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    n_train = _approximate_mode(counts, n - n_test, rng)
    n_held = _approximate_mode(counts - n_train, n_test, rng)
    train, test = [], []
    for rows, a, b in zip(by_class, n_train, n_held, strict=True):
        rows = rows[rng.permutation(len(rows))]
        train.append(rows[:a])
        test.append(rows[a : a + b])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The validation fold of each row: each class dealt round-robin over the folds in sorted
    order (classes numbered by first appearance), then each class's fold numbers shuffled."""
    rng = np.random.RandomState(seed % _SEED_SPACE)
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    encoded = np.unique(first, return_inverse=True)[1][inverse.ravel()]
    ordered = np.sort(encoded)
    per_fold = [np.bincount(ordered[i::folds], minlength=len(first)) for i in range(folds)]
    allocation = np.asarray(per_fold)  # (folds, classes): rows of each class in each fold
    fold_of = np.empty(len(y), dtype=np.int64)
    for k in range(len(first)):
        dealt = np.arange(folds).repeat(allocation[:, k])
        rng.shuffle(dealt)
        fold_of[encoded == k] = dealt
    return fold_of
