"""What a hostile user tries next (issue 21, items 5 and 8 and the minor ones): memory bombs, a bad label
map beside bad data, tampered checkpoints, out-of-range options, thin scans, a full disk under
segment.py. Each is one clear line naming the file or option; nothing is half-done, nothing crashes."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import write_dataset
from scipy.spatial.transform import Rotation

from expseg_fast import atomic
from expseg_fast.checkpoint import load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.data import DatasetError, find_pairs, load_volume, save_volume
from expseg_fast.data.preprocess import plan_spacing_whole
from expseg_fast.data.source import DataLocation, open_dataset
from expseg_fast.inference.files import SegmentationError, segment
from expseg_fast.training import train

SCRIPTS = Path(__file__).parents[1] / "scripts"
FP32 = ("--precision", "fp32")  # the scripts' preset follows the machine


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=600)


def tiny(out: Path, data: Path, epochs: int = 1, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), data=str(data), label_map=str(data / "map.json"), size=16, width=4,
                                 epochs=epochs, deterministic=True, seed=3, loader_workers=0), **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished 1-epoch run in each preprocessing mode on 12^3 scans of 2 mm (their folders)."""
    root = tmp_path_factory.mktemp("bad_input")
    write_dataset(root / "data", 4)
    out = {"fit": root / "fit", "spacing": root / "spacing"}
    train(tiny(out["fit"], root / "data"))
    train(tiny(out["spacing"], root / "data", preprocessing="spacing", spacing_mm=2.0))
    return out


def header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A small .nii.gz whose header declares `shape` (uint8) and whose data stops after 1 KiB: what a
    user sees of a gzip bomb before reading it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024))


# --- item 5: resources bounded before reading or resampling -------------------------------------------


def test_segment_refuses_volumes_past_the_voxel_bound_and_writes_the_others(runs, tmp_path):
    scans = tmp_path / "scans"
    scan = load_volume(runs["fit"].parent / "data" / "imagesTr" / "c0_0000.nii.gz")
    save_volume(scans / "a_good.nii.gz", scan.data, scan.affine)
    header_only(scans / "b_bomb.nii.gz", (1200, 1200, 1200))  # 1.7 G voxels declared in a 1 KB file
    save_volume(scans / "c_big.nii.gz", np.zeros((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1]))
    save_volume(scans / "d_good.nii.gz", scan.data, scan.affine)
    done = run_script("segment.py", str(runs["fit"] / "best.pt"), str(scans), str(tmp_path / "out"),
                      "--max-voxels", "50000")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert f"  {scans / 'b_bomb.nii.gz'}: declares 1200x1200x1200 = 1.73e+09 voxels is more than the limit of 5e+04 " \
           f"(raise it with --max-voxels if the memory is there)" in lines
    assert f"  {scans / 'c_big.nii.gz'}: declares 40x40x40 = 6.4e+04 voxels is more than the limit of 5e+04 " \
           f"(raise it with --max-voxels if the memory is there)" in lines
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_good.nii.gz", "d_good.nii.gz"]
    done = run_script("segment.py", str(runs["fit"] / "best.pt"), str(scans / "b_bomb.nii.gz"), str(tmp_path / "o2"))
    assert done.returncode == 1 and "declares 1200x1200x1200" in done.stderr and "limit of 1.34e+08" in done.stderr


def test_segment_bounds_the_resampled_grid_of_a_scan_with_huge_voxels(runs, tmp_path):
    """A 15 KB scan that declares 200 mm voxels: spacing mode would resample it onto a 1200^3 grid."""
    scans = tmp_path / "scans"
    save_volume(scans / "huge_voxels.nii.gz", np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32),
                np.diag([200.0, 200.0, 200.0, 1]))
    scan = load_volume(runs["spacing"].parent / "data" / "imagesTr" / "c1_0000.nii.gz")
    save_volume(scans / "z_good.nii.gz", scan.data, scan.affine)
    with pytest.raises(SegmentationError) as caught:
        segment(runs["spacing"] / "best.pt", scans, tmp_path / "out", device="cpu")
    assert caught.value.problems == [f"{scans / 'huge_voxels.nii.gz'}: resampled to 2 mm voxels, a grid of "
                                     f"1200x1200x1200 = 1.73e+09 voxels is more than the limit of 1.34e+08 (raise it "
                                     f"with --max-voxels if the memory is there)"]
    assert caught.value.written == [tmp_path / "out" / "z_good.nii.gz"]


