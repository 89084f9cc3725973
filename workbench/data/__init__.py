"""Data: sources decoded once into a uint8 image store, row views, split, folds, augmentation."""

from workbench.data.augment import V2_KEYS, augment_batch, batch_mixer, per_image
from workbench.data.groups import Grouping, grouping
from workbench.data.images import ImageData, Rows, channel_stats
from workbench.data.imagestore import load_data
from workbench.data.splits import (
    Split,
    cv_folds,
    data_fingerprint,
    load_or_make_split,
    make_split,
)

__all__ = [
    "V2_KEYS",
    "Grouping",
    "ImageData",
    "Rows",
    "Split",
    "augment_batch",
    "batch_mixer",
    "channel_stats",
    "cv_folds",
    "data_fingerprint",
    "grouping",
    "load_data",
    "load_or_make_split",
    "make_split",
    "per_image",
]
