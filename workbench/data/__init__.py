"""Data: four sources loaded as one tensor, the held-out split, CV folds, batch augmentation."""

from workbench.data.augment import augment_batch
from workbench.data.sources import ImageData, channel_stats, load_data
from workbench.data.splits import (
    Split,
    cv_folds,
    data_fingerprint,
    load_or_make_split,
    make_split,
)

__all__ = [
    "ImageData",
    "Split",
    "augment_batch",
    "channel_stats",
    "cv_folds",
    "data_fingerprint",
    "load_data",
    "load_or_make_split",
    "make_split",
]
