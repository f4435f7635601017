"""Real anatomy and the label-map generator (issue 24): the packaged label maps, the generator against the
numpy preprocessing and its own randomness, training on it through the trainer (exact resume, real-scan
validation), and scoring real scans whose labels follow another protocol."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from expseg_fast.config import TrainConfig
from expseg_fast.data import anatomy, preprocess_pair, save_volume
from expseg_fast.data.anatomy import CLASSES_FILE, PROTOCOLS, GenerationTable, label_map_files
from expseg_fast.data.dataset import LabelMap
from expseg_fast.data.plans import FitPlan, SpacingPlan
from expseg_fast.data.preprocess import IGNORE, ScanStatistics, apply_image
from expseg_fast.data.source import DataLocation, open_dataset, open_synth
from expseg_fast.data.synth import ImageGenerator, LabelMapSource, SynthSettings
from expseg_fast.runlog import read_log
from expseg_fast.training import train

TABLE, CLASSES = GenerationTable.read(), LabelMap.from_json(CLASSES_FILE)
SCRIPTS = Path(__file__).parents[1] / "scripts"


def test_the_packaged_label_maps_are_compact_licensed_and_mapped():
    files = label_map_files()
    assert len(files) == 20 and sum(p.stat().st_size for p in files) < 25e6
    assert (anatomy.HERE / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    assert "Changes made by expseg_fast" in (anatomy.HERE / "NOTICE").read_text()
    assert set(TABLE.freesurfer_ids) <= set(CLASSES.lookup)  # every id the generator knows has a class
    assert "ventral DC" in CLASSES.names and not any("CVL" in name for name in CLASSES.names)
    for path in files[:3]:
        image = nib.load(str(path))
        assert image.get_data_dtype() == np.uint8 and nib.aff2axcodes(image.affine) == ("L", "I", "A")
        data = np.asarray(image.dataobj)
        assert int(data.max()) < len(TABLE.freesurfer_ids) and (data[0] == 0).all()  # cropped with a margin
    assert len(open_synth().subjects) == 20


@pytest.mark.parametrize("plan", [FitPlan(32), SpacingPlan(32, 3.0)])
def test_the_generator_is_deterministic_from_its_generator_and_varies_with_it(plan):
    source = LabelMapSource(label_map_files()[1], plan, torch.device("cpu"), 256.0)
    generator = ImageGenerator(TABLE, CLASSES, plan, SynthSettings(), torch.device("cpu"))
    a, b, c = (generator(source, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # other geometry, other intensities
    gen = torch.Generator().manual_seed(1)
    generator(source, gen)
    saved = gen.get_state()
    first = generator(source, gen)
    gen.set_state(saved)
    assert torch.equal(generator(source, gen)[0], first[0])  # what a resumed run relies on


def test_t1_contrast_orders_white_grey_and_ventricles_as_a_t1_scan():
    plan = SpacingPlan(64, 2.5)
    source = LabelMapSource(label_map_files()[2], plan, torch.device("cpu"), 256.0)
    no_gamma = dataclasses.replace(SynthSettings(), gamma=0.0)
    generator = ImageGenerator(TABLE, CLASSES, plan, no_gamma, torch.device("cpu"))
    white, grey, ventricle = (CLASSES.names.index(n) for n in ("cerebral white", "cerebral grey", "lateral ventricle"))
    ordered = 0
    for seed in range(10):
        image, labels = generator(source, torch.Generator().manual_seed(seed))
        medians = [float(image[0][labels == c].median()) for c in (white, grey, ventricle)]
        ordered += medians[0] > medians[1] > medians[2]
    assert ordered >= 9


@pytest.mark.parametrize("plan", [FitPlan(24), SpacingPlan(24, 2.0)])
def test_the_torch_normalisation_is_the_numpy_one(plan):
    """plan.normalise (the generator's) against apply_image (the files'), on a scan whose grid is the
    identity: mostly background, as a skull-stripped scan."""
    rng = np.random.default_rng(3)
    data = np.zeros((24, 24, 24), np.float32)
    data[5:15, 6:18, 4:20] = rng.uniform(20, 120, (10, 12, 16))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    grid = plan.inference_grid(data.shape, affine)
    expected = apply_image(data, grid, plan.statistics(data))
    inside = torch.ones(data.shape, dtype=torch.bool)
    found = plan.normalise(torch.from_numpy(data), inside).numpy()
    assert grid.target_shape == (24, 24, 24) and np.allclose(found, expected, atol=1e-5)
    if isinstance(plan, SpacingPlan):
        stats = ScanStatistics.of(data)
        assert np.isclose(found[0, 0, 0], -stats.mean / stats.std, atol=1e-5)  # background as the scan's zeros


def tiny_synth(out: Path, epochs: int, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(out=str(out), data="synth", size=16, width=4, epochs=epochs, preprocessing="spacing",
                                 spacing_mm=8.0, synth_repeats=2, limit_subjects=4, loader_workers=0,
                                 deterministic=True, seed=7), **overrides})


def without_timing(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "phase_seconds")} for r in read_log(out / "log.jsonl")]


def test_training_on_the_generator_resumes_exactly(tmp_path):
    train(tiny_synth(tmp_path / "full", 3))
    train(tiny_synth(tmp_path / "part", 1))
    train(tiny_synth(tmp_path / "part", 3), resume=True)
    assert without_timing(tmp_path / "part") == without_timing(tmp_path / "full")
    log = read_log(tmp_path / "full" / "log.jsonl")
    assert [r["train_steps"] for r in log] == [2 * 3] * 3  # 3 training maps of 4, each drawn twice
    pin = json.loads((tmp_path / "full" / "splits.json").read_text())
    assert pin["train"]["root"] == str(anatomy.MAPS.resolve()) and len(pin["val"]["subjects"]) == 1


def fs_case(root: Path, name: str, source: Path) -> None:
    """A 'real scan' with FreeSurfer labels: a packaged label map's ids, and an image that is a T1-like
    function of them (white 110, grey 70, ventricles 20, 0 outside the brain)."""
    volume = nib.load(str(source))
    ids = np.asarray(TABLE.freesurfer_ids)[np.asarray(volume.dataobj)]
    image = np.select([np.isin(ids, [2, 41]), np.isin(ids, [3, 42]), np.isin(ids, [4, 43])], [110.0, 70.0, 20.0],
                      np.where(np.asarray(TABLE.brain)[np.asarray(volume.dataobj)], 60.0, 0.0)).astype(np.float32)
    save_volume(root / "imagesTr" / f"{name}_0000.nii.gz", image, volume.affine)
    save_volume(root / "labelsTr" / f"{name}.nii.gz", ids.astype(np.int16), volume.affine)


def test_a_generator_run_validates_on_real_scans_of_another_protocol(tmp_path):
    """--val-data with a protocol that names only some classes and ignores unlisted ids: the others are
    not scored (NaN in the log), never 0."""
    fs_case(tmp_path / "real", "scan", label_map_files()[19])
    protocol = {"classes": [{"name": "background", "ids": [0]}, {"name": "cerebral white", "ids": [2, 41]},
                            {"name": "cerebral grey", "ids": [3, 42]}], "unlisted": "ignore"}
    (tmp_path / "real" / "map.json").write_text(json.dumps(protocol))
    out = tmp_path / "run"
    train(tiny_synth(out, 1, val_data=str(tmp_path / "real"), val_label_map=str(tmp_path / "real" / "map.json")))
    record = read_log(out / "log.jsonl")[0]
    scored = [CLASSES.names.index(n) - 1 for n in ("cerebral white", "cerebral grey")]
    per_label = record["val_dice_per_label"]
    assert all(np.isfinite(per_label[i]) for i in scored)
    assert all(np.isnan(v) for i, v in enumerate(per_label) if i not in scored)
    assert record["val_dice_mean"] == pytest.approx(np.mean([per_label[i] for i in scored]))


def numpy_dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    return 2 * float((p & t).sum()) / float(p.sum() + t.sum()) if p.any() or t.any() else float("nan")


def test_evaluate_scores_another_protocol_ignoring_what_it_leaves_out(tmp_path):
    """Unlisted ids are not scored, classes the protocol lacks are reported as such; the scored Dice is
    a plain NumPy Dice of segment.py's output over the listed voxels."""
    from expseg_fast.inference.evaluation import evaluate
    from expseg_fast.inference.files import segment

    out = tmp_path / "run"
    train(tiny_synth(out, 1))
    fs_case(tmp_path / "real", "scan", label_map_files()[18])
    protocol = {"classes": [{"name": "background", "ids": [0, 24]}, {"name": "cerebral white", "ids": [2, 41]},
                            {"name": "thalamus", "ids": [10, 49]}], "unlisted": "ignore"}
    (tmp_path / "map.json").write_text(json.dumps(protocol))
    result = evaluate(out / "last.pt", str(tmp_path / "real"), str(tmp_path / "map.json"), device="cpu")
    assert sorted(result.not_in_protocol) == sorted(n for n in CLASSES.names[1:] if n not in ("cerebral white",
                                                                                              "thalamus"))
    written = segment(out / "last.pt", tmp_path / "real" / "imagesTr", tmp_path / "seg", device="cpu")[0]
    pred = np.asarray(nib.load(str(written)).dataobj).astype(np.int64)
    ids = np.asarray(nib.load(str(tmp_path / "real" / "labelsTr" / "scan.nii.gz")).dataobj)
    listed = np.isin(ids, [0, 24, 2, 41, 10, 49])
    truth = np.select([np.isin(ids, [2, 41]), np.isin(ids, [10, 49])],
                      [CLASSES.names.index("cerebral white"), CLASSES.names.index("thalamus")], 0)
    for name in ("cerebral white", "thalamus"):
        c = CLASSES.names.index(name)
        assert result.original[0, c - 1] == pytest.approx(numpy_dice(pred[listed], truth[listed], c), abs=1e-12)
    assert np.isnan(result.original[0, CLASSES.names.index("hippocampus") - 1])


