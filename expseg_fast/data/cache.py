"""Preprocessed volumes cached on disk, keyed by the source files' content and the settings.

Each entry is a folder CACHE/KEY/ holding image.npy (S, S, S) float32 ((K, S, S, S) for K > 1
channels, each normalised on its own), labels.npy (S, S, S) uint8 (the class indices; int16 above 256
classes), resampling.json (how to map a prediction back onto the original grid), facts.json (the
original's voxel size, field of view, orientation, intensity range) and manifest.json, written last:
the SHA-256 of every other file, the arrays' shape and dtype, the labels' largest class and the image's
finiteness. The arrays are plain .npy files, so training reads them memory-mapped, one subject at a
time, and never holds the dataset in memory.

An entry appears whole or not at all (written in a temporary folder, then renamed), so an interrupted
preparation resumes where it stopped; a full disk is reported naming the file, and nothing half-written
stays. An entry is checked against its manifest before it is used: one that fails (a deleted or
truncated file, edited arrays, unreadable JSON) is rebuilt from its source files with a one-line note
naming it. Temporary folders of killed preparations are removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expseg_fast.atomic import TEMP_PREFIX, NoSpaceError, folder_mode, is_no_space
from expseg_fast.data.dataset import LabelMap, Pair
from expseg_fast.data.facts import VolumeFacts
from expseg_fast.data.nifti import load_volume
from expseg_fast.data.plans import Plan
from expseg_fast.data.preprocess import IGNORE, Resampling, apply_labels

# Bump when the preprocessing's output (or an entry's files) changes for the same inputs and settings.
PREPROCESS_VERSION = 5
ARRAYS = ("image.npy", "labels.npy")
ENTRY_FILES = (*ARRAYS, "resampling.json", "facts.json", "manifest.json")  # the manifest last
_TEMP_OWNER = f"{TEMP_PREFIX}{socket.gethostname()}-"  # + pid: whose temporary folder it is
_ORPHAN_AGE_S = 3600  # a temporary folder without an owner that old is left over from a killed preparation


@dataclass
class Preprocessed:
    """image (S, S, S) float32 normalised ((K, S, S, S) for K channels), labels (S, S, S) class indices,
    the resampling that maps a prediction back onto the original grid (invert_labels) and what the
    original is like. Arrays may be memory-mapped."""

    image: np.ndarray
    labels: np.ndarray
    resampling: Resampling
    facts: VolumeFacts


def _digest(pair: Pair, label_map: LabelMap, plan: Plan) -> str:
    h = hashlib.sha256()
    for path in (*pair.images, pair.label):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    settings = {"plan": plan.key(), "names": label_map.names, "lookup": sorted(label_map.lookup.items()),
                "version": PREPROCESS_VERSION}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def entry_path(pair: Pair, label_map: LabelMap, plan: Plan, cache_dir: str | Path) -> Path:
    """The cache folder of a pair's preprocessing (it may not exist yet)."""
    return Path(cache_dir) / _digest(pair, label_map, plan)


def read_entry(entry: Path, mmap: bool = True) -> Preprocessed:
    """A cache entry (checked beforehand with entry_problem); its arrays memory-mapped (read-only)
    unless mmap is False."""
    mode = "r" if mmap else None
    r = Resampling.from_dict(json.loads((entry / "resampling.json").read_text()))
    facts = read_facts(entry)
    return Preprocessed(np.load(entry / "image.npy", mmap_mode=mode), np.load(entry / "labels.npy", mmap_mode=mode), r,
                        facts)


def read_facts(entry: Path) -> VolumeFacts:
    """The entry's facts.json (its class volumes as a tuple, as VolumeFacts holds them)."""
    record = json.loads((entry / "facts.json").read_text())
    return VolumeFacts(**{**record, "class_ml": tuple(record.get("class_ml", ()))})


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def entry_problem(entry: Path, num_classes: int) -> str | None:
    """Why the cache entry cannot be used as it is ("missing" when it was never written), or None when
    every file is there and matches the manifest and the labels' range fits num_classes."""
    if not entry.exists():
        return "missing"
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        for name in ENTRY_FILES[:-1]:
            if not (entry / name).is_file():
                return f"{name} is missing"
            if _file_sha256(entry / name) != manifest["sha256"][name]:
                return f"{name} differs from what was written (damaged or edited)"
        for name in ARRAYS:
            array = np.load(entry / name, mmap_mode="r")
            if list(array.shape) != manifest[name]["shape"] or str(array.dtype) != manifest[name]["dtype"]:
                return f"{name} has shape {array.shape} {array.dtype}, not the manifest's"
        top = manifest["labels.npy"]["max"]
        if not (0 <= top < num_classes or top == IGNORE) or not manifest["image.npy"]["finite"]:
            return "its labels or intensities are out of range"
        Resampling.from_dict(json.loads((entry / "resampling.json").read_text()))
        read_facts(entry)
    except FileNotFoundError:
        return "manifest.json is missing (an entry of an older version, or damaged)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        return f"unreadable ({type(error).__name__}: {str(error)[:80]})"
    return None