def test_the_dataset_scan_reports_a_bomb_with_the_other_problems(tmp_path):
    write_dataset(tmp_path / "data", 3)
    header_only(tmp_path / "data" / "imagesTr" / "c1_0000.nii.gz", (1200, 1200, 1200))
    (tmp_path / "data" / "labelsTr" / "c2.nii.gz").unlink()
    with pytest.raises(DatasetError) as caught:
        open_dataset(DataLocation(str(tmp_path / "data"), str(tmp_path / "data" / "map.json")))
    lines = caught.value.problems
    assert any("c1_0000.nii.gz: declares 1200x1200x1200" in line and "more than the limit" in line for line in lines)
    assert any("c2_0000.nii.gz: no label file" in line for line in lines) and len(lines) == 2


# --- item 8: a bad label map hides nothing ------------------------------------------------------------


def test_a_bad_label_map_is_reported_with_the_datas_problems(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 4)
    (data / "map.json").write_text(json.dumps({"classes": [{"name": "bg", "ids": [0]}, {"name": "x", "ids": [1.5]}]}))
    (data / "labelsTr" / "c0.nii.gz").unlink()  # a missing partner
    shutil.copy(data / "imagesTr" / "c1_0000.nii.gz", data / "imagesTr" / "c9_0000.nii.gz")  # the same scan twice
    shutil.copy(data / "labelsTr" / "c1.nii.gz", data / "labelsTr" / "c9.nii.gz")
    with pytest.raises(DatasetError) as caught:
        open_dataset(DataLocation(str(data), str(data / "map.json")))
    lines = caught.value.problems
    assert len(lines) == 3, lines
    assert "map.json: not a label map (class 'x': id 1.5 is not an integer)" in lines[0]
    assert lines[1].endswith("c0_0000.nii.gz: no label file in " + str(data / "labelsTr"))
    assert "c9_0000.nii.gz: the same image voxels as" in lines[2]


# --- minor items -------------------------------------------------------------------------------------


def test_deeply_nested_json_is_one_line(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 3)
    deep = "[" * 100000 + "]" * 100000
    (tmp_path / "list.json").write_text(deep)
    (tmp_path / "map.json").write_text(deep)
    for args, line in [(("--data", str(data), "--label-map", str(tmp_path / "map.json")),
                        f"{tmp_path / 'map.json'}: not a label map (nested too deeply to read)"),
                       (("--data", str(tmp_path / "list.json"), "--label-map", str(data / "map.json")),
                        f"{tmp_path / 'list.json'}: cannot read the image/label list (nested too deeply)")]:
        done = run_script("train.py", "--out", str(tmp_path / "run"), *args, "--size", "16", *FP32)
        assert done.returncode == 1 and "Traceback" not in done.stderr and line in done.stderr, done.stderr


@pytest.mark.parametrize("tamper, why", [({"size": 4096}, "size^3 must be at most max_voxels"),
                                         ({"spacing_mm": -1.0}, "spacing_mm must be a finite number > 0, got -1.0"),
                                         ({"width": "wide"}, "width must be of type int, got 'wide'"),
                                         ({"fuse_levels": [7]}, "fuse_levels must be some of 0, 1, 2, 3")])
def test_a_checkpoint_with_a_tampered_configuration_is_refused_in_one_line(runs, tmp_path, tamper, why):
    state = load_checkpoint(runs["fit"] / "best.pt")
    state["config"] = json.dumps({**json.loads(state["config"]), **tamper})
    torch.save(state, tmp_path / "tampered.pt")
    scans = tmp_path / "scans"
    shutil.copytree(runs["fit"].parent / "data" / "imagesTr", scans)
    for script, args in [("segment.py", (str(scans), str(tmp_path / "out"))), ("evaluate.py", ()),
                         ("export_model.py", (str(tmp_path / "out.pt"),))]:
        done = run_script(script, str(tmp_path / "tampered.pt"), *args)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"{tmp_path / 'tampered.pt'}: its stored configuration is unreadable or invalid (" in done.stderr
        assert why in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pt").exists()


