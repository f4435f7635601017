"""What a hostile user found wrong with exit status 0 (issue 33), each now right: protocols without
background or with empty classes, .mgz in and out, non-scans, export of a refused checkpoint, a broken
stored plan, --preset or a new --val-data on a resumed run, and stray labels in training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from expseg_fast.checkpoint import load_checkpoint, save_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.data import load_volume, save_volume
from expseg_fast.data.anatomy import COLIN27
from expseg_fast.data.facts import class_volumes_ml, composition
from expseg_fast.data.preprocess import IGNORE
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.inference.files import load_model, segment
from expseg_fast.inference.plausibility import intensity_note, prediction_note
from expseg_fast.losses import LossSpec, exp_log_loss
from expseg_fast.models.explog_net import ExpLogNet, NetConfig
from expseg_fast.training import train
from expseg_fast.training.step import TrainStep
from tests.helpers import one_epoch_run

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-epoch run (its folder) on 8 generated cases (background, box, ball at 2 mm), in data/."""
    return one_epoch_run(tmp_path_factory.mktemp("hostile"), 8, seed=3)


def protocol(path: Path, classes: list[dict]) -> str:
    path.write_text(json.dumps({"classes": classes, "unlisted": "ignore"}))
    return str(path)


# 1, 2: protocols


def test_a_protocol_without_background_is_refused_naming_it(run, tmp_path):
    """Without background the voxels where no structure is were never scored (every Dice inflated, and the
    lacking background took column -1, ball's)."""
    nobg = protocol(tmp_path / "nobg.json", [{"name": "box", "ids": [1]}, {"name": "ball", "ids": [2]}])
    with pytest.raises(ValueError, match=r"nobg\.json: lists no ids for the model's class 0, 'background'"):
        evaluate(run / "last.pt", str(run.parent / "data"), nobg, device="cpu")
    empty = protocol(tmp_path / "empty_bg.json", [{"name": "background", "ids": []}, {"name": "box", "ids": [1]}])
    with pytest.raises(ValueError, match="lists no ids for the model's class 0"):
        evaluate(run / "last.pt", str(run.parent / "data"), empty, device="cpu")


def test_a_class_listed_without_ids_is_not_in_the_data_never_a_zero(run, tmp_path):
    full = protocol(tmp_path / "full.json", [{"name": "background", "ids": [0]}, {"name": "box", "ids": [1]},
                                             {"name": "ball", "ids": [2]}])
    no_ball = protocol(tmp_path / "no_ball.json", [{"name": "background", "ids": [0]}, {"name": "box", "ids": [1]},
                                                   {"name": "ball", "ids": []}])
    data = str(run.parent / "data")
    scored, lacking = (evaluate(run / "last.pt", data, m, device="cpu") for m in (full, no_ball))
    assert lacking.not_in_protocol == ["ball"] and scored.not_in_protocol == []
    assert np.isnan(lacking.original[:, 1]).all() and np.isnan(lacking.resampled[:, 1]).all()
    assert np.isfinite(lacking.original[:, 0]).all() and np.isfinite(scored.original).all()
    assert lacking.average(lacking.original)[1] == pytest.approx(100 * lacking.original[:, 0].mean())


# 3: MGH/MGZ in and out


def test_mgz_files_and_folders_are_segmented_into_mgz_and_scanned_as_datasets(run, tmp_path):
    case = run.parent / "data" / "imagesTr" / "c0_0000.nii.gz"
    volume = load_volume(case)
    (tmp_path / "in").mkdir()
    save_volume(tmp_path / "in" / "c0.mgz", volume.data, volume.affine)
    assert isinstance(nib.load(tmp_path / "in" / "c0.mgz"), nib.MGHImage)
    [single] = segment(run / "last.pt", tmp_path / "in" / "c0.mgz", tmp_path / "one", device="cpu")
    [nifti] = segment(run / "last.pt", case, tmp_path / "nii", device="cpu")
    [folder] = segment(run / "last.pt", tmp_path / "in", tmp_path / "folder", device="cpu")
    assert single.name == folder.name == "c0.mgz"
    for written in (single, folder):
        image = nib.load(written)  # MGH bytes under the .mgz name
        assert isinstance(image, nib.MGHImage)
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(nib.load(nifti).dataobj))
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-5)
    # a dataset of .mgz files is scanned and scored like its NIfTI twin
    mgz = tmp_path / "mgz_data"
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted((run.parent / "data" / sub).glob("*.nii.gz")):
            v = load_volume(path, dtype=np.int64 if sub == "labelsTr" else np.float32)
            save_volume(mgz / sub / path.name.replace(".nii.gz", ".mgz"), v.data, v.affine)
    twin = evaluate(run / "last.pt", str(run.parent / "data"), str(run.parent / "data" / "map.json"), device="cpu")
    got = evaluate(run / "last.pt", str(mgz), str(run.parent / "data" / "map.json"), device="cpu")
    assert got.subjects == [s.replace(".nii.gz", ".mgz") for s in twin.subjects]
    np.testing.assert_allclose(got.original, twin.original, atol=1e-12)


