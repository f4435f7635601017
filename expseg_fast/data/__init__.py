"""Data: NIfTI in and out, datasets with a scan that reports every problem, the paper's
preprocessing and its exact inverse."""

from expseg_fast.data.dataset import DatasetError, LabelMap, Pair, find_pairs, scan, validate
from expseg_fast.data.nifti import Volume, VolumeError, load_volume, save_volume
from expseg_fast.data.preprocess import Resampling, apply_image, apply_labels, field_of_view, invert_labels, plan

__all__ = [
    "DatasetError",
    "LabelMap",
    "Pair",
    "Resampling",
    "Volume",
    "VolumeError",
    "apply_image",
    "apply_labels",
    "field_of_view",
    "find_pairs",
    "invert_labels",
    "load_volume",
    "plan",
    "save_volume",
    "scan",
    "validate",
]
