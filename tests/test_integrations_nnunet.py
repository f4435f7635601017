"""nnU-Net v2 with the exponential logarithmic loss, end to end on the CPU: a tiny generated dataset in
nnU-Net's layout, nnU-Net's fingerprint, plan and preprocessing, `python -m expseg_fast.integrations.nnunet`
training a shortened nnUNetTrainerExpLog for one epoch of a few iterations (the subclass lives outside both
packages, found through nnUNet_extTrainer as a user's would be), then predicting; the loss the trainer
builds (nnU-Net's deep-supervision weights, label weights from the training cases, ignore label, regions
refused) checked in a fresh interpreter, since nnU-Net reads its folders from the environment at import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from expseg_fast.losses import label_weights
from tests.helpers import readme_block

needs_nnunet = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                  reason="nnunetv2 ([nnunet] extra) not installed")
NAME = "Dataset901_Spheres"
SHORT = '''
import torch
from expseg_fast.integrations.nnunet import nnUNetTrainerExpLog


class nnUNetTrainerExpLogShort(nnUNetTrainerExpLog):
    """One epoch of three iterations (the test's time), otherwise nnUNetTrainerExpLog."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 3, 1
'''


def write_raw_dataset(root: Path, cases: int = 6, shape=(24, 28, 32)) -> Path:
    """nnU-Net's raw layout: two spheres (labels 1, 2) in noise, 1.5 mm voxels; imagesTs holds two cases."""
    folder = root / NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        for value, radius in ((1, 7), (2, 4)):
            centre = rng.uniform(8, np.array(shape) - 8)
            label[((grid - centre) ** 2).sum(-1) < radius**2] = value
        image = (label * 100.0 + rng.normal(0, 20, shape) + 50).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"sph_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"sph_{i:03d}.nii.gz")
        if i < 2:
            nib.save(nib.Nifti1Image(image, affine), folder / "imagesTs" / f"sph_{i:03d}_0000.nii.gz")
    labels = {"background": 0, "big": 1, "small": 2}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": labels,
                                                     "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


def run(command: list[str], env: dict, cwd: Path) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def readme_lines() -> list[list[str]]:
    """The README's "In nnU-Net" commands, split into words."""
    return [line.split() for line in readme_block("### In nnU-Net").splitlines() if line.strip()]


def test_without_nnunet_the_module_says_what_to_install():
    hide = "import sys, runpy; sys.modules['nnunetv2'] = None; "
    imported = subprocess.run([sys.executable, "-c", hide + "import expseg_fast.integrations.nnunet"],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 1 and "ModuleNotFoundError" in imported.stderr
    assert imported.stderr.strip().splitlines()[-1].endswith("pip install 'expseg_fast[nnunet]'")
    command = subprocess.run([sys.executable, "-c", hide + "runpy.run_module('expseg_fast.integrations.nnunet', "
                              "run_name='__main__')"], capture_output=True, text=True, timeout=120)
    assert command.returncode == 1 and "Traceback" not in command.stderr
    assert command.stderr.strip().startswith("error: expseg_fast.integrations.nnunet needs nnU-Net v2")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(environment, root): the dataset fingerprinted, planned and preprocessed for 3d_fullres."""
    root = tmp_path_factory.mktemp("nnunet")
    raw = write_raw_dataset(root / "raw")
    (root / "ext").mkdir()
    (root / "ext" / "short_trainers.py").write_text(SHORT)
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "results"), "nnUNet_extTrainer": str(root / "ext"), "nnUNet_def_n_proc": "1",
           "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "2"}
    plan = readme_lines()[0]  # the README's, with one process
    run([str(Path(sys.executable).parent / plan[0]), *plan[1:], "-np", "1"], env, root)
    assert (root / "pre" / NAME / "nnUNetPlans.json").exists() and raw.exists()
    return env, root


@needs_nnunet
def test_the_trainer_builds_its_loss_the_nnunet_way(planned):
    """nnU-Net's deep-supervision wrapper and level weights around our ExpLogLoss, label weights from the
    fold's training cases (counted here from the raw labels), the ignore label passed on, regions refused."""
    env, root = planned
    check = textwrap.dedent(f'''
        import json, torch
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from expseg_fast.integrations.nnunet import nnUNetTrainerExpLog
        from expseg_fast.integrations.monai import ExpLogLoss
        pre = "{root / "pre" / NAME}"
        dataset = load_json(pre + "/dataset.json")
        def make(dataset):  # nnU-Net's run_training adds (and the trainer pops) continue_training
            plans = {{**load_json(pre + "/nnUNetPlans.json"), "continue_training": False}}
            return nnUNetTrainerExpLog(plans, "3d_fullres", 0, dataset, torch.device("cpu"))
        trainer = make(dataset)
        trainer.initialize()
        loss = trainer.loss
        assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, ExpLogLoss), loss
        out = {{"levels": list(loss.weight_factors), "weights": loss.loss.core.weights.tolist(),
               "ignore": loss.loss.core.ignore_index, "spec": str(loss.loss.core.spec)}}
        dataset["labels"]["ignore"] = 3
        trainer = make(dataset)
        trainer.initialize()
        out["ignore_with_label"] = trainer.loss.loss.core.ignore_index
        dataset["labels"] = {{"background": 0, "both": [1, 2], "small": 2}}
        dataset["regions_class_order"] = [1, 2]
        try:
            make(dataset).initialize()
        except ValueError as error:
            out["regions"] = str(error)
        print("RESULT" + json.dumps(out))
    ''')
    printed = run([sys.executable, "-c", check], planned[0], root)
    out = json.loads(printed.split("RESULT")[1].splitlines()[0])
    levels = np.array([1 / 2**i for i in range(len(out["levels"]))])
    levels[-1] = 0  # nnU-Net's rule: halve per level, drop the lowest, normalise
    np.testing.assert_allclose(out["levels"], levels / levels.sum())
    train = json.loads((root / "pre" / NAME / "splits_final.json").read_text())[0]["train"]
    counts = sum(np.bincount(np.asarray(nib.load(root / "raw" / NAME / "labelsTr" / f"{k}.nii.gz").dataobj).ravel(),
                             minlength=3) for k in train)
    np.testing.assert_allclose(out["weights"], label_weights(torch.from_numpy(counts)).tolist(), rtol=1e-6)
    assert out["spec"].startswith("LossSpec(w_dice=0.8, w_cross=0.2, gamma_dice=0.3, gamma_cross=0.3")
    assert out["ignore"] is None and out["ignore_with_label"] == 3
    assert "region-based training" in out["regions"] and "\n" not in out["regions"]


@needs_nnunet
def test_train_then_predict_from_the_command_line(planned):
    """The README's lines: train one fold with a trainer found through nnUNet_extTrainer, predict with it."""
    env, root = planned
    _, train, predict = readme_lines()
    assert train[:3] == predict[:3] == ["python", "-m", "expseg_fast.integrations.nnunet"]
    cpu = ["-tr", "nnUNetTrainerExpLogShort", "-device", "cpu"]  # the test's trainer; no GPU here
    log = run([sys.executable, *train[1:], *cpu], env, root)
    assert "L_Exp label weights" in log and "Mean Validation Dice" in log
    fold = root / "results" / NAME / "nnUNetTrainerExpLogShort__nnUNetPlans__3d_fullres" / "fold_0"
    state = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert state["trainer_name"] == "nnUNetTrainerExpLogShort"
    assert np.isfinite(state["logging"]["train_losses"]).all()
    run([sys.executable, *predict[1:], *cpu, "-npp", "1", "-nps", "1", "--disable_tta"], env, root / "raw" / NAME)
    for case in ("sph_000", "sph_001"):
        predicted = nib.load(root / "raw" / NAME / "predicted" / f"{case}.nii.gz")
        source = nib.load(root / "raw" / NAME / "imagesTs" / f"{case}_0000.nii.gz")
        assert predicted.shape == source.shape and np.allclose(predicted.affine, source.affine)
        assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= {0, 1, 2}
