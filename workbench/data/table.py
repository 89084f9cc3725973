"""A table of image files and labels (CSV or Parquet), the form most medical and competition sets
ship in: `image_id, diagnosis, patient_id` beside a flat folder of images.

`data.columns` names the path and label columns (and optionally the group column); every other
column is kept as text beside the rows, so that `[cv] group_by` can name any of them. Paths are
relative to the table's folder, or absolute; `data.suffix` completes a path without an extension.
Labels are text in any script; classes are the sorted labels (by value when every label is an
integer, so "10" follows "9"). Every mistake is one line naming the table, its row and column.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workbench.config import DataConfig, TableColumns
from workbench.data.photos import Listing
from workbench.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

KINDS = (".csv", ".parquet")  # table files read, by extension
_HEADER = 2  # line number of a table's first data row (row 0): the header is line 1


@dataclass(frozen=True)
class Manifest:
    """A table's rows: each image file, its label and its other columns, all as text."""

    table: Path
    files: tuple[Path, ...]  # resolved image paths, in table order
    labels: tuple[str, ...]
    names: tuple[str, ...]  # the path cells as written (with data.suffix added)
    columns: dict[str, tuple[str, ...]]  # every other column, as text ("" where empty)


def read_manifest(table: Path, columns: TableColumns, suffix: str = "") -> Manifest:
    """The rows of `table`: every path and label present, no file listed twice."""
    frame = _read(table)
    if frame.empty:
        raise DataError(f"table {table} has no rows; list one image file and its label per row")
    text = _as_text(frame)
    for role in ("path", "label", "group"):
        column = getattr(columns, role)
        if column is not None:
            require_column(table, text, column, f"data.columns.{role}")
    paths, labels = text[columns.path], text[columns.label]
    for role, cells in (("path", paths), ("label", labels)):
        empty = [i for i, cell in enumerate(cells) if not cell.strip()]
        if empty:
            raise DataError(
                f"table {table}: {len(empty)} row(s) have no {role} in column "
                f"{getattr(columns, role)!r} (data.columns.{role}), the first on line "
                f"{empty[0] + _HEADER}; fill them or remove those rows"
            )
    names = tuple(p if Path(p).suffix or not suffix else p + suffix for p in paths)
    files = tuple(Path(n) if Path(n).is_absolute() else table.parent / n for n in names)
    _no_twice(table, files)
    others = {k: tuple(v) for k, v in text.items() if k not in (columns.path, columns.label)}
    return Manifest(table, files, tuple(labels), names, others)


def list_table(cfg: DataConfig, table: Path) -> Listing:
    """The table's rows as files to decode, with classes; a missing file is an error unless
    data.on_bad_file = "skip" (the decoder then leaves it out and names it)."""
    m = read_manifest(table, cfg.columns, cfg.suffix)
    if cfg.on_bad_file == "error":
        missing = [i for i, f in enumerate(m.files) if not f.is_file()]
        if missing:
            i = missing[0]
            suffix = f", with data.suffix {cfg.suffix!r}" if cfg.suffix else ""
            raise DataError(
                f"table {table}, line {i + _HEADER}: image file {m.files[i]} does not exist "
                f"({len(missing)} of {len(m.files)} listed files are missing; paths are relative "
                f'to the table\'s folder{suffix}); fix the paths, or set data.on_bad_file = "skip" '
                f"to leave such rows out"
            )
    classes = class_order(m.labels)
    if len(classes) < 2:
        raise DataError(
            f"table {table}: column {cfg.columns.label!r} holds {len(classes)} label(s) "
            f"{list(classes)}; a classifier needs >= 2"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[label] for label in m.labels], np.int64)
    return Listing(m.files, labels, classes, m.names, f"table:{table}", columns=m.columns)


def class_order(labels: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The distinct labels, sorted: by value when every one is an integer, else as text."""
    distinct = sorted(set(labels))
    try:
        return tuple(sorted(distinct, key=int))
    except ValueError:
        return tuple(distinct)


def require_column(table: Path, text: dict[str, list[str]], column: str, key: str) -> None:
    """A DataError naming the table's columns (and the closest) when it has no `column`."""
    if column in text:
        return
    close = difflib.get_close_matches(column, list(text), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(
        f"table {table} has no column {column!r} ({key}); {hint}its columns: "
        f"{', '.join(map(repr, text))}"
    )


def _read(table: Path) -> pd.DataFrame:
    import pandas as pd

    kind = table.suffix.lower()
    if kind not in KINDS:
        raise DataError(
            f"data.path {table} is not a table: data.source = 'table' reads a "
            f"{' or '.join(KINDS)} file of image paths and labels"
        )
    try:
        if kind == ".csv":  # every cell as text: labels "007" and "7" stay two labels
            return pd.read_csv(table, dtype=str, keep_default_na=False, skipinitialspace=True)
        return pd.read_parquet(table)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"table {table} cannot be read as {kind[1:]}: {e}") from None


def _as_text(frame: pd.DataFrame) -> dict[str, list[str]]:
    """{column: its cells as text}; a missing value (Parquet's null, NaN) is ""."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        out[str(name)] = ["" if gap else str(v) for v, gap in zip(col, col.isna(), strict=True)]
    return out


def _no_twice(table: Path, files: tuple[Path, ...]) -> None:
    seen: dict[Path, int] = {}
    for i, f in enumerate(files):
        key = f.resolve()
        if key in seen:
            raise DataError(
                f"table {table} lists the image {f} twice, on lines {seen[key] + _HEADER} and "
                f"{i + _HEADER}; one image must be one row, or it would sit on both sides of the "
                f"held-out split"
            )
        seen[key] = i
