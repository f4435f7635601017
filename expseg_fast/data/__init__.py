"""Data: NIfTI in and out, datasets with a scan that reports every problem, the paper's
preprocessing and its exact inverse, a content-keyed cache, rigid augmentation on the device, splits."""

from expseg_fast.data.augment import AugmentConfig, augment
from expseg_fast.data.cache import Preprocessed, preprocess_pair
from expseg_fast.data.dataset import DatasetError, LabelMap, Pair, find_pairs, scan, validate
from expseg_fast.data.nifti import Volume, VolumeError, load_volume, save_volume
from expseg_fast.data.preprocess import (
    Resampling,
    apply_image,
    apply_labels,
    field_of_view,
    invert_labels,
    plan,
    write_prediction,
)
from expseg_fast.data.splits import random_splits

__all__ = [
    "AugmentConfig",
    "DatasetError",
    "LabelMap",
    "Pair",
    "Preprocessed",
    "Resampling",
    "Volume",
    "VolumeError",
    "apply_image",
    "augment",
    "apply_labels",
    "field_of_view",
    "find_pairs",
    "invert_labels",
    "load_volume",
    "plan",
    "preprocess_pair",
    "random_splits",
    "save_volume",
    "scan",
    "validate",
    "write_prediction",
]
