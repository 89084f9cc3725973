"""`workbench predict`: new image files through the final model, prepared as its training data was.

Files, folders (searched recursively) and glob patterns are decoded by the one decoding function
of the image store (workbench/data/photos.py) with the policy saved in the final model's
`ensemble.json` (image size, resize policy, channels), so a photo meets the model exactly as the
training photos did. The table has one row per image: its path, the predicted class (the
final module's label, hard-vote ties included), that class's probability and one probability
column per class (workbench/serving.py's columns, as the MLflow model returns them); with labels
from the folders, also the true class.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.data.photos import BadImage
from workbench.errors import DataError
from workbench.final import FinalEnsemble
from workbench.serving import decode_file, prediction_columns
from workbench.train import EVAL_BATCH


@dataclass
class Predictions:
    paths: list[str]
    proba: np.ndarray  # (images, classes), rows sum to 1
    label_index: np.ndarray  # (images,) the model's labels (hard votes: its tie rule)
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason"

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.label_index]

    def table(self, truth: list[str] | None = None) -> dict[str, list[object]]:
        """Columns: path, label, probability, [true_label], then p_<class> for every class."""
        cols = prediction_columns(self.proba, self.label_index, self.classes)
        head: dict[str, list[object]] = {"path": list(self.paths)}
        head.update({k: cols.pop(k) for k in ("label", "probability")})
        if truth is not None:
            head["true_label"] = list(truth)
        return {**head, **cols}


def image_files(patterns: Iterable[str]) -> list[Path]:
    """Files named, found below folders, or matched by globs; sorted, each once."""
    found: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found |= {f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")}
        elif p.is_file():
            found.add(p)
        else:
            matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
            found |= {m for m in matches if m.is_file()}
    return sorted(found)


def predict_files(
    model: FinalEnsemble,
    files: list[Path],
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Decode and predict `files` in batches; a file that is not an image is skipped (an error
    with `strict`). An empty selection is an error."""
    if not files:
        raise DataError("no files to predict: the paths, folders and patterns given match nothing")
    kept: list[str] = []
    skipped: list[str] = []
    outs: list[tuple[np.ndarray, np.ndarray]] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            outs.append(model.run(model.inputs(np.stack(batch), scale=255.0)))
            if progress:
                progress(len(batch))
            batch.clear()

    for f in files:
        try:
            batch.append(decode_file(model, f, str(f)))
        except BadImage as e:
            if strict:
                raise DataError(f"{f} {e}; leave --strict off to skip such files") from None
            skipped.append(f"{f}: {e}")
            continue
        kept.append(str(f))
        if len(batch) == EVAL_BATCH:
            flush()
    flush()
    if not kept:
        raise DataError(f"none of the {len(files)} file(s) is an image: {skipped[0]}")
    proba = np.concatenate([p for p, _ in outs])
    labels = np.concatenate([lab for _, lab in outs])
    return Predictions(kept, proba, labels, list(model.classes), skipped)


def folder_labels(paths: list[str], classes: list[str]) -> list[str]:
    """Each file's class from the name of the folder it is in; an unknown name is an error."""
    truth = [Path(p).parent.name for p in paths]
    unknown = sorted(set(truth) - set(classes))
    if unknown:
        raise DataError(
            f"--labels-from-folders: folder name(s) {unknown} are not classes of the model "
            f"{classes}; put each image in a folder named after its class"
        )
    return truth


def write_table(path: Path, cols: dict[str, list[object]]) -> Path:
    """CSV, or Parquet when the name ends in .parquet; written atomically."""
    import pandas as pd

    from workbench.files import atomic_write

    df = pd.DataFrame(cols)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda f: df.to_parquet(f, index=False))
    return atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode()))
