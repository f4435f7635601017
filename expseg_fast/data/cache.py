"""Preprocessed volumes cached on disk, keyed by the source files' content and the settings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expseg_fast.atomic import write_atomic
from expseg_fast.data.dataset import LabelMap, Pair
from expseg_fast.data.nifti import load_volume
from expseg_fast.data.preprocess import Resampling, apply_image, apply_labels, plan

# Bump when the preprocessing's output changes for the same inputs and settings.
PREPROCESS_VERSION = 1


@dataclass
class Preprocessed:
    """image (S, S, S) float32 normalised, labels (S, S, S) class indices, and the resampling that
    maps a prediction back onto the original grid (invert_labels)."""

    image: np.ndarray
    labels: np.ndarray
    resampling: Resampling


def _digest(pair: Pair, label_map: LabelMap, size: int) -> str:
    h = hashlib.sha256()
    for path in (pair.image, pair.label):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    settings = {"size": size, "names": label_map.names, "lookup": sorted(label_map.lookup.items()), "version": PREPROCESS_VERSION}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def preprocess_pair(pair: Pair, label_map: LabelMap, size: int, cache_dir: str | Path | None = None) -> Preprocessed:
    """The preprocessed pair, from the cache when its key (file contents + settings) is there."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_digest(pair, label_map, size)}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as stored:
                r = Resampling.from_dict(json.loads(str(stored["resampling"])))
                return Preprocessed(stored["image"], stored["labels"], r)
    image, label = load_volume(pair.image), load_volume(pair.label, dtype=np.int64)
    r = plan(image.data.shape, image.affine, size)
    result = Preprocessed(apply_image(image.data, r), apply_labels(label_map.apply(label.data), r), r)
    if path is not None:
        write_atomic(path, lambda tmp: np.savez(tmp, image=result.image, labels=result.labels,
                                                 resampling=json.dumps(r.to_dict())), ".npz")
    return result
