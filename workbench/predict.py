"""`workbench predict`: new image files through the final model, prepared as its training data was.

Files, folders (searched recursively) and glob patterns are decoded by the one decoding function
of the image store (workbench/data/photos.py) with the policy saved in the final model's
`ensemble.json` (image size, resize policy, channels), so a photo meets the model exactly as the
training photos did. The table has one row per image: its path, the predicted class (the
final module's label, hard-vote ties included), that class's probability and one probability
column per class (workbench/serving.py's columns, as the MLflow model returns them); with labels
from the folders, also the true class.

Scoring labels on files that are rows of the study's held-out test split is a look at it:
`held_out` opens the study's image store and split as `workbench study` left them (nothing is
decoded), and `are_test_rows` finds the predicted files whose decoded pixels equal a test row's,
by a digest of the uint8 pixels (`pixel_digest`), so renamed or copied files are found too.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.config import StudyConfig
from workbench.data import ImageData, Split, grouping, load_or_make_split
from workbench.data.imagestore import open_store
from workbench.data.photos import BadImage
from workbench.data.table import Manifest
from workbench.errors import DataError
from workbench.final import FinalEnsemble
from workbench.serving import decode_file, prediction_columns
from workbench.store import RunStore
from workbench.train import EVAL_BATCH

# a decoded file's pixel value of full intensity; an image store's may differ (digits: 16)
FULL = 255.0


@dataclass
class Predictions:
    paths: list[str]
    proba: np.ndarray  # (images, classes), rows sum to 1
    label_index: np.ndarray  # (images,) the model's labels (hard votes: its tie rule)
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    digests: list[bytes] = field(default_factory=list)  # `pixel_digest` of each path's pixels

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
    digests: list[bytes] = []
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
        digests.append(pixel_digest(batch[-1]))
        if len(batch) == EVAL_BATCH:
            flush()
    flush()
    if not kept:
        raise DataError(f"none of the {len(files)} file(s) is an image: {skipped[0]}")
    proba = np.concatenate([p for p, _ in outs])
    labels = np.concatenate([lab for _, lab in outs])
    return Predictions(kept, proba, labels, list(model.classes), skipped, digests)


def pixel_digest(rgb: np.ndarray) -> bytes:
    """16 bytes of BLAKE2b over uint8 (H, W, 3) pixels and their shape: equal for a decoded file
    and an image store row (`store_rgb`) exactly when their pixels are equal."""
    h = hashlib.blake2b(str(rgb.shape).encode(), digest_size=16)
    h.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return h.digest()


def store_rgb(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Image store rows, uint8 (N, C, H, W) of full intensity `scale`, as a lossless file of
    them decodes: uint8 (N, H, W, 3) of full intensity 255 (rounded: digits' 8 of 16 is 128),
    one channel repeated thrice as the decoder repeats a grey file's."""
    if scale != FULL:
        pixels = np.rint(pixels.astype(np.float64) * (FULL / scale)).astype(np.uint8)
    rgb = pixels.transpose(0, 2, 3, 1)
    return np.repeat(rgb, 3, axis=3) if rgb.shape[3] == 1 else rgb


def held_out(cfg: StudyConfig) -> tuple[ImageData, Split] | None:
    """The study's image store and held-out split where `workbench study` left both, opened as
    they are (the source is neither read nor decoded); None where either is missing."""
    store = RunStore(cfg.out)
    split_file = store.file("split.npz")
    if not split_file.exists():
        return None
    for meta in sorted(store.images.glob("*.json")):  # one store, unless the source changed
        data = open_store(store.images, meta.stem)
        if data is None:
            continue
        try:  # the split made from this store's data; never a new split: the file exists
            groups = grouping(data, cfg)
            return data, load_or_make_split(data, cfg.data, cfg.seed, split_file, groups)
        except DataError:  # a store of other data than the split's
            continue
    return None


def are_test_rows(digests: list[bytes], data: ImageData, split: Split) -> np.ndarray:
    """Which of the predicted files (by their `pixel_digest`s) are rows of the test split: bool
    (files,). The test rows are read from the store EVAL_BATCH at a time."""
    held: set[bytes] = set()
    for i in range(0, len(split.test_idx), EVAL_BATCH):
        rows = data.pixels[split.test_idx[i : i + EVAL_BATCH]].numpy()
        held.update(pixel_digest(r) for r in store_rgb(rows, data.scale))
    return np.array([d in held for d in digests], dtype=bool)


def folder_labels(paths: list[str], classes: list[str]) -> list[str]:
    """Each file's class from the name of the folder it is in; an unknown name is an error."""
    truth = [Path(p).parent.name for p in paths]
    fix = "; put each image in a folder named after its class"
    _known(truth, classes, "--labels-from-folders: folder name(s)", fix)
    return truth


def table_labels(paths: list[str], manifest: Manifest, classes: list[str]) -> list[str]:
    """Each predicted file's class from the table that listed it; an unknown label is an error."""
    by_file = dict(zip(map(str, manifest.files), manifest.labels, strict=True))
    truth = [by_file[p] for p in paths]
    _known(truth, classes, f"--labels-from-table {manifest.table}: label(s)", "")
    return truth


def _known(truth: list[str], classes: list[str], what: str, fix: str) -> None:
    """A DataError naming the true labels that are no class of the model."""
    unknown = sorted(set(truth) - set(classes))
    if unknown:
        raise DataError(f"{what} {unknown} are not classes of the model {classes}{fix}")


def write_table(path: Path, cols: dict[str, list[object]]) -> Path:
    """CSV, or Parquet when the name ends in .parquet; written atomically."""
    import pandas as pd

    from workbench.files import atomic_write

    df = pd.DataFrame(cols)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda f: df.to_parquet(f, index=False))
    return atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode()))
