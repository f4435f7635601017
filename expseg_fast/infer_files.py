"""Segment NIfTI files with a trained checkpoint; outputs land in each input's ORIGINAL space."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expseg_fast.data import load_volume, plan, apply_image, write_prediction
from expseg_fast.data.dataset import NIFTI_SUFFIXES
from expseg_fast.infer import Predictor
from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.models import build_model


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig, list[str]]:
    """The trained network of a checkpoint (loaded with weights_only=True), its config and class names."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, checkpoint)
    names = list(state["class_names"])
    model = build_model(config.model, len(names), config.width, config.fuse_levels)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, names


def segment(checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, device: str = "auto") -> list[Path]:
    """Segments one NIfTI file or every NIfTI file of a folder; returns the written label files."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, config, names = load_model(Path(checkpoint), dev)
    inputs, out_dir = Path(inputs), Path(out_dir)
    files = sorted(p for p in inputs.iterdir() if p.name.endswith(NIFTI_SUFFIXES)) if inputs.is_dir() else [inputs]
    if not files:
        raise ValueError(f"{inputs}: no .nii or .nii.gz files")
    precision = config.precision if dev.type == "cuda" else "fp32"
    predictor = Predictor(model, (1, 1, config.size, config.size, config.size), precision=precision,
                          channels_last=config.channels_last)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(files, start=1):
        volume = load_volume(path)
        r = plan(volume.data.shape, volume.affine, config.size)
        image = torch.from_numpy(apply_image(volume.data, r))[None, None]
        labels = predictor(image)[0].cpu().numpy()
        target = out_dir / path.name
        write_prediction(target, labels, r)
        written.append(target)
        print(f"[{index}/{len(files)}] {path.name} -> {target}", flush=True)
    (out_dir / "class_names.json").write_text(json.dumps(names, indent=1))
    return written
