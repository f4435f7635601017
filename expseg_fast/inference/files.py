"""Segment volume files (NIfTI or MGH) with a trained checkpoint; outputs land in each input's ORIGINAL
space, in each input's format.

The checkpoint's preprocessing plan (expseg_fast/data/plans.py) is applied: its inference grid of the
whole scan, its normalisation, and its windows (one cube for `fit`; for `spacing` Gaussian-weighted
sliding windows, nothing of the scan dropped).
Inputs follow the checkpoint's channel count: one file per case for single-channel models (the output
keeps the input's name), and nnU-Net's NAME_0000, NAME_0001, ... files per case otherwise (the output
is NAME). Every case is checked on its own (readable, one real intensity per voxel, finite, channels
on one grid, a field of view that survives the resampling) and segmented if good; the bad ones are
reported together at the end (SegmentationError), so one broken file never keeps the others from being
written. Nothing is written over an input, and an existing output is replaced only with overwrite=True.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from expseg_fast.atomic import NoSpaceError, write_atomic
from expseg_fast.checkpoint import checkpoint_config, checkpoint_pin, load_checkpoint, non_finite_weights
from expseg_fast.config import PREDICTOR, WINDOW_BATCH, TrainConfig
from expseg_fast.data import VolumeError, invert_labels, load_volume
from expseg_fast.data.dataset import group_channels, plain_name, volume_files
from expseg_fast.data.facts import VolumeFacts, out_of_range
from expseg_fast.data.identity import DataPin
from expseg_fast.data.nifti import (
    VOLUME_SUFFIXES,
    affines_match,
    label_dtype,
    nonfinite_problem,
    save_labels,
    volume_suffix,
)
from expseg_fast.data.plans import Plan
from expseg_fast.data.preprocess import Resampling
from expseg_fast.inference.mirroring import lateral_swap, left_right_axis, mirrored
from expseg_fast.inference.plausibility import intensity_note, prediction_note
from expseg_fast.inference.predictor import Predictor
from expseg_fast.inference.qc import write_qc
from expseg_fast.inference.sliding_window import sliding_window_labels
from expseg_fast.inference.volumes import volume_row, write_volumes
from expseg_fast.machine import cpu_bf16_units, keep_freed_memory, torch_device


class SegmentationError(ValueError):
    """Inputs that could not be segmented, one line each naming the file (the others were written)."""

    def __init__(self, problems: list[str], written: list[Path]) -> None:
        self.problems, self.written = problems, written
        super().__init__(f"{len(problems)} problem(s); {len(written)} output(s) written:\n"
                         + "\n".join(f"  {p}" for p in problems))


class LoadedModel(NamedTuple):
    """A checkpoint read once: the network (eval mode, on the device), its settings, its preprocessing
    plan, its class names, the range of its training data (None where not recorded), the epochs it had
    run, the data its run pinned (None where not recorded) and whether it is an
    inference-only copy (scripts/export_model.py: its data named by folder name only)."""
    model: torch.nn.Module
    config: TrainConfig
    plan: Plan
    names: list[str]
    data_range: dict | None
    epochs: int
    pin: DataPin | None
    inference_only: bool


def load_model(checkpoint: Path, device: torch.device) -> LoadedModel:
    """The trained network of a checkpoint (loaded with weights_only=True) and what it was trained with.
    ValueError naming the file when it is refused or holds non-finite weights."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, checkpoint)
    bad = non_finite_weights(state["model"])
    if bad:
        raise ValueError(f"{checkpoint}: holds non-finite weights ({bad[0]}, ...): a diverged run; not used")
    try:
        names = [str(name) for name in state["class_names"]]
        model = config.network(len(names))
        model.load_state_dict(state["model"])
        seen = json.loads(state["data_range"])
        epochs = int(state["epoch"]) + 1
        plan = Plan.from_record(json.loads(state["plan"]))
    except (RuntimeError, TypeError, ValueError, KeyError, RecursionError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(f"{checkpoint}: its weights, class names or records do not fit its configuration "
                         f"({reason})") from None
    return LoadedModel(model.to(device).eval(), config, plan, names, seen, epochs, checkpoint_pin(state, checkpoint),
                       bool(state["inference_only"]))


def input_files(inputs: Path) -> list[Path]:
    """The volume file (NIfTI or MGH), or every volume file of the folder, sorted; each output is written
    in its input's format, so a file of another name is refused."""
    kinds = ", ".join(VOLUME_SUFFIXES)
    if not inputs.exists():
        raise ValueError(f"{inputs}: no such file or folder")
    if not inputs.is_dir() and volume_suffix(inputs) is None:
        raise ValueError(f"{inputs}: not a volume file name (expected {kinds}: the output keeps the input's name "
                         f"and format)")
    files = volume_files(inputs) if inputs.is_dir() else [inputs]
    if not files:
        raise ValueError(f"{inputs}: no {kinds} files")
    return files


def check_output_folder(out_dir: Path, inputs: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; choose another output folder")
    source = inputs if inputs.is_dir() else inputs.parent
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"{out_dir}: is the folder of the inputs; the label maps would replace the scans "
                         f"(they keep the input names): choose another output folder")


def case_image(paths: tuple[Path, ...], plan: Plan, max_voxels: int,
               seen: dict | None = None) -> tuple[np.ndarray, Resampling, list[str]]:
    """The preprocessed image (K, ...) of one case's channel files on the plan's inference grid, its
    resampling and notes on what makes channel 0 unlike a scan of the training range `seen` (a
    checkpoint's data_range; None: only whether it looks like a scan at all); VolumeError naming the file
    if one is unusable (what the plan would lose, or past max_voxels)."""
    channels = []
    for path in paths:
        volume = load_volume(path, max_voxels=max_voxels)
        problem = nonfinite_problem(path, volume)
        if problem:
            raise VolumeError(problem)
        if channels and (volume.data.shape != channels[0].data.shape or not affines_match(channels[0], volume)):
            raise VolumeError(f"{path}: shape or affine differs from channel 0 ({paths[0]})")
        channels.append(volume)
    first = channels[0]
    problem = plan.scan_problem(paths[0], first.data.shape, first.affine, max_voxels)
    if problem:
        raise VolumeError(problem)
    r = plan.inference_grid(first.data.shape, first.affine)
    notes = out_of_range(VolumeFacts.of(first.data, first.affine), seen, plan.absorbed) if seen else []
    unlike_a_scan = intensity_note(first.data)
    return plan.image([c.data for c in channels], r), r, notes + ([unlike_a_scan] if unlike_a_scan else [])


def segment_case(predictor: Predictor, paths: tuple[Path, ...], plan: Plan, names: list[str], seen: dict | None,
                 max_voxels: int, flip: bool = PREDICTOR.flip) -> tuple[np.ndarray, Resampling, list[str]]:
    """(the labels of one case on channel 0's own grid, its resampling, notes on what makes the case or
    its prediction unlike the training data (expseg_fast/inference/plausibility.py), each to be said
    naming the file). flip: average with the left-right mirror (expseg_fast/inference/mirroring.py).
    VolumeError naming a file that is unusable."""
    image, r, notes = case_image(paths, plan, max_voxels, seen)
    mirror = (left_right_axis(r.target_affine), lateral_swap(names)) if flip else None
    labels = invert_labels(predict_labels(predictor, image, plan, len(names), mirror), r)
    unlike = prediction_note(labels, r.source_affine, seen, names)
    return labels, r, notes + ([unlike] if unlike else [])


def cases(files: list[Path], in_channels: int, problems: list[str]) -> list[tuple[str, tuple[Path, ...]]]:
    """(output file name, channel files) per case: each file for one channel, else nnU-Net's grouping
    (a case without exactly in_channels channels is reported in problems)."""
    if in_channels == 1:
        return [(f.name, (f,)) for f in files]
    grouped = []
    for case, paths in group_channels(files, problems, expected=in_channels).items():
        grouped.append((case + paths[0].name[len(plain_name(paths[0])):], paths))  # channel 0's format
    return grouped


def inference_precision(config: TrainConfig, device_type: str) -> str:
    """The precision a checkpoint infers in: its training precision on CUDA; on the CPU bf16 where it
    trained in bf16 and the processor multiplies bf16 natively (the same Dice as fp32 on both real scans,
    faster: results/real-scans/README.md), else fp32 (emulated bf16 is slow)."""
    if device_type == "cuda":
        return config.precision
    return "bf16" if config.precision == "bf16" and cpu_bf16_units() else "fp32"


def predictor_for(model: torch.nn.Module, config: TrainConfig, plan: Plan, device: torch.device,
                  batch: int | None = None) -> Predictor:
    """The checkpoint's predictor on device at its inference_precision, `batch` cubes per call (default:
    WINDOW_BATCH, at most the plan's windows of one scan)."""
    precision = inference_precision(config, device.type)
    if batch is None:
        batch = min(WINDOW_BATCH[device.type], plan.max_windows or WINDOW_BATCH[device.type])
    return Predictor(model, (batch, config.in_channels, plan.size, plan.size, plan.size), precision=precision,
                     channels_last=config.channels_last)


def predict_labels(predictor: Predictor, image: np.ndarray, plan: Plan, num_classes: int,
                   mirror: tuple[int, list[int] | None] | None = None) -> np.ndarray:
    """The label volume (label_dtype) on the inference grid of one case's preprocessed image (K, ...)
    (case_image): the plan's windows through the predictor, blended (expseg_fast/inference/sliding_window.py);
    with mirror = (the grid's left-right axis, the lateral classes' swap), averaged with the mirrored windows'."""
    probabilities = predictor.probabilities
    if mirror is not None:
        probabilities = mirrored(probabilities, *mirror)
    labels = sliding_window_labels(probabilities, torch.from_numpy(image).to(predictor.device), plan.size,
                                   predictor.input_shape[0], num_classes, plan.windows(image.shape[1:]))
    return labels.cpu().numpy().astype(label_dtype(num_classes - 1))


def warn(path: Path, notes: list[str]) -> None:
    """Says each note on an input, naming it."""
    for note in notes:
        print(f"warning: {path}: {note}; the segmentation may be poor", file=sys.stderr, flush=True)


def _written(write, path: Path, problems: list[str]) -> None:
    """write(path), or the line naming path (a full disk, an unreadable input) added to problems."""
    try:
        write(path)
    except (VolumeError, OSError) as error:  # said with every output that could not be written
        problems.append(str(error) if isinstance(error, (VolumeError, NoSpaceError)) else f"{path}: {error}")


def check_reports(volumes: Path | None, qc: Path | None, overwrite: bool) -> None:
    """ValueError naming --volumes' file or --qc's folder when it cannot be written (an existing CSV is
    replaced only with overwrite)."""
    if volumes is not None and volumes.is_dir():
        raise ValueError(f"{volumes}: is a folder; --volumes takes a CSV file name")
    if volumes is not None and volumes.exists() and not overwrite:
        raise ValueError(f"{volumes}: exists; not replaced (use --overwrite to replace outputs)")
    if qc is not None and qc.exists() and not qc.is_dir():
        raise ValueError(f"{qc}: exists and is not a folder; --qc takes a folder for the PNGs")


def segment(checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, device: str = "auto",
            overwrite: bool = False, max_voxels: int | None = None, volumes: str | Path | None = None,
            qc: str | Path | None = None, flip: bool = PREDICTOR.flip) -> list[Path]:
    """Segments one volume file or every volume file (NIfTI or MGH) of a folder; returns the written label
    files, each in its input's format. volumes: a CSV of each written scan's class volumes
    (expseg_fast/inference/volumes.py); qc: a folder for a PNG per written scan (expseg_fast/inference/qc.py);
    flip: test-time left-right flip averaging (expseg_fast/inference/mirroring.py).
    SegmentationError (after every good file is written) when some inputs could not be segmented or
    written. max_voxels: the largest scan (and resampled grid) taken, default the checkpoint's."""
    dev = torch_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # each window's activations reuse the last one's memory (bench/NOTES.md)
    inputs, out_dir = Path(inputs), Path(out_dir)
    volumes, qc = (Path(p) if p is not None else None for p in (volumes, qc))
    model, config, plan, names, seen, *_ = load_model(Path(checkpoint), dev)  # a refused checkpoint says so at once
    max_voxels = max_voxels or config.max_voxels
    files = input_files(inputs)
    check_output_folder(out_dir, inputs)
    check_reports(volumes, qc, overwrite)
    predictor = predictor_for(model, config, plan, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    if qc is not None:
        qc.mkdir(parents=True, exist_ok=True)
    sources = {f.resolve() for f in files}
    written, problems, rows = [], [], []
    todo = cases(files, config.in_channels, problems)
    for index, (name, paths) in enumerate(todo, start=1):
        target = out_dir / name
        if target.resolve() in sources:
            problems.append(f"{target}: is an input; not written over")
            continue
        if target.exists() and not overwrite:
            problems.append(f"{target}: exists; not replaced (use --overwrite to replace outputs)")
            continue
        try:
            labels, r, notes = segment_case(predictor, paths, plan, names, seen, max_voxels, flip)
            warn(paths[0], notes)
            save_labels(target, labels, r.source_affine)
        except (VolumeError, OSError) as error:
            problems.append(str(error) if isinstance(error, (VolumeError, NoSpaceError)) else f"{target}: {error}")
            continue
        written.append(target)
        if volumes is not None:
            rows.append(volume_row(paths[0].name, labels, r.source_affine, len(names)))
        print(f"[{index}/{len(todo)}] {paths[0].name} -> {target}", flush=True)
        if qc is not None:
            _written(lambda picture: write_qc(picture, load_volume(paths[0], max_voxels=max_voxels).data, labels,
                                              r.source_affine, names, f"{paths[0]}  ->  {target}"),
                     qc / f"{plain_name(paths[0])}.png", problems)
    if volumes is not None:
        _written(lambda path: write_volumes(path, names, rows), volumes, problems)
    names_file = out_dir / "class_names.json"
    text = json.dumps(names, indent=1)
    if not names_file.exists() or overwrite or names_file.read_text() == text:
        _written(lambda path: write_atomic(path, lambda tmp: Path(tmp).write_text(text), ".json"), names_file, problems)
    else:
        problems.append(f"{names_file}: exists with other class names; not replaced (use --overwrite)")
    if problems:
        raise SegmentationError(problems, written)
    return written
