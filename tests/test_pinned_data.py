"""A run never trains or scores on other data than it started on (issue 21, items 1-3): it stores its
data's absolute location and identity and its split; resume and evaluate.py take the pinned subjects
(a missing or changed one is an error), new subjects are never used, the same scan under two names is
caught, and other data is scored only on purpose, saying so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_case, write_dataset

from expseg_fast import runlog
from expseg_fast.config import TrainConfig
from expseg_fast.data import DatasetError, LabelMap, find_pairs, load_volume, random_splits, save_volume, validate
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.training import train

SCRIPTS = Path(__file__).parents[1] / "scripts"
TIMING = ("seconds", "phase_seconds")


def tiny(out, data, label_map, epochs: int) -> TrainConfig:
    return TrainConfig(out=str(out), data=str(data), label_map=str(label_map), size=16, width=4, epochs=epochs,
                       deterministic=True, seed=1, loader_workers=0)


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in runlog.read_log(out / "log.jsonl")]


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Six cases, and an uninterrupted 3-epoch run on them (the figures every resumed run must equal)."""
    root = tmp_path_factory.mktemp("pinned")
    label_map = write_dataset(root / "data", 6)
    train(tiny(root / "full", root / "data", label_map, 3))
    return {"root": root, "data": root / "data", "map": label_map, "records": records(root / "full")}


def copy_data(reference: dict, to: Path) -> tuple[Path, Path]:
    shutil.copytree(reference["data"], to)
    return to, to / "map.json"


def pinned_names(out: Path, role: str) -> list[str]:
    return [s["name"] for s in json.loads((out / "splits.json").read_text())[role]["subjects"]]


def test_a_new_run_pins_todays_split_with_the_datas_identity(reference, tmp_path):
    data, label_map = copy_data(reference, tmp_path / "data")
    out = tmp_path / "run"
    train(tiny(out, data, label_map, 1))
    names = [p.label.name.split(".")[0] for p in find_pairs(data)]
    train_idx, val_idx = random_splits(6, 5, seed=1)[0]  # the split of an unchanged dataset is today's
    assert pinned_names(out, "train") == [names[i] for i in train_idx]
    assert pinned_names(out, "val") == [names[i] for i in val_idx]
    pin = json.loads((out / "splits.json").read_text())
    for role in ("train", "val"):
        assert pin[role]["root"] == str(data.resolve()) and pin[role]["label_map_file"] == str(label_map.resolve())
    digests = [d for s in pin["train"]["subjects"] + pin["val"]["subjects"] for d in (*s["images"], s["label"])]
    assert len(set(digests)) == len(digests) == 12 and all(len(d) == 64 for d in digests)


def test_relative_paths_are_never_reread_against_another_folder(reference, tmp_path, monkeypatch):
    """Trained with --data dR from folder A; resumed and evaluated from folder B, which holds another dR:
    both use A's data (today's code trained on B's and scored it)."""
    a, b = tmp_path / "a", tmp_path / "b"
    copy_data(reference, a / "dR")
    write_dataset(b / "dR", 6, seed=100)  # the same case names, other scans
    out = (tmp_path / "run").resolve()
    monkeypatch.chdir(a)
    train(tiny(out, "dR", "dR/map.json", 2))
    monkeypatch.chdir(b)
    done = run_script("train.py", "--out", str(out), "--resume", "--epochs", "3", cwd=b)
    assert done.returncode == 0, done.stderr
    assert records(out) == reference["records"]
    result = evaluate(out / "last.pt", device="cpu")
    np.testing.assert_allclose(np.nanmean(result.resampled, axis=0), reference["records"][-1]["val_dice_per_label"],
                               rtol=0, atol=1e-12)
    assert str((a / "dR").resolve()) in result.source


