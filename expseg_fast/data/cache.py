"""Preprocessed volumes cached on disk, keyed by the source files' content and the settings.

Each entry is a folder CACHE/KEY/ holding image.npy (S, S, S) float32 ((K, S, S, S) for K > 1
channels, each normalised on its own), labels.npy (S, S, S) uint8 (the class indices; int16 above 256
classes), resampling.json (how to map a prediction back onto the
original grid) and facts.json (the original's voxel size, field of view, orientation, intensity range). The arrays are plain .npy files, so training reads them memory-mapped, one subject at a
time, and never holds the dataset in memory. An entry appears whole or not at all (written in a
temporary folder, then renamed), so an interrupted preparation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expseg_fast.atomic import TEMP_PREFIX
from expseg_fast.data.dataset import LabelMap, Pair
from expseg_fast.data.facts import VolumeFacts
from expseg_fast.data.nifti import load_volume
from expseg_fast.data.preprocess import Resampling, apply_image, apply_labels, foreground_centre, plan, plan_spacing

# Bump when the preprocessing's output changes for the same inputs and settings.
PREPROCESS_VERSION = 3
ENTRY_FILES = ("image.npy", "labels.npy", "resampling.json", "facts.json")


@dataclass
class Preprocessed:
    """image (S, S, S) float32 normalised ((K, S, S, S) for K channels), labels (S, S, S) class indices, and the resampling that
    maps a prediction back onto the original grid (invert_labels). Arrays may be memory-mapped."""

    image: np.ndarray
    labels: np.ndarray
    resampling: Resampling
    facts: VolumeFacts


def _digest(pair: Pair, label_map: LabelMap, size: int, spacing_mm: float | None = None) -> str:
    h = hashlib.sha256()
    for path in (*pair.images, pair.label):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    settings = {"size": size, "names": label_map.names, "lookup": sorted(label_map.lookup.items()), "version": PREPROCESS_VERSION}
    if spacing_mm is not None:  # the `spacing` preprocessing (keys of `fit` entries stay as they were)
        settings["spacing_mm"] = spacing_mm
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def entry_path(pair: Pair, label_map: LabelMap, size: int, cache_dir: str | Path, spacing_mm: float | None = None) -> Path:
    """The cache folder of a pair's preprocessing (it may not exist yet)."""
    return Path(cache_dir) / _digest(pair, label_map, size, spacing_mm)


def read_entry(entry: Path, mmap: bool = True) -> Preprocessed:
    """A cache entry; its arrays memory-mapped (read-only) unless mmap is False."""
    mode = "r" if mmap else None
    r = Resampling.from_dict(json.loads((entry / "resampling.json").read_text()))
    facts = VolumeFacts(**json.loads((entry / "facts.json").read_text()))
    return Preprocessed(np.load(entry / "image.npy", mmap_mode=mode), np.load(entry / "labels.npy", mmap_mode=mode), r,
                        facts)


def _write_entry(entry: Path, result: Preprocessed) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=entry.parent))
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(result.image, dtype=np.float32))
        np.save(tmp / "labels.npy", np.ascontiguousarray(result.labels))
        (tmp / "resampling.json").write_text(json.dumps(result.resampling.to_dict()))
        (tmp / "facts.json").write_text(json.dumps(result.facts.to_dict()))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote the same entry first: keep theirs
            if not all((entry / name).exists() for name in ENTRY_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def preprocess_pair(pair: Pair, label_map: LabelMap, size: int, cache_dir: str | Path | None = None,
                    mmap: bool = False, spacing_mm: float | None = None) -> Preprocessed:
    """The preprocessed pair, from the cache when its key (file contents + settings) is there (and
    written there otherwise); mmap: return the cached arrays memory-mapped. spacing_mm: the `spacing`
    preprocessing (voxels of that size, the size^3 cube centred on the foreground) instead of `fit`."""
    entry = None
    if cache_dir is not None:
        entry = entry_path(pair, label_map, size, cache_dir, spacing_mm)
        if all((entry / name).exists() for name in ENTRY_FILES):
            return read_entry(entry, mmap)
    image, label = load_volume(pair.image), load_volume(pair.label, dtype=np.int64)
    if spacing_mm is None:
        r = plan(image.data.shape, image.affine, size)
    else:
        centre = foreground_centre(label_map.apply(label.data))
        r = plan_spacing(image.data.shape, image.affine, (size,) * 3, spacing_mm, centre)
    channels = [apply_image(image.data, r)] + [apply_image(load_volume(path).data, r) for path in pair.more_channels]
    result = Preprocessed(channels[0] if len(channels) == 1 else np.stack(channels),
                          apply_labels(label_map.apply(label.data), r), r, VolumeFacts.of(image.data, image.affine))
    if entry is not None:
        _write_entry(entry, result)
        if mmap:
            return read_entry(entry, mmap)
    return result
