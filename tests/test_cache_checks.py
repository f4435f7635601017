"""The preprocessed cache checks itself (issue 21, items 4, 6, 7): an entry that fails its manifest is
rebuilt from its source files with a note naming it, never used; a full disk names the file and keeps
nothing half-written; killed preparations leave nothing behind; entries are readable to the group."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

from expseg_fast.atomic import TEMP_PREFIX
from expseg_fast.config import TrainConfig
from expseg_fast.data import LabelMap, find_pairs
from expseg_fast.data import cache as cache_module
from expseg_fast.data.cache import ENTRY_FILES, entry_path, read_entry
from expseg_fast.data.loader import prepare
from expseg_fast.data.plans import FitPlan
from expseg_fast.training import train
from expseg_fast.training.run_folder import RunError

SCRIPTS = Path(__file__).parents[1] / "scripts"


def dataset(tmp_path: Path, n: int = 3):
    label_map = LabelMap.from_json(write_dataset(tmp_path / "data", n))
    return find_pairs(tmp_path / "data"), label_map


def arrays(entry: Path) -> tuple[np.ndarray, np.ndarray]:
    sample = read_entry(entry, mmap=False)
    return sample.image, sample.labels


def _labels_out_of_range(entry: Path) -> None:
    labels = np.load(entry / "labels.npy", mmap_mode="r+")
    labels[0, 0, 0] = 200  # an id no class has: today's label counts silently drop it
    labels.flush()


def _nan_image(entry: Path) -> None:
    image = np.load(entry / "image.npy", mmap_mode="r+")
    image[3, 3, 3] = np.nan
    image.flush()


def _truncate_image(entry: Path) -> None:
    data = (entry / "image.npy").read_bytes()
    (entry / "image.npy").write_bytes(data[: len(data) // 2])


def _reshape_labels(entry: Path) -> None:
    np.save(entry / "labels.npy", np.zeros((4, 4, 4), np.uint8))


DAMAGE = {
    "labels out of range": (_labels_out_of_range, "labels.npy differs from what was written"),
    "NaN image": (_nan_image, "image.npy differs from what was written"),
    "truncated image": (_truncate_image, "image.npy differs from what was written"),
    "labels of another shape": (_reshape_labels, "labels.npy differs from what was written"),
    "deleted facts": (lambda e: (e / "facts.json").unlink(), "facts.json is missing"),
    "deleted manifest": (lambda e: (e / "manifest.json").unlink(), "manifest.json is missing"),
    "corrupt resampling": (lambda e: (e / "resampling.json").write_text("{not json"), "resampling.json differs"),
    "deeply nested manifest": (lambda e: (e / "manifest.json").write_text("[" * 100000 + "]" * 100000),
                               "unreadable (RecursionError"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_rebuilt_with_a_note_naming_it(tmp_path, capsys, damage):
    pairs, label_map = dataset(tmp_path)
    entries = prepare(pairs, label_map, FitPlan(16), tmp_path / "cache", workers=1, report=False)
    before = arrays(entries[1])
    harm, why = DAMAGE[damage]
    harm(entries[1])
    capsys.readouterr()
    assert prepare(pairs, label_map, FitPlan(16), tmp_path / "cache", workers=1, report=False) == entries
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: cache entry {entries[1]} (of {pairs[1].label}) failed its "
                                               f"check: ")
    assert why in err[0] and err[0].endswith("rebuilt from its source files")
    after = arrays(entries[1])
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert sorted(p.name for p in entries[1].iterdir()) == sorted(ENTRY_FILES)
    assert not list((tmp_path / "cache").glob(TEMP_PREFIX + "*"))
    prepare(pairs, label_map, FitPlan(16), tmp_path / "cache", workers=1, report=False)  # whole again: no note
    assert capsys.readouterr().err == ""


def test_a_run_never_trains_on_a_damaged_entry(tmp_path, capsys):
    """A validation subject's labels.npy with an out-of-range id: today's trainer validated on it with
    exit 0. The resumed run notes and rebuilds it, and its log equals an undamaged run's."""
    label_map = write_dataset(tmp_path / "data", 5)

    def config(out, epochs):
        return TrainConfig(out=str(out), data=str(tmp_path / "data"), label_map=str(label_map), size=16, width=4,
                           epochs=epochs, deterministic=True, seed=2, loader_workers=0)

    train(config(tmp_path / "clean", 2))
    train(config(tmp_path / "damaged", 1))
    pin = json.loads((tmp_path / "damaged" / "splits.json").read_text())
    pairs = find_pairs(tmp_path / "data")
    victim = next(p for p in pairs if p.label.name == f"{pin['val']['subjects'][0]['name']}.nii.gz")
    entry = entry_path(victim, LabelMap.from_json(label_map), FitPlan(16), tmp_path / "cache")
    _labels_out_of_range(entry)
    capsys.readouterr()
    train(config(tmp_path / "damaged", 2), resume=True)
    assert f"note: cache entry {entry} (of {victim.label}) failed its check" in capsys.readouterr().err
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "phase_seconds")}  # noqa: E731
                         for line in (out / "log.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "damaged") == strip(tmp_path / "clean")


def test_a_full_disk_while_preparing_names_the_file_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    label_map = write_dataset(tmp_path / "data", 6)
    config = TrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "data"), label_map=str(label_map), size=16,
                         width=4, epochs=1, loader_workers=0)
    real = cache_module._save_files

    def disk_fills_up(folder, result):
        np.save(folder / "image.npy", np.asarray(result.image)[:2])  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_save_files", disk_fills_up)  # in the forked workers too
    with pytest.raises(RunError, match=r"^no space left on device while writing .*/cache/[0-9a-f]{64}/image\.npy; "
                                       r"nothing half-written was kept: free some space and run again$"):
        train(config)
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir()]  # no entry, no temporary folder
    monkeypatch.setattr(cache_module, "_save_files", real)
    train(config)  # space freed: the run starts
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 6