def test_an_exported_copy_asks_for_its_data_in_one_line(runs, tmp_path):
    """An inference-only copy names its run's dataset by folder name only, which may well exist where it is
    run (here: a folder `data` beside the copy, not the run's): it is never guessed, --data is asked for."""
    copy = tmp_path / "copy.pt"
    assert run_script("export_model.py", str(runs["fit"] / "best.pt"), str(copy)).returncode == 0
    write_dataset(tmp_path / "data", 3)
    done = subprocess.run([sys.executable, str(SCRIPTS / "evaluate.py"), str(copy)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.strip() == (f"error: {copy}: an inference-only copy names its run's data by folder name only "
                                   f"(data); score it with --data FOLDER --label-map MAP")
    given = run_script("evaluate.py", str(copy), "--data", str(runs["fit"].parent / "data"), "--label-map",
                       str(runs["fit"].parent / "data" / "map.json"))
    assert given.returncode == 0 and "OTHER data than the run's" in given.stdout, given.stderr


def test_class_names_that_do_not_fit_the_weights_are_refused_in_one_line(runs, tmp_path):
    state = load_checkpoint(runs["fit"] / "best.pt")
    state["class_names"] = state["class_names"] + ["extra"]
    torch.save(state, tmp_path / "tampered.pt")
    done = run_script("segment.py", str(tmp_path / "tampered.pt"), str(tmp_path), str(tmp_path / "out"))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "its weights, class names or records do not fit its configuration" in done.stderr


@pytest.mark.parametrize("option, value, line", [
    ("--limit-subjects", "-1", "limit_subjects must be >= 2 (a training and a validation subject), got -1"),
    ("--spacing-mm", "inf", "spacing_mm must be a finite number > 0, got inf"),
    ("--lr", "nan", "lr must be a finite number > 0, got nan"),
    ("--eps", "-1", "eps must be a finite number > 0, got -1.0"),
    ("--max-voxels", "0", "max_voxels must be >= 1, got 0"),
    ("--lr-schedule", "cosine", "argument --lr-schedule: invalid choice: 'cosine' (choose from"),
    ("--norm", "group", "argument --norm: invalid choice: 'group' (choose from"),
])
def test_option_errors_come_before_anything_is_read_or_written(tmp_path, option, value, line):
    data = tmp_path / "data"
    write_dataset(data, 3)
    done = run_script("train.py", "--out", str(tmp_path / "run"), "--data", str(data), "--label-map",
                      str(data / "map.json"), "--size", "16", *FP32, option, value)
    assert done.returncode == 2 and line in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run folder, no cache


def test_a_resumed_runs_differences_come_before_any_preprocessing(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["fit"], out)
    done = run_script("train.py", "--out", str(out), "--resume", "--size", "32")
    assert done.returncode == 1 and "size=32 (the run has 16)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing preprocessed at the new size


def test_a_thin_scan_gets_the_range_warning(runs, tmp_path):
    """Trained on 24 mm cubes; a scan 3 slices thick survives the resampling but lies far outside."""
    scans = tmp_path / "scans"
    scan = load_volume(runs["fit"].parent / "data" / "imagesTr" / "c0_0000.nii.gz")
    save_volume(scans / "thin.nii.gz", scan.data[:, :, 4:7], scan.affine)
    save_volume(scans / "whole.nii.gz", scan.data, scan.affine)
    done = run_script("segment.py", str(runs["fit"] / "best.pt"), str(scans), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines()  # the range's, not the barely trained model's prediction's
                if line.startswith("warning:") and "the predicted structures" not in line]
    assert warnings == [f"warning: {scans / 'thin.nii.gz'}: thinnest extent 6 mm lies far outside the training "
                        f"data's 24 to 24 mm; the segmentation may be poor"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit makes the TorchScript file
def test_refusing_a_file_never_suggests_loading_it_unsafely(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, why in (("script.pt", "a TorchScript archive, not a checkpoint"),
                      ("text.pt", "not a PyTorch checkpoint file, or a truncated one")):
        done = run_script("segment.py", str(tmp_path / name), str(tmp_path), str(tmp_path / "out"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: {tmp_path / name}: not a loadable expseg_fast checkpoint (refused: {why}")
        assert "weights_only" not in done.stderr and "Warning" not in done.stderr


def test_divergence_before_the_first_checkpoint_says_so_without_a_torch_warning(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 4)
    done = run_script("train.py", "--out", str(tmp_path / "run"), "--data", str(data), "--label-map",
                      str(data / "map.json"), "--size", "16", "--width", "4", *FP32, "--lr", "1e12")
    assert done.returncode == 1 and "Warning" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: epoch 1, step ")
    assert "the run diverged; no checkpoint was written yet; try a lower --lr" in done.stderr


def test_an_oblique_affine_plans_the_grid_a_straight_one_does():
    for degrees in range(90):
        affine = np.eye(4)
        affine[:3, :3] = Rotation.from_euler("z", degrees, degrees=True).as_matrix() * 3.0
        assert plan_spacing_whole((32, 32, 32), affine, 16, 3.0).target_shape == (32, 32, 32), degrees


def test_segment_on_a_full_disk_names_every_file_it_could_not_write(runs, tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    shutil.copytree(runs["fit"].parent / "data" / "imagesTr", scans)
    real = atomic.os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(SegmentationError) as caught:
        segment(runs["fit"] / "best.pt", scans, tmp_path / "out", device="cpu")
    monkeypatch.setattr(atomic.os, "replace", real)
    names = [p.name for p in sorted(scans.iterdir())] + ["class_names.json"]
    assert caught.value.problems == [f"no space left on device while writing {tmp_path / 'out' / n}" for n in names]
    assert caught.value.written == [] and not list((tmp_path / "out").iterdir())
    assert len(find_pairs(runs["fit"].parent / "data")) == 4  # the inputs untouched
