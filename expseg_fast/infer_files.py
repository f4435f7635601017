"""Segment NIfTI files with a trained checkpoint; outputs land in each input's ORIGINAL space.

Every input is checked on its own (readable, one real intensity per voxel, finite, a field of view
that survives the resampling) and segmented if good; the bad ones are reported together at the end
(SegmentationError), so one broken file never keeps the others from being written. Nothing is written
over an input, and an existing output is replaced only with overwrite=True.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from expseg_fast.atomic import NoSpaceError, write_atomic
from expseg_fast.checkpoint import checkpoint_config, load_checkpoint, non_finite_weights
from expseg_fast.config import TrainConfig
from expseg_fast.data import VolumeError, apply_image, load_volume, plan, write_prediction
from expseg_fast.data.dataset import NIFTI_SUFFIXES
from expseg_fast.data.preprocess import resampling_problem
from expseg_fast.infer import Predictor
from expseg_fast.models import build_model


class SegmentationError(ValueError):
    """Inputs that could not be segmented, one line each naming the file (the others were written)."""

    def __init__(self, problems: list[str], written: list[Path]) -> None:
        self.problems, self.written = problems, written
        super().__init__(f"{len(problems)} of {len(problems) + len(written)} input(s) not segmented:\n"
                         + "\n".join(f"  {p}" for p in problems))


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, list[str]]:
    """The trained network of a checkpoint (loaded with weights_only=True), its config and class names."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, checkpoint)
    bad = non_finite_weights(state["model"])
    if bad:
        raise ValueError(f"{checkpoint}: holds non-finite weights ({bad[0]}, ...): a diverged run; not used")
    names = list(state["class_names"])
    model = build_model(config.model, len(names), config.width, config.fuse_levels)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, names


def input_files(inputs: Path) -> list[Path]:
    """The NIfTI file, or every NIfTI file of the folder, sorted."""
    if not inputs.exists():
        raise ValueError(f"{inputs}: no such file or folder")
    files = sorted(p for p in inputs.iterdir() if p.name.endswith(NIFTI_SUFFIXES)) if inputs.is_dir() else [inputs]
    if not files:
        raise ValueError(f"{inputs}: no .nii or .nii.gz files")
    return files


def check_output_folder(out_dir: Path, inputs: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; choose another output folder")
    source = inputs if inputs.is_dir() else inputs.parent
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"{out_dir}: is the folder of the inputs; the label maps would replace the scans "
                         f"(they keep the input names): choose another output folder")


def _image(path: Path, size: int) -> tuple[np.ndarray, object]:
    """The preprocessed image of one input and its resampling; VolumeError naming the file if unusable."""
    volume = load_volume(path)
    nonfinite = int((~np.isfinite(volume.data)).sum())
    if nonfinite:
        raise VolumeError(f"{path}: {nonfinite} voxels are NaN or Inf")
    problem = resampling_problem(path, volume.data.shape, volume.affine, size)
    if problem:
        raise VolumeError(problem)
    r = plan(volume.data.shape, volume.affine, size)
    return apply_image(volume.data, r), r


def segment(checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, device: str = "auto",
            overwrite: bool = False) -> list[Path]:
    """Segments one NIfTI file or every NIfTI file of a folder; returns the written label files.
    SegmentationError (after every good file is written) when some inputs could not be segmented."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    inputs, out_dir = Path(inputs), Path(out_dir)
    model, config, names = load_model(Path(checkpoint), dev)  # first: a refused checkpoint says so at once
    files = input_files(inputs)
    check_output_folder(out_dir, inputs)
    precision = config.precision if dev.type == "cuda" else "fp32"
    predictor = Predictor(model, (1, 1, config.size, config.size, config.size), precision=precision,
                          channels_last=config.channels_last)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {f.resolve() for f in files}
    written, problems = [], []
    for index, path in enumerate(files, start=1):
        target = out_dir / path.name
        if target.resolve() in sources:
            problems.append(f"{target}: is an input; not written over")
            continue
        if target.exists() and not overwrite:
            problems.append(f"{target}: exists; not replaced (use --overwrite to replace outputs)")
            continue
        try:
            image, r = _image(path, config.size)
            labels = predictor(torch.from_numpy(image)[None, None])[0].cpu().numpy()
            write_prediction(target, labels, r)
        except (VolumeError, OSError) as error:
            problems.append(str(error) if isinstance(error, (VolumeError, NoSpaceError)) else f"{target}: {error}")
            continue
        written.append(target)
        print(f"[{index}/{len(files)}] {path.name} -> {target}", flush=True)
    names_file = out_dir / "class_names.json"
    text = json.dumps(names, indent=1)
    if not names_file.exists() or overwrite or names_file.read_text() == text:
        write_atomic(names_file, lambda tmp: Path(tmp).write_text(text), ".json")
    else:
        problems.append(f"{names_file}: exists with other class names; not replaced (use --overwrite)")
    if problems:
        raise SegmentationError(problems, written)
    return written
