"""`workbench predict`: new image files through the final model, prepared as its training data was.

Files, folders (searched recursively) and glob patterns are decoded by the one decoding function
of the image store (workbench/data/photos.py) with the policy saved in the final model's
`ensemble.json` (image size, resize policy, channels), so a photo meets the model exactly as the
training photos did. The table has one row per image: its path, the predicted class, that
class's probability and one probability column per class; with labels from the folders, also
the true class.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.data.photos import BadImage, Policy, decode
from workbench.errors import DataError
from workbench.export import FinalEnsemble
from workbench.train import EVAL_BATCH

_LUMA = np.array([299, 587, 114]) / 1000  # ITU-R 601-2, as PIL's convert("L")


@dataclass
class Predictions:
    paths: list[str]
    proba: np.ndarray  # (images, classes), rows sum to 1
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason"

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.proba.argmax(1)]

    def table(self, truth: list[str] | None = None) -> dict[str, list[object]]:
        """Columns: path, label, probability, [true_label], then p_<class> for every class."""
        best = self.proba.max(1)
        cols: dict[str, list[object]] = {
            "path": list(self.paths),
            "label": list(self.labels),
            "probability": [float(p) for p in best],
        }
        if truth is not None:
            cols["true_label"] = list(truth)
        for k, c in enumerate(self.classes):
            cols[f"p_{c}"] = [float(p) for p in self.proba[:, k]]
        return cols


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
    c, h, w = model.in_shape
    pre = model.preprocess
    size = tuple(pre["image_size"]) if pre.get("image_size") else None
    policy = Policy(size, pre.get("resize_policy", "center_crop"))  # type: ignore[arg-type]
    kept: list[str] = []
    skipped: list[str] = []
    probas: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            probas.append(model.predict_proba(np.stack(batch)))
            if progress:
                progress(len(batch))
            batch.clear()

    for f in files:
        try:
            rgb, _ = decode(f, policy)
        except BadImage as e:
            if strict:
                raise DataError(f"{f} {e}; leave --strict off to skip such files") from None
            skipped.append(f"{f}: {e}")
            continue
        if rgb.shape[:2] != (h, w):
            raise DataError(
                f"{f} is {rgb.shape[0]}x{rgb.shape[1]}, but the model takes {h}x{w} images and "
                f"its training data had no image_size to resize to; resize the file to {h}x{w}"
            )
        x = rgb.astype(np.float32) / 255.0  # (H, W, 3) in [0, 1]
        x = (x @ _LUMA)[None] if c == 1 else x.transpose(2, 0, 1)
        batch.append(x.astype(np.float32))
        kept.append(str(f))
        if len(batch) == EVAL_BATCH:
            flush()
    flush()
    if not kept:
        raise DataError(f"none of the {len(files)} file(s) is an image: {skipped[0]}")
    return Predictions(kept, np.concatenate(probas), list(model.classes), skipped)


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