def _manifest(entry: Path, result: Preprocessed) -> dict:
    image, labels = np.asarray(result.image), np.asarray(result.labels)
    return {"sha256": {name: _file_sha256(entry / name) for name in ENTRY_FILES[:-1]},
            "image.npy": {"shape": list(image.shape), "dtype": "float32", "finite": bool(np.isfinite(image).all())},
            "labels.npy": {"shape": list(labels.shape), "dtype": str(labels.dtype), "max": int(labels.max(initial=0))}}


def _save_files(folder: Path, result: Preprocessed) -> None:
    """The entry's files in folder, the manifest last (its own function: the fault-injection tests replace it)."""
    np.save(folder / "image.npy", np.ascontiguousarray(result.image, dtype=np.float32))
    np.save(folder / "labels.npy", np.ascontiguousarray(result.labels))
    (folder / "resampling.json").write_text(json.dumps(result.resampling.to_dict()))
    (folder / "facts.json").write_text(json.dumps(result.facts.to_dict()))
    (folder / "manifest.json").write_text(json.dumps(_manifest(folder, result)))


def _write_entry(entry: Path, result: Preprocessed, num_classes: int) -> None:
    """Writes the entry whole (a temporary folder, then a rename), replacing a broken one. NoSpaceError
    naming the file when the disk fills up; nothing half-written stays."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_OWNER}{os.getpid()}-", dir=entry.parent))
    try:
        os.chmod(tmp, folder_mode())
        try:
            _save_files(tmp, result)
        except OSError as error:
            if is_no_space(error):
                name = next((n for n in reversed(ENTRY_FILES) if (tmp / n).exists()), ENTRY_FILES[0])
                raise NoSpaceError(entry / name) from error
            raise
        if entry.exists():  # a broken entry: moved aside, then replaced
            stale = Path(tempfile.mkdtemp(prefix=f"{_TEMP_OWNER}{os.getpid()}-", dir=entry.parent))
            try:
                os.rename(entry, stale / "old")
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError as error:  # another process wrote the same entry first: keep theirs if it is good
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or entry_problem(entry, num_classes):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_orphans(cache_dir: Path) -> list[Path]:
    """Removes the temporary folders that killed preparations left in cache_dir (their process on this
    machine is gone, or, without an owner, they are an hour old); returns them."""
    removed = []
    for path in Path(cache_dir).glob(TEMP_PREFIX + "*"):
        owner = path.name[len(_TEMP_OWNER):].split("-", 1)[0] if path.name.startswith(_TEMP_OWNER) else ""
        if owner.isdigit():
            if _alive(int(owner)):
                continue
        elif path.name.startswith(_TEMP_OWNER) or time.time() - path.stat().st_mtime < _ORPHAN_AGE_S:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preprocess_pair(pair: Pair, label_map: LabelMap, plan: Plan, cache_dir: str | Path | None = None,
                    mmap: bool = False) -> Preprocessed:
    """The pair preprocessed as the plan's training grid says, from the cache when its key (file contents
    + settings) is there and the entry passes its check (written there otherwise; a broken entry is
    rebuilt with a note); mmap: return the cached arrays memory-mapped."""
    if cache_dir is None:
        return _preprocess(pair, label_map, plan)
    entry = entry_path(pair, label_map, plan, cache_dir)
    problem = entry_problem(entry, len(label_map.names))
    if problem is None:
        return read_entry(entry, mmap)
    if problem != "missing":
        print(broken_note(entry, pair, problem), file=sys.stderr, flush=True)
    return read_entry(build_entry(pair, label_map, plan, cache_dir), mmap)


def broken_note(entry: Path, pair: Pair, problem: str) -> str:
    """The one line that says a cache entry is rebuilt, naming it and its subject."""
    return f"note: cache entry {entry} (of {pair.label}) failed its check: {problem}; rebuilt from its source files"


def build_entry(pair: Pair, label_map: LabelMap, plan: Plan, cache_dir: str | Path) -> Path:
    """Preprocesses the pair and writes its cache entry (replacing a broken one); returns the entry's
    path alone, so a worker process sends nothing large back (read it with read_entry)."""
    entry = entry_path(pair, label_map, plan, cache_dir)
    _write_entry(entry, _preprocess(pair, label_map, plan), len(label_map.names))
    return entry


def _preprocess(pair: Pair, label_map: LabelMap, plan: Plan) -> Preprocessed:
    image, label = load_volume(pair.image, max_voxels=None), load_volume(pair.label, dtype=np.int64, max_voxels=None)
    classes = label_map.apply(label.data)
    r = plan.training_grid(image.data.shape, image.affine, classes)
    data = [image.data] + [load_volume(path, max_voxels=None).data for path in pair.more_channels]
    channels = plan.image(data, r)
    return Preprocessed(channels[0] if len(channels) == 1 else channels, apply_labels(classes, r), r,
                        VolumeFacts.of(image.data, image.affine, classes, len(label_map.names)))
