"""Image folders as people ship them: one subfolder per class, or split folders.

- Class folders: `root/<class>/<image>`, any depth below the class folder; the sorted folder
  names are the classes, as torchvision's ImageFolder reads them.
- Split folders: `root/train/<class>/<image>` and `root/test/...`, optionally `val/` (or `valid/`,
  `validation/`), the layout of most Kaggle sets. `test/` is the held-out split, as a torchvision
  dataset's own test set is; `val/` joins the training rows, where the CV folds replace it, unless
  data.val = "test" holds it out with `test/`. Every split must hold the same classes.

A folder whose subfolders are all split names is read as split folders, never as classes called
"train" and "test": a classifier of which split an image came from is never what was meant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.data.photos import Listing
from workbench.errors import DataError

# folder name -> split; the spellings torchvision, Kaggle and Hugging Face sets use
SPLITS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def image_extensions() -> set[str]:
    """The file extensions PIL can open (".jpg", ".png", ...), lower case."""
    from PIL import Image

    return set(Image.registered_extensions())


def list_folder(root: Path, val: str = "train") -> Listing:
    """The images below `root`, read as split folders when its subfolders are split names,
    else as class folders. `val`: data.val, where a val/ folder's rows go."""
    extensions = image_extensions()
    subfolders = _subfolders(root)
    if subfolders and all(d.name.lower() in SPLITS for d in subfolders):
        return _split_folders(root, subfolders, extensions, val)
    per_class = class_files(root, extensions)
    return _listing(root, {"": per_class}, f"folder:{root}", None)


def _subfolders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _split_folders(root: Path, subfolders: list[Path], extensions: set[str], val: str) -> Listing:
    by_split: dict[str, Path] = {}
    for d in subfolders:
        split = SPLITS[d.name.lower()]
        if split in by_split:
            raise DataError(
                f"image folder {root} has two {split} folders, {by_split[split].name}/ and "
                f"{d.name}/; keep one"
            )
        by_split[split] = d
    names = ", ".join(f"{d.name}/" for d in subfolders)
    if "train" not in by_split:
        raise DataError(
            f"image folder {root} holds the split folders {names} but no train/ folder; split "
            f"folders are {root}/train/<class>/<image> and {root}/test/<class>/<image> (val/ "
            f"optional)"
        )
    if val == "test" and "val" not in by_split:
        raise DataError(
            f'data.val = "test" holds out a val/ folder, but {root} has none (it holds {names}); '
            f"remove data.val"
        )
    per_split = {}
    for split, d in by_split.items():
        loose = [f for f in d.iterdir() if f.is_file() and f.suffix.lower() in extensions]
        if loose and not _subfolders(d):
            raise DataError(
                f"image folder {root}'s subfolders {names} are split names, so workbench reads "
                f"them as split folders, each holding one subfolder of images per class "
                f"({root}/{d.name}/<class>/<image>); but {d} holds {len(loose)} image file(s) and "
                f"no class folders. Put each split's images into class folders, or, if "
                f"{', '.join(s.name for s in subfolders)} are your classes, rename those folders"
            )
        per_split[split] = class_files(d, extensions)
    _same_classes(root, by_split, per_split)
    held = {"test"} | ({"val"} if val == "test" else set())
    order = [s for s in ("train", "val", "test") if s in per_split]
    where = f"folder:{root} (split folders {', '.join(by_split[s].name for s in order)})"
    # no test/ (and val/ not held out): the held-out split is drawn from every row
    return _listing(root, {s: per_split[s] for s in order}, where, held & set(order) or None)


def _same_classes(
    root: Path, folders: dict[str, Path], per_split: dict[str, dict[str, list[Path]]]
) -> None:
    train = set(per_split["train"])
    for split, classes in per_split.items():
        lacks, extra = sorted(train - set(classes)), sorted(set(classes) - train)
        said = [f"lacks {lacks}" * bool(lacks), f"has {extra}, which train/ lacks" * bool(extra)]
        if lacks or extra:
            raise DataError(
                f"the split folders of {root} must hold the same class folders, but "
                f"{folders[split].name}/ {' and '.join(s for s in said if s)}; train/ holds "
                f"{sorted(train)}"
            )


def _listing(
    root: Path, parts: dict[str, dict[str, list[Path]]], where: str, held: set[str] | None
) -> Listing:
    """One listing of `parts` ({split or "": {class: files}}); the rows of the splits in `held`
    are the source's test rows (None: the source has no test rows)."""
    classes = sorted(next(iter(parts.values())))
    files, labels, is_test = [], [], []
    for part, per_class in parts.items():
        for c in classes:
            files += per_class[c]
            labels += [classes.index(c)] * len(per_class[c])
            is_test += [held is not None and part in held] * len(per_class[c])
    return Listing(
        tuple(files),
        np.array(labels, np.int64),
        tuple(classes),
        tuple(f.relative_to(root).as_posix() for f in files),
        where,
        None if held is None else np.array(is_test, bool),
    )


def class_files(root: Path, extensions: set[str]) -> dict[str, list[Path]]:
    """{class name: sorted image files below its folder}; hidden files and other types skipped."""
    folders = _subfolders(root)
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in extensions]
    if not folders and loose:
        raise DataError(
            f"image folder {root} holds {len(loose)} image file(s) but no class subfolders; "
            f"data.source = 'folder' reads one subfolder of images per class "
            f"({root}/<class>/<image>): move each class's images into a folder named after it"
        )
    if len(folders) < 2:
        raise DataError(
            f"image folder {root} has {len(folders)} class subfolder(s) {[d.name for d in folders]}"
            f"; a classifier needs >= 2 (one subfolder of images per class)"
        )
    files = {}
    for d in folders:
        fs = sorted(
            f
            for f in d.rglob("*")
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
        )
        if not fs:
            raise DataError(f"class folder {d} holds no image files; add images or remove it")
        files[d.name] = fs
    return files
