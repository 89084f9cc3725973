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
from workbench.data import groups
from workbench.data.groups import Grouping
from workbench.data.images import ImageData, fingerprint_of
from workbench.errors import ConfigError, DataError
from workbench.files import load_npz, save_npz

_SEED_SPACE = 2**32  # numpy's RandomState seed must lie in [0, 2**32)


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Split:
    train_idx: np.ndarray  # int64 row indices into ImageData used by the search (CV happens inside)
    test_idx: np.ndarray  # held-out rows: only the final evaluation ever reads them
    fingerprint: str  # data_fingerprint of the data it was made from
    kind: str  # "stratified", "stratified group" or "source"
    group_by: str | None = None  # cv.group_by of a grouped split
    groups: np.ndarray | None = None  # (rows of the data,) str: each row's group, when grouped
    fold_of: np.ndarray | None = None  # (training rows,) int64: a grouped split's CV folds

    def folds(
        self, y: np.ndarray, folds: int, seed: int, classes: tuple[str, ...] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The CV folds of the training rows, (train_pos, val_pos) positions into them: the
        grouped split's own, else stratified k-fold of their labels `y` (`cv_folds`)."""
        if self.fold_of is None:
            return cv_folds(y, folds, seed, classes)
        fold_of = self.fold_of
        return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(folds)]

    def describe(self) -> str:
        """How the rows were split, for people: "stratified group split by 'patient_id'"."""
        by = f" by {self.group_by!r}" if self.group_by else ""
        return f"{self.kind} split{by}"

    def group_note(self) -> str:
        """What a grouped split promises, for the report; "" when not grouped."""
        if self.groups is None:
            return ""
        n = len(np.unique(self.groups))
        return (
            f"grouped by {self.group_by!r} (cv.group_by): {n} groups, each wholly on one side "
            f"of the held-out split and of every CV fold"
        )


def data_fingerprint(data: ImageData) -> str:
    """A short sha256 (12 hex chars) of the pixels, labels, shape and class names; the image
    store computes it once when it is built."""
    if data.fingerprint:
        return data.fingerprint
    return fingerprint_of(data.pixels.numpy(), data.y.numpy(), data.classes)


def make_split(
    data: ImageData, cfg: DataConfig, seed: int, grouping: Grouping | None = None
) -> Split:
    """The source's own test rows when it has them (and cfg.use_source_test), else stratified;
    with `grouping`, no group on both sides of the split or of any CV fold."""
    n, fp = len(data.y), data_fingerprint(data)
    y = data.y.cpu().numpy()
    if data.source_test is not None and cfg.use_source_test:
        test = np.unique(np.asarray(data.source_test, dtype=np.int64))
        train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
        kind = "source"
    elif grouping is not None:
        train, test = groups.held_out(y, grouping.groups, cfg.test_size, seed)
        kind = "stratified group"
    else:
        train, test = _stratified_holdout(y, cfg.test_size, seed, data.classes)
        return Split(train, test, fp, "stratified")
    if grouping is None:
        return Split(train, test, fp, kind)
    _apart(grouping.groups, train, test, f"the held-out split of {data.source}")
    missing = sorted(set(range(len(data.classes))) - set(y[train].tolist()))
    if missing:
        raise DataError(
            f"the grouped held-out split of {data.source} left no training rows of class "
            f"{data.classes[missing[0]]!r}: all its groups fell in the test rows; add groups "
            f"of that class, or lower data.test_size"
        )
    fold_of = groups.group_folds(y[train], grouping.groups[train], grouping.folds, seed)
    return Split(train, test, fp, kind, grouping.by, grouping.groups, fold_of)


def _apart(row_groups: np.ndarray, train: np.ndarray, test: np.ndarray, what: str) -> None:
    both = groups.straddling(row_groups, train, test)
    if both:
        more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
        raise DataError(
            f"group {both[0]!r}{more} has rows on both sides of {what}; a group (cv.group_by) "
            f"must lie on one side. Move its files to one split, or set "
            f"data.use_source_test = false to draw a grouped split"
        )


def load_or_make_split(
    data: ImageData, cfg: DataConfig, seed: int, path: Path, grouping: Grouping | None = None
) -> Split:
    """Reuse the split saved at `path` (.npz) if it exists, else make it and save it atomically.
    A saved grouped split is checked against the groups the study gives now."""
    fp = data_fingerprint(data)
    if not Path(path).exists():
        split = make_split(data, cfg, seed, grouping)
        grouped: dict[str, np.ndarray] = {}
        if split.groups is not None and split.fold_of is not None:
            grouped = {"group_by": np.array(split.group_by), "groups": split.groups}
            grouped["fold_of"] = split.fold_of
        save_npz(
            path,
            train_idx=split.train_idx,
            test_idx=split.test_idx,
            fingerprint=np.array(split.fingerprint),
            kind=np.array(split.kind),
            **grouped,
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
    split = Split(
        saved["train_idx"].astype(np.int64),
        saved["test_idx"].astype(np.int64),
        old,
        str(saved["kind"]),
        str(saved["group_by"]) if "group_by" in saved else None,
        saved.get("groups"),
        saved["fold_of"].astype(np.int64) if "fold_of" in saved else None,
    )
    _same_groups(split, grouping, path)
    return split


def _same_groups(split: Split, grouping: Grouping | None, path: Path) -> None:
    """The saved split was made with the study's groups, and keeps every group on one side."""
    was, now = split.group_by, grouping.by if grouping else None
    restart = "Undo the change, or delete the output folder to start the study over."
    if was != now:
        raise DataError(
            f"the split in {path} was made {f'grouped by {was!r}' if was else 'without groups'}, "
            f"but the study now has cv.group_by = {now!r}. {restart}"
        )
    if grouping is None or split.groups is None or split.fold_of is None:
        return
    if not np.array_equal(split.groups, grouping.groups):
        changed = int((split.groups != grouping.groups).sum())
        raise DataError(
            f"the groups of {changed} row(s) changed since the split in {path} was made "
            f"(cv.group_by = {now!r}). {restart}"
        )
    _apart(split.groups, split.train_idx, split.test_idx, f"the split in {path}")
    folds = int(split.fold_of.max()) + 1
    if folds != grouping.folds:
        raise DataError(
            f"the split in {path} holds {folds} group folds, but cv.folds = {grouping.folds}. "
            f"{restart}"
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