def test_resume_keeps_the_pinned_split_when_subjects_are_added(reference, tmp_path):
    data, label_map = copy_data(reference, tmp_path / "data")
    out = tmp_path / "run"
    train(tiny(out, data, label_map, 2))
    validation = pinned_names(out, "val")
    for i in (6, 7):
        write_case(data, f"c{i}", 50 + i)
    done = run_script("train.py", "--out", str(out), "--resume", "--epochs", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("2 subject(s) of") == 1 and "not used by this resumed run" in done.stdout
    assert records(out) == reference["records"]  # the same subjects, the same order, the same weights
    result = evaluate(out / "best.pt", device="cpu")
    assert [name.split("_0000")[0] for name in result.subjects] == validation


@pytest.mark.parametrize("damage", ["missing", "changed_labels", "changed_image", "label_map"])
def test_a_missing_or_changed_pinned_subject_is_an_error_naming_it(reference, tmp_path, damage):
    data, label_map = copy_data(reference, tmp_path / "data")
    out = tmp_path / "run"
    train(tiny(out, data, label_map, 1))
    victim = pinned_names(out, "val")[0]
    label_file = data / "labelsTr" / f"{victim}.nii.gz"
    if damage == "missing":
        label_file.unlink()
        (data / "imagesTr" / f"{victim}_0000.nii.gz").unlink()
        expected = f"{victim} (a validation subject of the run) is missing from {data.resolve()}"
    elif damage == "changed_labels":
        volume = load_volume(label_file, dtype=np.uint8)
        volume.data[0, 0, 0] = 2
        save_volume(label_file, volume.data, volume.affine)
        expected = f"{victim} (a validation subject of the run) has changed since the run started: labels"
    elif damage == "changed_image":
        image_file = data / "imagesTr" / f"{victim}_0000.nii.gz"
        volume = load_volume(image_file)
        save_volume(image_file, volume.data * 1.01, volume.affine)
        expected = "has changed since the run started: image channel 0"
    else:
        label_map.write_text(json.dumps({"classes": [{"name": "background", "ids": [0]}, {"name": "box", "ids": [1]},
                                                     {"name": "ball", "ids": [2, 3]}]}))
        expected = "the label map"
    with pytest.raises(ValueError, match="is not the data the run was trained on") as caught:
        train(tiny(out, data, label_map, 2), resume=True)
    assert expected in str(caught.value)
    with pytest.raises(ValueError, match="is not the data the run was trained on") as caught:
        evaluate(out / "last.pt", device="cpu")
    assert expected in str(caught.value)
    assert len(records(out)) == 1  # nothing of the run changed


def test_a_resumed_run_may_find_its_data_moved_if_the_content_is_the_same(reference, tmp_path):
    data, label_map = copy_data(reference, tmp_path / "data")
    out = tmp_path / "run"
    train(tiny(out, data, label_map, 2))
    moved = tmp_path / "moved"
    data.rename(moved)
    done = run_script("train.py", "--out", str(out), "--resume", "--epochs", "3", "--data", str(moved),
                      "--label-map", str(moved / "map.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"data={str(moved.resolve())!r} (the run has {str(data.resolve())!r})" in done.stdout
    assert records(out) == reference["records"]


def test_the_same_scan_under_two_case_names_is_reported(tmp_path):
    label_map = write_dataset(tmp_path, 3)
    original = load_volume(tmp_path / "imagesTr" / "c0_0000.nii.gz")
    save_volume(tmp_path / "imagesTr" / "c9_0000.nii", original.data.astype(np.float64), original.affine)  # re-saved
    shutil.copy(tmp_path / "labelsTr" / "c1.nii.gz", tmp_path / "labelsTr" / "c9.nii.gz")
    with pytest.raises(DatasetError) as caught:
        validate(find_pairs(tmp_path), LabelMap.from_json(label_map))
    assert caught.value.problems == [f"{tmp_path}/imagesTr/c9_0000.nii: the same image voxels as "
                                     f"{tmp_path}/imagesTr/c0_0000.nii.gz (one scan under two case names: one copy "
                                     f"could be trained on and the other validated on); remove one"]


def test_other_data_is_scored_on_purpose_and_said_so(reference, tmp_path):
    data, label_map = copy_data(reference, tmp_path / "data")
    out = tmp_path / "run"
    train(tiny(out, data, label_map, 1))
    other = tmp_path / "other"
    for role, new_name in (("val", "v_copy"), ("train", "t_copy")):
        name = pinned_names(out, role)[0]
        for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            (other / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(data / sub / f"{name}{suffix}", other / sub / f"{new_name}{suffix}")
    write_case(other, "unseen", 77)
    shutil.copy(label_map, other / "map.json")
    done = run_script("evaluate.py", str(out / "last.pt"), "--device", "cpu", "--data", str(other), "--label-map",
                      str(other / "map.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (f"data: {other.resolve()}: OTHER data than the run's, scored on purpose: 1 of the run's validation "
            f"subjects, 1 it never saw; 1 of its training subjects left out") in done.stdout
    result = evaluate(out / "last.pt", str(other), str(other / "map.json"), device="cpu")
    assert result.subjects == ["unseen_0000.nii.gz", "v_copy_0000.nii.gz"]