def test_a_file_of_another_format_name_is_refused_in_one_line(run, tmp_path):
    odd = tmp_path / "scan.img"
    odd.write_bytes((run.parent / "data" / "imagesTr" / "c0_0000.nii.gz").read_bytes())
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "segment.py"), str(run / "last.pt"), str(odd),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "scan.img: not a volume file name" in done.stderr and not (tmp_path / "out" / "scan.img").exists()
    with pytest.raises(ValueError, match="not a volume file name"):
        save_volume(tmp_path / "labels.img", np.zeros((2, 2, 2), np.uint8), np.eye(4))


# 4: inputs that are not scans


def smooth_field(shape, seed: int) -> np.ndarray:
    """A correlated random image (what a real scan is like to the intensity check)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 100 + 50


def test_the_intensity_check_names_constant_few_valued_and_noise_images_only():
    rng = np.random.default_rng(0)
    assert "constant image" in intensity_note(np.full((20, 20, 20), 7.0, np.float32))
    assert "4 distinct intensities" in intensity_note(rng.integers(0, 4, (20, 20, 20)).astype(np.float32))
    assert "noise" in intensity_note(rng.uniform(0, 100, (40, 40, 40)).astype(np.float32))
    assert "noise" in intensity_note(rng.normal(size=(40, 40, 40)).astype(np.float32))
    assert intensity_note(smooth_field((40, 40, 40), 1)) is None
    thick = smooth_field((40, 40, 8), 2)[:, :, ::2]  # thick slices: neighbours far apart along one axis
    assert intensity_note(thick) is None
    skull_stripped = smooth_field((40, 40, 40), 3) * (np.indices((40, 40, 40)).sum(0) > 50)  # half of it 0
    assert intensity_note(skull_stripped.astype(np.float32)) is None


def test_the_prediction_check_compares_volume_and_make_up_with_the_training_labels():
    rng = np.random.default_rng(1)
    names = ["background", "a", "b", "c"]
    subjects = []
    for _ in range(5):  # a 60 % : 30 % : 10 % make-up, 100 to 130 mL at 1 mm
        total = rng.uniform(100e3, 130e3)
        subjects.append((500e3 / 1000, 0.6 * total / 1000, 0.3 * total / 1000, 0.1 * total / 1000))
    seen = {"composition": composition(subjects)}
    affine = np.eye(4)
    labels = np.zeros((60, 60, 60), np.uint8)  # 216 mL in all

    def fill(shares):
        out, start = labels.copy().reshape(-1), 0
        for c, count in enumerate(shares, start=1):
            out[start:start + count] = c
            start += count
        return out.reshape(labels.shape)

    assert prediction_note(fill([69000, 33000, 12000]), affine, seen, names) is None  # 114 mL, the usual make-up
    assert "fill 10 mL" in prediction_note(fill([6000, 3000, 1000]), affine, seen, names)
    assert "fill 216 mL" not in (prediction_note(fill([216000, 0, 0]), affine, seen, names) or "")
    odd = prediction_note(fill([20000, 20000, 74000]), affine, seen, names)  # 114 mL, c two thirds
    assert "made up unlike" in odd and "c is 65 %" in odd
    assert prediction_note(fill([69000, 33000, 12000]), np.diag([2.0, 2, 2, 1]), seen, names).startswith(
        "the predicted structures fill 912 mL")  # the voxel size counts
    assert prediction_note(labels, affine, None, names) is None  # a checkpoint without the record


def test_a_run_records_its_labels_composition_and_segment_warns_on_a_constant_image(run, tmp_path, capfd):
    seen = load_model(run / "last.pt", torch.device("cpu")).data_range
    trained = [s["name"] for s in json.loads((run / "splits.json").read_text())["train"]["subjects"]]
    volumes = []
    for name in trained:
        labels = load_volume(run.parent / "data" / "labelsTr" / f"{name}.nii.gz", dtype=np.int64)
        volumes.append(class_volumes_ml(labels.data, labels.affine, 3))
    want = composition(volumes)
    assert seen["composition"]["foreground_ml"] == pytest.approx(want["foreground_ml"])
    assert seen["composition"]["share_mean"] == pytest.approx(want["share_mean"])
    save_volume(tmp_path / "in" / "flat.nii.gz", np.full((12, 12, 12), 3.0, np.float32), np.diag([2.0, 2, 2, 1]))
    capfd.readouterr()
    segment(run / "last.pt", tmp_path / "in", tmp_path / "out", device="cpu")
    err = capfd.readouterr().err
    assert f"warning: {tmp_path / 'in' / 'flat.nii.gz'}: every voxel has the intensity 3: a constant image" in err
    assert (tmp_path / "out" / "flat.nii.gz").exists()  # written all the same


@pytest.mark.skipif(not (COLIN27 / "ch2bet.nii.gz").exists(), reason="Colin27 needs Debian's mricron-data")
def test_colin27_passes_the_committed_models_checks_silently(tmp_path, capfd):
    """A real scan is no warning (the committed model's record comes from the packaged label maps)."""
    model = ROOT / "results" / "real-scans" / "model.pt"
    seen = load_model(model, torch.device("cpu")).data_range
    assert 800 < seen["composition"]["foreground_ml"][0] < seen["composition"]["foreground_ml"][1] < 1600
    capfd.readouterr()
    segment(model, COLIN27 / "ch2bet.nii.gz", tmp_path, device="cpu")
    assert "warning" not in capfd.readouterr().err
    noise = np.random.default_rng(0).uniform(0, 100, (120, 120, 120)).astype(np.float32)
    save_volume(tmp_path / "in" / "noise.nii.gz", noise, np.eye(4))
    segment(model, tmp_path / "in" / "noise.nii.gz", tmp_path / "out", device="cpu")
    assert "noise.nii.gz: neighbouring voxels are uncorrelated" in capfd.readouterr().err


# 5, 6: checkpoints that segment.py refuses


def tampered(run: Path, tmp_path: Path, name: str, change) -> Path:
    state = load_checkpoint(run / "last.pt")
    change(state)
    save_checkpoint(tmp_path / f"{name}.pt", state)
    return tmp_path / f"{name}.pt"


def nan_weights(state: dict) -> None:
    next(t for t in state["model"].values() if t.is_floating_point()).fill_(float("nan"))


def fewer_names(state: dict) -> None:
    state["class_names"] = state["class_names"][:2]


def wider(state: dict) -> None:
    config = json.loads(state["config"])
    state["config"] = json.dumps({**config, "width": config["width"] * 2})


def negative_plan(state: dict) -> None:
    state["plan"] = json.dumps({**json.loads(state["plan"]), "size": -16})


@pytest.mark.parametrize("change", [nan_weights, fewer_names, wider, negative_plan])
def test_export_refuses_what_segment_refuses_and_writes_nothing(run, tmp_path, change):
    bad = tampered(run, tmp_path, change.__name__, change)
    with pytest.raises(ValueError, match=str(bad)):
        load_model(bad, torch.device("cpu"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_model.py"), str(bad),
                           str(tmp_path / "copy.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {bad}: "), done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "copy.pt").exists()


def test_a_stored_plan_with_negative_numbers_is_one_line_naming_the_checkpoint(run, tmp_path):
    bad = tampered(run, tmp_path, "plan", negative_plan)
    scan = run.parent / "data" / "imagesTr" / "c0_0000.nii.gz"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "segment.py"), str(bad), str(scan),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"error: {bad}: ") and "size must be a positive whole number" in done.stderr


