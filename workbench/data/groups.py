"""Groups of rows that must stay together: a patient's images, a part's, an animal's.

When one patient's images sit on both sides of the held-out split, or in two folds, the scores
are inflated: the model is scored on a patient it has seen. With `[cv] group_by` the held-out
split and the CV folds are stratified group splits: a group is never on both sides, and each
class's share is kept as far as the groups allow.

The groups come from the data: a table's column, or a pattern on an image folder's file names.
What cannot work is an error before any training: a row with no group, a single group, fewer
groups than the splits need, a class whose rows all lie in one group.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from workbench.config import StudyConfig
from workbench.data.images import ImageData
from workbench.errors import DataError

_SEED_SPACE = 2**32  # numpy's RandomState seed must lie in [0, 2**32)


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Grouping:
    by: str  # cv.group_by as the study file gives it: a column or a file-name pattern
    groups: np.ndarray  # (rows,) str: each row's group
    folds: int  # cv.folds: the training rows are split into this many group folds

    @property
    def count(self) -> int:
        return len(np.unique(self.groups))


def grouping(data: ImageData, cfg: StudyConfig) -> Grouping | None:
    """The study's groups of `data`'s rows (None without cv.group_by), checked as usable."""
    by = cfg.group_by
    if by is None:
        return None
    groups = _column(data, by) if cfg.data.source == "table" else _from_names(data, by)
    found = Grouping(by, groups, cfg.cv.folds)
    _check(found, data)
    return found


def _column(data: ImageData, column: str) -> np.ndarray:
    if column not in data.columns:
        raise DataError(
            f"cv.group_by = {column!r} is not a column of {data.source}; its columns beside "
            f"the path and label: {sorted(data.columns) or 'none'}"
        )
    cells = np.array(data.columns[column], dtype=str)
    empty = np.flatnonzero(np.char.strip(cells) == "")
    if len(empty):
        raise DataError(
            f"group column {column!r} (cv.group_by) is empty in {len(empty)} row(s) of "
            f"{data.source}, the first for {data.names[empty[0]]}; every row needs its group "
            f"(a patient, part or animal), or the split cannot keep it on one side"
        )
    return cells


def _from_names(data: ImageData, pattern: str) -> np.ndarray:
    """The group of each file: the pattern's first group (else its whole match) in its name."""
    rule = re.compile(pattern)
    out = []
    for name in data.names:
        m = rule.search(PurePosixPath(name).name)
        if m is None:
            raise DataError(
                f"cv.group_by = {pattern!r} does not match the file name of {name} in "
                f"{data.source}; every file's name must hold its group (e.g. '^(P\\d+)_' for "
                f"P17_left.jpg), or rename the files"
            )
        out.append(m.group(1) if rule.groups else m.group(0))
    return np.array(out, dtype=str)


def _check(found: Grouping, data: ImageData) -> None:
    n, by = found.count, found.by
    if n < 2:
        raise DataError(
            f"cv.group_by = {by!r} puts every row of {data.source} in one group "
            f"({str(found.groups[0])!r}); grouped splits need >= {found.folds + 1} groups"
        )
    if n < found.folds + 1:
        raise DataError(
            f"cv.group_by = {by!r} gives {n} groups, fewer than the held-out split and "
            f"cv.folds = {found.folds} folds need ({found.folds + 1}: every side at least one); "
            f"lower cv.folds, or group more finely"
        )
    y = data.y.numpy()
    for label, name in enumerate(data.classes):
        held = np.unique(found.groups[y == label])
        if len(held) == 1:
            raise DataError(
                f"class {name!r} lives in a single group ({str(held[0])!r} of cv.group_by = "
                f"{by!r}), so it cannot be in both the training and the test rows; add images of "
                f"{name!r} from other groups, or leave the class out"
            )


def held_out(
    y: np.ndarray, groups: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of a stratified group split: one fold of
    round(1 / test_size) stratified group folds (so 0.2 gives a fifth, 0.3 a third)."""
    fold_of = group_folds(y, groups, max(2, round(1 / test_size)), seed)
    return np.flatnonzero(fold_of != 0), np.flatnonzero(fold_of == 0)


def group_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold of each row: scikit-learn's StratifiedGroupKFold (shuffled groups, seeded).
    Imported here only: grouped studies make their folds once, in the parent, and the split
    file holds them (sklearn.model_selection costs every process ~75 MB, data/splits.py)."""
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed % _SEED_SPACE)
    fold_of = np.empty(len(y), np.int64)
    with warnings.catch_warnings():  # "least populated class ... less than n_splits": _check
        warnings.simplefilter("ignore", UserWarning)  # and the split's own check say it better
        for k, (_, va) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
            fold_of[va] = k
    return fold_of


def straddling(groups: np.ndarray, train: np.ndarray, test: np.ndarray) -> list[str]:
    """The groups with rows on both sides of a split, sorted."""
    return sorted(map(str, set(groups[train]) & set(groups[test])))
