"""Hard Dice of a trained run on its validation subjects in each scan's ORIGINAL space.

The trainer's validation Dice is measured on the preprocessed grid (the size^3 training cube: the whole
scan fitted for `fit`, a crop around the foreground for `spacing`), so runs trained at different sizes
are measured on different grids: a structure of 3 voxels at 32^3 has 24 at 64^3. `evaluate` segments
each validation subject as segment.py does (the checkpoint's preprocessing; for `spacing` sliding
windows over the whole scan; the prediction mapped back by nearest neighbour) and compares it with the
subject's own label file, on its own grid, as nnU-Net evaluates. Beside it, the trainer's own figure:
the subject's training cube through the network once, scored on that cube.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from expseg_fast.config import PREDICTOR, TrainConfig
from expseg_fast.data import load_volume, preprocess_pair
from expseg_fast.data.dataset import LabelMap, Pair
from expseg_fast.data.identity import DataPin
from expseg_fast.data.plans import Plan
from expseg_fast.data.preprocess import IGNORE
from expseg_fast.data.source import SYNTH, Dataset
from expseg_fast.inference.files import load_model, predictor_for, segment_case, warn
from expseg_fast.inference.predictor import Predictor
from expseg_fast.machine import torch_device
from expseg_fast.metrics import hard_dice


@dataclass
class Evaluation:
    """Per subject and label (S, C-1) Dice in [0, 1] without background, NaN where a label is absent from
    both maps: `original` on the label file's grid, `resampled` on the training cube (the trainer's)."""

    checkpoint: str
    epoch: int  # epochs trained (1 for the first)
    subjects: list[str]
    names: list[str]  # class names without background
    original: np.ndarray
    resampled: np.ndarray
    source: str = ""  # which subjects of which data were scored, and why
    not_in_protocol: list[str] = field(default_factory=list)  # model classes the data's labels lack (NaN)

    @staticmethod
    def average(dice: np.ndarray) -> tuple[np.ndarray, float]:
        """(per-label mean over subjects (C-1,), their mean over labels) in %, NaN ignored (Table 1's)."""
        with warnings.catch_warnings():  # a class not in the data is NaN for every subject
            warnings.simplefilter("ignore", RuntimeWarning)
            per_label = 100 * np.nanmean(dice, axis=0)
        return per_label, float(np.nanmean(per_label))

    def to_dict(self) -> dict:
        out = {"checkpoint": self.checkpoint, "epoch": self.epoch, "source": self.source, "subjects": self.subjects,
               "labels": self.names, "not_in_protocol": self.not_in_protocol}
        for grid in ("original", "resampled"):
            per_label, average = self.average(getattr(self, grid))
            out[grid] = {"average": average, "per_label": [float(x) for x in per_label],
                         "per_subject": [[float(x) for x in row] for row in getattr(self, grid)]}
        return out


def evaluate(checkpoint: str | Path, data: str | None = None, label_map: str | None = None,
             device: str = "auto", max_voxels: int | None = None, flip: bool = PREDICTOR.flip) -> Evaluation:
    """Evaluates the checkpoint on its run's validation subjects, as the run pinned them (names and
    content digests): from the run's dataset (its absolute path; the demo dataset is looked for beside
    the run folder, where the trainer built it), where a missing or changed validation subject, or a
    changed label map, is a ValueError naming it. With data (and its label_map) other data is scored
    on purpose: the run's validation subjects found in it by content, and subjects the run never saw;
    its training subjects are left out; `Evaluation.source` says which. flip: as segment.py's (the scan's
    own grid only; the cube figure stays one plain pass). ValueError naming what is wrong."""
    checkpoint = Path(checkpoint)
    dev = torch_device(device)
    loaded = load_model(checkpoint, dev)
    config, plan, names = loaded.config, loaded.plan, loaded.names
    max_voxels = max_voxels or config.max_voxels
    other = data is not None
    found = _dataset(config, data, label_map, checkpoint, max_voxels, loaded.inference_only)
    protocol, lacking = found.label_map.aligned_to(names, str(found.label_map_file or found.root))
    if not other and config.val_data is None and list(found.label_map.names) != names:
        raise ValueError(f"{checkpoint}: trained on classes {names}, the dataset has {list(found.label_map.names)}")
    found.label_map = protocol
    chosen, source = _subjects(loaded.pin, found, config, other, checkpoint)
    predictors = (predictor_for(loaded.model, config, plan, dev), predictor_for(loaded.model, config, plan, dev, 1))
    scores = [_score(found.pairs[i], protocol, plan, predictors, max_voxels, loaded.data_range, flip) for i in chosen]
    original, on_cube = (torch.stack([s[k] for s in scores]) for k in (0, 1))
    original[:, [c - 1 for c in lacking]] = on_cube[:, [c - 1 for c in lacking]] = float("nan")
    return Evaluation(str(checkpoint), loaded.epochs, [found.pairs[i].image.name for i in chosen], names[1:],
                      original.numpy(), on_cube.numpy(), source, [names[c] for c in lacking])


def _dataset(config: TrainConfig, data: str | None, label_map: str | None, checkpoint: Path,
             max_voxels: int, inference_only: bool) -> Dataset:
    """The data to score, scanned: other data when given, else the run's validation data (its own
    dataset, the demo dataset beside the run folder, or its --val-data), which an inference-only copy
    names by folder name only."""
    if data is None and config.data == SYNTH and config.val_data is None:
        raise ValueError(f"{checkpoint}: its run validated on images generated from label maps; score real scans "
                         f"with --data FOLDER --label-map MAP")
    scored_on = config.val_data or (config.data if config.data != SYNTH else None)  # None: the demo, found by place
    if data is None and inference_only and scored_on is not None:
        raise ValueError(f"{checkpoint}: an inference-only copy names its run's data by folder name only "
                         f"({scored_on}); score it with --data FOLDER --label-map MAP")
    if data is None and config.val_data is not None:
        data, label_map = config.val_data, config.val_label_map
    run_folder = checkpoint.resolve().parent
    if data is not None:
        return config.open_data(data, label_map, run_folder, max_voxels=max_voxels)
    return config.open_data(config.data, config.label_map, run_folder, limit_subjects=config.limit_subjects,
                            max_voxels=max_voxels)


def _score(pair: Pair, label_map: LabelMap, plan: Plan, predictors: tuple[Predictor, Predictor],
           max_voxels: int, seen: dict | None, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Dice on the label file's grid, Dice on the training cube) of one subject, without background;
    warns, naming the scan, where it or its prediction is unlike the training data `seen`.
    predictors: the plan's windows per call, and one cube per call."""
    windows, one_cube = predictors
    num_classes = len(label_map.names)
    # the user's figure: the prediction segment.py writes, on the label file's grid
    predicted, _, notes = segment_case(windows, pair.images, plan, list(label_map.names), seen, max_voxels, flip)
    warn(pair.image, notes)
    predicted = predicted.astype(np.int64)
    truth = label_map.apply(load_volume(pair.label, dtype=np.int64, max_voxels=None).data).astype(np.int64)
    original = hard_dice(torch.from_numpy(predicted), torch.from_numpy(truth), num_classes, IGNORE)[1:]
    # the trainer's figure: its own preprocessed sample (the training cube) through the network once
    sample = preprocess_pair(pair, label_map, plan)
    cube = sample.image if sample.image.ndim == 4 else sample.image[None]
    cube_labels = one_cube(torch.from_numpy(np.ascontiguousarray(cube))[None])[0].cpu()
    on_cube = hard_dice(cube_labels, torch.from_numpy(sample.labels.astype(np.int64)), num_classes, IGNORE)[1:]
    return original, on_cube


def _subjects(pin: DataPin | None, found: Dataset, config: TrainConfig, other: bool,
              checkpoint: Path) -> tuple[list[int], str]:
    """(indices of the subjects to score, a line saying what they are)."""
    if pin is None and other:
        return list(range(len(found.pairs))), (f"{found.root}: OTHER data than the run's, scored on purpose: all its "
                                               f"{len(found.pairs)} subjects ({checkpoint} predates pinned splits, so "
                                               f"its training subjects cannot be told apart)")
    if pin is None:  # a checkpoint older than pinning
        _, val_idx = config.split_indices(len(found.pairs))
        return val_idx, (f"{found.root}: the validation split recomputed from the subject count ({checkpoint} "
                         f"predates pinned splits: right only if the dataset is unchanged)")
    if not other:
        val_idx, _ = pin.select("validation", found.subjects, found.label_map, str(found.root))
        return val_idx, f"{found.root}: the run's {len(val_idx)} pinned validation subjects"
    roles = pin.roles()
    role = [roles.get((s.images, s.label)) for s in found.subjects]
    chosen = [i for i, r in enumerate(role) if r != "training"]
    if not chosen:
        raise ValueError(f"{found.root}: every subject is one the run trained on; nothing to score")
    validation, trained = role.count("validation"), role.count("training")
    return chosen, (f"{found.root}: OTHER data than the run's, scored on purpose: {validation} of the run's validation "
                    f"subjects, {len(chosen) - validation} it never saw; {trained} of its training subjects left out")
