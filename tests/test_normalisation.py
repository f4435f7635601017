"""Intensity normalisation that does not depend on the grid (issue 22): a training crop and the whole scan
segmented by sliding windows see one scale, evaluate.py's training-cube figure is the trainer's, and
segment.py warns about a scan whose intensity scale lies far from the training data's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_case

from expseg_fast import runlog
from expseg_fast.config import TrainConfig
from expseg_fast.data import LabelMap, find_pairs, load_volume, preprocess_pair, save_volume
from expseg_fast.data.plans import SpacingPlan
from expseg_fast.data.preprocess import ScanStatistics, invert_labels
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.inference.files import case_image, predict_labels
from expseg_fast.inference.predictor import Predictor
from expseg_fast.metrics import hard_dice
from expseg_fast.training import train

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.mark.parametrize("kind", ["background", "no zeros", "all zero", "constant"])
def test_scan_statistics_are_those_of_the_non_zero_voxels(kind):
    rng = np.random.default_rng(5)
    data = rng.normal(40.0, 7.0, size=(9, 8, 7))
    if kind == "background":
        data[rng.random(data.shape) < 0.8] = 0  # a skull-stripped scan: mostly background
    elif kind == "all zero":
        data[:] = 0
    elif kind == "constant":
        data[:] = 3.0
    stats = ScanStatistics.of(data.astype(np.float32))
    values = [v for v in data.astype(np.float32).astype(np.float64).ravel().tolist() if v != 0]
    mean = sum(values) / len(values) if values else 0.0
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 if values else 1.0
    assert stats.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert stats.std == pytest.approx(std if std > 0 else 1.0, rel=1e-9)


def small_object_in_a_large_field_of_view(root: Path) -> None:
    """A 48^3 scan of 2 mm voxels, empty but for a ball (radius 5 voxels) of intensity 50 with a core
    (radius 3) of 100 near one corner; labels: shell 1, core 2. A 16^3 crop around it and the whole scan
    have very different statistics (the crop's mean 7.8, the scan's 0.29)."""
    grid = np.indices((48, 48, 48)).astype(np.float64)
    r2 = ((grid - np.array([30.5, 17.5, 21.5])[:, None, None, None]) ** 2).sum(0)
    labels = np.where(r2 <= 9, 2, np.where(r2 <= 25, 1, 0)).astype(np.uint8)
    image = np.array([0.0, 50.0, 100.0], np.float32)[labels]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(root / "imagesTr" / "c0_0000.nii.gz", image, affine)
    save_volume(root / "labelsTr" / "c0.nii.gz", labels, affine)


class VoxelModel(torch.nn.Module):
    """A network that decides voxel by voxel from the normalised intensity x: background below t1,
    shell between t1 and t2, core above t2 (logits 0, x - t1, 2x - t1 - t2), so overlapping windows
    agree and the prediction depends on nothing but the normalisation."""

    def __init__(self, t1: float, t2: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -t1, -t1 - t2]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def test_a_training_crop_and_the_whole_scan_get_the_same_prediction(tmp_path):
    """Today's code normalised the crop by the crop's statistics and the whole scan by the scan's: the
    shell landed above where the core was in training, and the whole-scan segmentation lost both."""
    small_object_in_a_large_field_of_view(tmp_path)
    pair = find_pairs(tmp_path)[0]
    label_map = LabelMap.identity(3)
    plan = SpacingPlan(16, 2.0)
    sample = preprocess_pair(pair, label_map, plan)  # what the trainer sees
    levels = [float(np.median(sample.image[sample.labels == c])) for c in range(3)]
    model = VoxelModel((levels[0] + levels[1]) / 2, (levels[1] + levels[2]) / 2)  # 'trained' on the crop
    predictor = Predictor(model, (1, 1, 16, 16, 16), precision="fp32", channels_last=False)
    crop_labels = predictor(torch.from_numpy(sample.image)[None, None])[0]
    on_crop = hard_dice(crop_labels, torch.from_numpy(sample.labels.astype(np.int64)), 3)
    image, r, _ = case_image((pair.image,), plan, 10**6)  # what segment.py and evaluate.py see
    assert image.shape == (1, 48, 48, 48)
    whole = invert_labels(predict_labels(predictor, image, plan, 3), r)
    truth = load_volume(pair.label, dtype=np.int64).data
    on_scan = hard_dice(torch.from_numpy(whole.astype(np.int64)), torch.from_numpy(truth), 3)
    assert on_crop.tolist() == on_scan.tolist() == [1.0, 1.0, 1.0]
    assert np.array_equal(whole, truth)


def background_heavy_dataset(root: Path, n: int = 5) -> Path:
    """Cases whose box and ball sit in a 32^3 field of view of mostly zeros (write_case's 12^3 content
    at one corner, its noise only there)."""
    for i in range(n):
        write_case(root / "small", f"c{i}", 60 + i)
        for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            small = load_volume(root / "small" / sub / f"c{i}{suffix}")
            big = np.zeros((32, 32, 32), np.float32)
            big[3 + i:15 + i, 10:22, 4:16] = small.data
            save_volume(root / "data" / sub / f"c{i}{suffix}", big.astype(np.uint8) if sub == "labelsTr" else big,
                        small.affine)
    classes = [{"name": "background", "ids": [0]}, {"name": "box", "ids": [1]}, {"name": "ball", "ids": [2]}]
    (root / "data" / "map.json").write_text(json.dumps({"classes": classes}))
    return root / "data"


@pytest.mark.parametrize("preprocessing", ["fit", "spacing"])
def test_evaluates_training_cube_column_is_the_trainers_validation(tmp_path, preprocessing):
    data = background_heavy_dataset(tmp_path)
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=str(data), label_map=str(data / "map.json"), size=16, width=4, epochs=2,
                      deterministic=True, seed=4, loader_workers=0, preprocessing=preprocessing, spacing_mm=2.0))
    result = evaluate(out / "last.pt", device="cpu")
    logged = runlog.read_log(out / "log.jsonl")[-1]
    np.testing.assert_allclose(np.nanmean(result.resampled, axis=0), logged["val_dice_per_label"], rtol=0, atol=1e-12)


def test_segment_warns_about_a_scan_whose_intensity_scale_is_far_from_the_trainings(tmp_path):
    data = background_heavy_dataset(tmp_path)
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=str(data), label_map=str(data / "map.json"), size=16, width=4, epochs=1,
                      seed=4, loader_workers=0, preprocessing="spacing", spacing_mm=2.0))
    scan = load_volume(data / "imagesTr" / "c0_0000.nii.gz")
    scans = tmp_path / "scans"
    save_volume(scans / "like.nii.gz", scan.data, scan.affine)
    scaled, p99 = scan.data.copy(), float(np.percentile(scan.data, 99))
    scaled[scaled != 0] = p99 + 0.05 * (scaled[scaled != 0] - p99)  # the same 99th percentile, a 20x narrower spread
    save_volume(scans / "narrow.nii.gz", scaled, scan.affine)
    done = subprocess.run([sys.executable, str(SCRIPTS / "segment.py"), str(out / "last.pt"), str(scans),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines()  # the range's, not the barely trained model's prediction's
                if line.startswith("warning:") and "the predicted structures" not in line]
    assert len(warnings) == 1 and "narrow.nii.gz: intensity scale (std of the non-zero voxels)" in warnings[0], warnings