# 7, 8: resumed runs


def test_a_preset_given_to_a_resumed_run_is_refused(run, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as script

    with pytest.raises(SystemExit) as stop:
        script.parse(["--out", str(run), "--resume", "--preset", "synth-paper"])
    assert stop.value.code == 2
    assert "--preset: a resumed run keeps the settings it was trained with" in capsys.readouterr().err
    assert "no --preset" in script.parser(TrainConfig(), "cpu").format_help().replace("\n", " ").replace("  ", " ")


def test_val_data_added_to_a_run_that_had_none_is_refused_in_one_accurate_line(run, tmp_path):
    from expseg_fast.checkpoint import checkpoint_config

    config = checkpoint_config(load_checkpoint(run / "last.pt"), run / "last.pt")
    config.val_data, config.val_label_map = str(run.parent / "data"), str(run.parent / "data" / "map.json")
    config.epochs = 2
    before = (run / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"val_data=.* \(the run validates on a split of its own data") as error:
        train(config, resume=True)
    assert "subject" not in str(error.value) and (run / "last.pt").read_bytes() == before


# 9: the trainer's ignored voxels


def test_ignore_index_ignores_those_voxels_and_validates_the_rest():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 4, (2, 5, 6, 7), generator=gen).to(torch.uint8)
    weights = torch.rand(4, dtype=torch.float64, generator=gen).float() + 0.5
    for ignore in (IGNORE, 2):
        marked = target.clone()
        marked[0, :2] = ignore
        other = logits.clone()
        other[0, :, :2] = torch.randn(4, 2, 6, 7, dtype=torch.float64, generator=gen) * 5  # never seen
        for backend in ("reference", "native"):
            a, b = (x.clone().requires_grad_(True) for x in (logits, other))
            va = exp_log_loss(a, marked, weights, backend=backend, ignore_index=ignore)
            vb = exp_log_loss(b, marked, weights, backend=backend, ignore_index=ignore)
            va.backward()
            assert float(va.detach()) == pytest.approx(float(vb.detach()), rel=1e-12)
            assert torch.count_nonzero(a.grad[0, :, :2]) == 0 and torch.isfinite(a.grad).all()
        # float64 oracle: the ignored voxels' Dice terms gone, their cross terms 0 in a mean over all voxels
        keep = marked != ignore
        z, t = logits, target.long().where(keep, 0)
        p = torch.softmax(z, 1)
        delta = torch.nn.functional.one_hot(t, 4).movedim(-1, 1).double() * keep[:, None]
        inter, g, q = (delta * p).sum((2, 3, 4)), delta.sum((2, 3, 4)), (p * keep[:, None]).sum((2, 3, 4))
        dice = (-torch.log((2 * inter + 1) / (g + q + 1))) ** 0.3
        cross = (weights.double()[t] * (-torch.log(p.gather(1, t[:, None])[:, 0])) ** 0.3 * keep).mean()
        want = 0.8 * dice.mean() + 0.2 * cross
        assert float(exp_log_loss(logits, marked, weights, backend="native", ignore_index=ignore)) == pytest.approx(
            float(want), rel=1e-10)
    stray = target.clone()
    stray[1, 0, 0, 0], stray[0, 0, 0, 0] = 9, IGNORE
    for backend in ("reference", "native"):
        with pytest.raises(ValueError, match="1 voxels hold labels outside \\[0, 4\\) other than ignore_index 255"):
            exp_log_loss(logits, stray, backend=backend, ignore_index=IGNORE)


def test_the_training_step_ignores_its_ignore_label_and_refuses_stray_ones():
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=3, width=4, noise_std=0.0, dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = TrainStep(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.ones(3),
                     LossSpec(), torch.float32, torch.contiguous_format)
    image, labels = torch.randn(1, 1, 16, 16, 16), torch.randint(0, 3, (1, 16, 16, 16)).to(torch.uint8)
    labels[0, 0] = IGNORE
    value, finite = step(image, labels)
    assert finite and math.isfinite(value)
    with torch.no_grad():  # a diverged network: reported by the step (the trainer's divergence check), not raised
        next(model.parameters()).fill_(float("nan"))
    assert step(image, labels)[1] is False
    labels[0, 1, 0, 0] = 7  # a label the trainer never means to ignore
    with pytest.raises(ValueError, match="1 voxels hold labels outside"):
        step(image, labels)
