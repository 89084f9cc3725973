"""The held-out split (made once, saved, checked against the data) and the CV folds inside it.

Only the final evaluation reads `Split.test_idx`; the search sees `train_idx` and cross-validates
inside it. The split is saved beside the results with the data's fingerprint, so a resumed study
uses the same rows, and changed data is an error rather than a silent leak of test rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from workbench.config import DataConfig
from workbench.data.images import ImageData, fingerprint_of
from workbench.errors import ConfigError, DataError
from workbench.files import load_npz, save_npz

_SEED_SPACE = 2**32  # scikit-learn's random_state must lie in [0, 2**32)


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
    y = data.y.cpu().numpy()
    try:
        train, test = train_test_split(
            np.arange(n, dtype=np.int64),
            test_size=cfg.test_size,
            random_state=seed % _SEED_SPACE,
            stratify=y,
        )
    except ValueError as e:  # a class with one row, or fewer test rows than classes
        counts = np.bincount(y, minlength=data.num_classes)
        k = int(np.argmin(counts))
        raise DataError(
            f"cannot make a stratified split with data.test_size = {cfg.test_size} of {n} rows: "
            f"{e}. Each class needs >= 2 rows and the test part >= {data.num_classes} rows (one "
            f"per class); the smallest class is {data.classes[k]!r} with {counts[k]} row(s)"
        ) from None
    return Split(np.sort(train), np.sort(test), fp, "stratified")


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
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % _SEED_SPACE)
    return [(tr.astype(np.int64), va.astype(np.int64)) for tr, va in skf.split(np.zeros(len(y)), y)]