def test_colin27_carried_to_a_relative_folder_is_linked_from_anywhere(tmp_path, monkeypatch):
    """The GPU suite reads a copy of mricron-data's two files from .realscans/colin27 (a relative path); the
    dataset's links must still resolve from the temporary folder they are made in."""
    (tmp_path / "repo" / "carried").mkdir(parents=True)
    for name in ("ch2bet.nii.gz", "aal.nii.gz"):
        (tmp_path / "repo" / "carried" / name).write_bytes(name.encode())
    monkeypatch.chdir(tmp_path / "repo")
    data = anatomy.colin27_dataset(tmp_path / "elsewhere" / "colin27", Path("carried"))
    assert (data / "imagesTr" / "colin27_0000.nii.gz").read_bytes() == b"ch2bet.nii.gz"
    assert (data / "labelsTr" / "colin27.nii.gz").read_bytes() == b"aal.nii.gz"
    with pytest.raises(FileNotFoundError, match="mricron-data"):
        anatomy.colin27_dataset(tmp_path / "other", Path("missing"))


@pytest.mark.skipif(not (anatomy.COLIN27 / "aal.nii.gz").exists(), reason="Colin27 needs Debian's mricron-data")
def test_colin27_with_its_aal_labels_is_scored_on_the_aal_classes(tmp_path):
    out = tmp_path / "run"
    config = tiny_synth(out, 1)
    train(config)
    data = anatomy.colin27_dataset(tmp_path / "colin27")
    # the run chose best.pt on Colin27 (training/selection.py): its logged per-class Dice is a NumPy Dice of
    # last.pt's prediction on Colin27 preprocessed by the run's plan, NaN exactly for the 9 classes AAL lacks
    record = read_log(out / "log.jsonl")[-1]
    assert record["best_by"] == "colin27"
    state = torch.load(out / "last.pt", weights_only=False)
    model = config.network(len(state["class_names"])).eval()
    model.load_state_dict(state["model"])
    scan = open_dataset(DataLocation(str(data), str(PROTOCOLS / "aal.json")))
    label_map, lacking = scan.label_map.aligned_to(state["class_names"], "aal.json")
    sample = preprocess_pair(scan.pairs[0], label_map, config.plan())
    with torch.no_grad():
        pred = model(torch.from_numpy(np.ascontiguousarray(sample.image))[None, None].float()).argmax(1)[0].numpy()
    truth, scored = sample.labels.astype(np.int64), sample.labels != IGNORE
    want = [np.nan if c in lacking else numpy_dice(pred[scored], truth[scored], c)
            for c in range(1, len(state["class_names"]))]
    assert len(lacking) == 9
    np.testing.assert_allclose(record["colin27_dice_per_label"], want, atol=1e-12)
    assert record["colin27_dice_mean"] == pytest.approx(np.nanmean(want))
    done = subprocess.run([sys.executable, str(SCRIPTS / "evaluate.py"), str(out / "last.pt"), "--data", str(data),
                           "--label-map", str(PROTOCOLS / "aal.json"), "--device", "cpu", "--json",
                           str(tmp_path / "e.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert sorted(result["not_in_protocol"]) == sorted(
        ["3rd ventricle", "4th ventricle", "brainstem", "accumbens", "cerebellar white", "cerebral white",
         "inf. lateral ventricle", "lateral ventricle", "ventral DC"])
    assert done.stdout.count("not in the data") == 9 and result["subjects"] == ["colin27_0000.nii.gz"]
    # scripts/real_scans.py: the same figures, a table, and files that name no path of this machine
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPTS / "real_scans.py"), "--model", f"tiny={out / 'last.pt'}",
                           "--out", str(results)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    written = (results / "tiny-colin27.json").read_text()
    assert json.loads(written)["original"] == result["original"] and str(tmp_path) not in written
    assert json.loads(written)["checkpoint"] == "last.pt" and "colin27: OTHER data" in json.loads(written)["source"]
    table = (results / "table.md").read_text()
    assert "| cerebral white | not in the labels |" in table and "| **average of the scored classes** |" in table


def test_a_bad_packaged_label_map_and_a_non_finite_draw_are_one_line(tmp_path, monkeypatch):
    from expseg_fast.data import DatasetError, synth

    for i in range(3):
        source = label_map_files()[i]
        (tmp_path / "maps").mkdir(exist_ok=True)
        (tmp_path / "maps" / source.name).write_bytes(source.read_bytes())
    bad = nib.load(str(tmp_path / "maps" / "subject_02.nii.gz"))
    data = np.asarray(bad.dataobj).copy()
    data[0, 0, 0] = 200
    nib.save(nib.Nifti1Image(data, bad.affine), str(tmp_path / "maps" / "subject_02.nii.gz"))
    turned = nib.load(str(tmp_path / "maps" / "subject_03.nii.gz"))  # the same voxels, read as RAS
    nib.save(nib.Nifti1Image(np.asarray(turned.dataobj), np.diag([1.0, 1.0, 1.0, 1.0])),
             str(tmp_path / "maps" / "subject_03.nii.gz"))
    monkeypatch.setattr(anatomy, "MAPS", tmp_path / "maps")
    with pytest.raises(DatasetError) as error:
        open_synth()
    lines = str(error.value).splitlines()
    assert any(line.endswith("subject_02.nii.gz: label values outside the generation table: [200]") for line in lines)
    assert any(line.endswith("subject_03.nii.gz: orientation RAS, the packaged label maps are LIA (FreeSurfer's "
                             "conformed axes)") for line in lines), lines
    monkeypatch.undo()
    real = synth.ImageGenerator.__call__
    def non_finite(self, source, gen):
        image, labels = real(self, source, gen)
        return image * float("nan"), labels

    monkeypatch.setattr(synth.ImageGenerator, "__call__", non_finite)
    with pytest.raises(ValueError, match=r"subject_\d\d.nii.gz: the generator drew a non-finite image from it"):
        train(tiny_synth(tmp_path / "run", 1))
    assert os.path.exists(tmp_path / "run" / "splits.json") and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_an_inference_only_copy_segments_and_cannot_be_resumed(tmp_path, norm):
    """Also: inference rebuilds the network with the run's normalisation (instance norm's layers hold no
    running statistics, so BatchNorm's would not load)."""
    from expseg_fast.checkpoint import load_checkpoint
    from expseg_fast.inference.files import load_model

    out = tmp_path / "run"
    train(tiny_synth(out, 1, norm=norm))
    done = subprocess.run([sys.executable, str(SCRIPTS / "export_model.py"), str(out / "last.pt"),
                           str(tmp_path / "slim.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "slim.pt").stat().st_size < (out / "last.pt").stat().st_size / 2
    here = str(label_map_files()[0].parent).encode()  # the packaged label maps' folder, pinned by the run
    assert str(tmp_path).encode() in (out / "last.pt").read_bytes() and here in (out / "last.pt").read_bytes()
    assert str(tmp_path).encode() not in (tmp_path / "slim.pt").read_bytes()  # no path of this machine
    assert here not in (tmp_path / "slim.pt").read_bytes()
    slim, full = load_model(tmp_path / "slim.pt", torch.device("cpu")), load_model(out / "last.pt", torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(slim.model.state_dict().values(), full.model.state_dict().values()))
    kinds = {type(m).__name__ for m in slim.model.modules()} & {"BatchNorm3d", "InstanceNormReLU"}
    assert kinds == {"batch": {"BatchNorm3d"}, "instance": {"InstanceNormReLU"}}[norm]
    (out / "last.pt").write_bytes((tmp_path / "slim.pt").read_bytes())
    with pytest.raises(ValueError, match="an inference-only copy without the optimizer's state"):
        train(tiny_synth(out, 2, norm=norm), resume=True)
    assert load_checkpoint(tmp_path / "slim.pt")["inference_only"] is True
