"""The study file's [data], [data.augment] and [cv] sections: where the images come from, how
they become pixels, and how the rows are split. workbench/config.py holds the other sections and
re-exports these; every key is declared here with its unit or meaning.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Frozen(BaseModel):
    # allow_inf_nan: TOML reads `inf` and `nan` as floats; no key of a study has a use for them
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class AugmentConfig(Frozen):
    """On-the-fly augmentation of training batches only (never validation or test rows).

    Any key may also be set or searched per model (`params` / `space`), like a [train] key."""

    # per image, torchvision.transforms.v2 (workbench/data/augment.py), in this order
    crop_scale: float = Field(1.0, gt=0.0, le=1.0)  # RandomResizedCrop area from this to 1; 1 = off
    rotation: float = Field(0.0, ge=0.0, le=180.0)  # RandomRotation by up to +- degrees
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)  # brightness, contrast, saturation strength
    auto_augment: Literal["none", "trivial", "rand"] = "none"  # TrivialAugmentWide, RandAugment
    erasing: float = Field(0.0, ge=0.0, le=1.0)  # RandomErasing probability per image
    # batched: one tensor op per batch, each image its own draw
    shift: int = Field(0, ge=0)  # max random translation in pixels (pad-and-crop); 0 = off
    hflip: bool = False  # random horizontal flips; wrong for digits, right for CIFAR
    # per batch, soft targets: one of the two at random when both are on
    mixup: float = Field(0.0, ge=0.0)  # MixUp's Beta(alpha, alpha); 0 = off (0.2 is usual)
    cutmix: float = Field(0.0, ge=0.0)  # CutMix's Beta(alpha, alpha); 0 = off (1.0 is usual)


class TableColumns(Frozen):
    """The columns of a `source = "table"` file (CSV or Parquet), by their header names."""

    path: str = Field(
        "path", min_length=1
    )  # image file: relative to the table's folder, or absolute
    label: str = Field("label", min_length=1)  # class name, read as text (any script, any spaces)
    # patient, part or animal: the splits never put one group's rows on both sides. The same as
    # `[cv] group_by` naming this column.
    group: str | None = Field(None, min_length=1)


PHOTOS = ("folder", "table")  # sources of image files of any size (decoded by data/photos.py)


class DataConfig(Frozen):
    source: Literal["digits", "idx", "torchvision", "folder", "table"] = "digits"
    # IDX folder, torchvision root, image folder or table (.csv, .parquet); `--data` overrides
    path: str | None = None
    dataset: str | None = None  # torchvision class name (MNIST, FashionMNIST, KMNIST, CIFAR10)
    test_size: float = Field(0.2, gt=0.0, lt=1.0)  # held-out fraction when the source has no own
    use_source_test: bool = True  # use the source's own test split where it has one
    # image folders and tables: every photo becomes image_size (an int: square; or [height,
    # width]) by resize_policy: "center_crop" (cover, then cut the centre) or "stretch"; unset:
    # every image must already have one size
    image_size: tuple[int, int] | None = Field(None, strict=False)
    resize_policy: Literal["center_crop", "stretch"] = "center_crop"
    on_bad_file: Literal["error", "skip"] = "error"  # an undecodable file: stop, or leave it out
    columns: TableColumns = TableColumns()  # source = "table": which column holds what
    suffix: str = ""  # source = "table": appended to a path without an extension, e.g. ".jpg"
    # split folders (train/, test/ and val/, valid/ or validation/): the val rows join the
    # training rows (the CV folds replace them), or with "test" they are held out with test/
    val: Literal["train", "test"] = "train"
    augment: AugmentConfig = AugmentConfig()

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        ok = isinstance(v, list | tuple) and len(v) == 2
        if v is not None and not (ok and all(isinstance(s, int) and s >= 1 for s in v)):
            raise ValueError("an int (a square) or [height, width], each >= 1, must be given")
        return v

    @field_validator("suffix")
    @classmethod
    def _dot(cls, v: str) -> str:
        if v and (not v.startswith(".") or "/" in v or len(v) < 2):
            raise ValueError("a file extension starting with a dot, like '.jpg', must be given")
        return v

    @model_validator(mode="after")
    def _keys_of_source(self) -> DataConfig:
        given = {k for k in ("columns", "suffix", "val") if getattr(self, k) != _DEFAULTS[k]}
        if self.image_size is not None and self.source not in PHOTOS:
            raise ValueError(
                f"`image_size` applies to data.source = 'folder' or 'table' (photos of any size), "
                f"but data.source = {self.source!r}; remove image_size"
            )
        for key in ("columns", "suffix"):
            if key in given and self.source != "table":
                raise ValueError(
                    f"`{key}` applies to data.source = 'table' (a CSV or Parquet file of images "
                    f"and labels), but data.source = {self.source!r}; remove {key}"
                )
        if "val" in given and self.source != "folder":
            raise ValueError(
                f"`val` applies to data.source = 'folder' with train/, val/ and test/ "
                f"subfolders, but data.source = {self.source!r}; remove val"
            )
        return self

    @property
    def size(self) -> tuple[int, int] | None:
        """image_size as (height, width)."""
        return self.image_size


_DEFAULTS = {k: DataConfig.model_fields[k].default for k in ("columns", "suffix", "val")}


class CVConfig(Frozen):
    folds: int = Field(5, ge=2)  # stratified k-fold on the training rows
    metric: Literal["accuracy", "log_loss"] = "accuracy"  # a trial's value: mean over folds
    # rows of one patient, part or animal stay on one side of the held-out split and of every
    # fold (stratified group splits): for a table, the name of a column; for an image folder, a
    # regular expression on each file's name whose first group (else its whole match) is the
    # group, e.g. "^(P\\d+)_"
    group_by: str | None = Field(None, min_length=1)


def pattern_problem(text: str) -> str | None:
    """Why `text` is not a usable file-name pattern for `cv.group_by`; None if it is."""
    try:
        re.compile(text)
    except re.error as e:
        return f"{text!r} is not a regular expression ({e})"
    return None