def test_temporary_folders_of_killed_preparations_are_removed(tmp_path, capsys):
    pairs, label_map = dataset(tmp_path)
    cache = tmp_path / "cache"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = cache / f"{TEMP_PREFIX}{host}-{int(gone.stdout)}-abc"  # its process has ended
    alive = cache / f"{TEMP_PREFIX}{host}-{os.getpid()}-def"  # a preparation still at work
    old = cache / f"{TEMP_PREFIX}k2j3h4"  # an owner-less one (earlier versions), hours old
    fresh = cache / f"{TEMP_PREFIX}x9y8z7"
    for folder in (dead, alive, old, fresh):
        folder.mkdir(parents=True)
        (folder / "image.npy").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    prepare(pairs, label_map, FitPlan(16), cache, workers=1, report=False)
    assert not dead.exists() and not old.exists() and alive.exists() and fresh.exists()
    out = capsys.readouterr().out
    assert f"removed {dead} (left by an interrupted preparation)" in out and f"removed {old}" in out


def test_entries_get_the_permissions_a_plain_mkdir_would(tmp_path):
    pairs, label_map = dataset(tmp_path, 2)
    entries = prepare(pairs, label_map, FitPlan(16), tmp_path / "cache", workers=1, report=False)
    (tmp_path / "plain").mkdir()
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert [e.stat().st_mode & 0o777 for e in entries] == [expected] * 2


def test_a_cache_path_that_is_a_file_is_one_line(tmp_path):
    write_dataset(tmp_path / "data", 3)
    (tmp_path / "cache").write_text("not a folder")
    done = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), "--out", str(tmp_path / "run"), "--data",
                           str(tmp_path / "data"), "--label-map", str(tmp_path / "data" / "map.json"), "--size", "16",
                           "--width", "4", "--epochs", "1", "--precision", "fp32"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1 and done.stderr.strip() == (f"error: {tmp_path / 'cache'}: exists and is not a folder; "
                                                            f"the preprocessed cache is kept there: move the file away")
    assert (tmp_path / "cache").read_text() == "not a folder"
