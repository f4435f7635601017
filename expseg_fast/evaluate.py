"""Hard Dice of a trained run on its validation subjects in each scan's ORIGINAL space.

The trainer's validation Dice is measured on the preprocessed grid (the size^3 cube), so runs trained at
different sizes are measured on different grids: a structure of 3 voxels at 32^3 has 24 at 64^3.
`evaluate` segments each validation subject as segment.py does (the checkpoint's preprocessing,
prediction mapped back by nearest neighbour) and compares it with the subject's own label file, on its
own grid, as nnU-Net evaluates; the Dice on the preprocessed grid is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expseg_fast.data import apply_labels, invert_labels, load_volume, random_splits
from expseg_fast.data.source import open_dataset
from expseg_fast.infer_files import case_image, load_model, predict_labels, predictor_for
from expseg_fast.machine import torch_device
from expseg_fast.metrics import hard_dice


@dataclass
class Evaluation:
    """Per subject and label (S, C-1) Dice in [0, 1] without background, NaN where a label is absent from
    both maps: `original` on the label file's grid, `resampled` on the preprocessed grid."""

    checkpoint: str
    epoch: int  # epochs trained (1 for the first)
    subjects: list[str]
    names: list[str]  # class names without background
    original: np.ndarray
    resampled: np.ndarray

    @staticmethod
    def average(dice: np.ndarray) -> tuple[np.ndarray, float]:
        """(per-label mean over subjects (C-1,), their mean over labels) in %, NaN ignored (Table 1's)."""
        per_label = 100 * np.nanmean(dice, axis=0)
        return per_label, float(np.nanmean(per_label))

    def to_dict(self) -> dict:
        out = {"checkpoint": self.checkpoint, "epoch": self.epoch, "subjects": self.subjects, "labels": self.names}
        for grid in ("original", "resampled"):
            per_label, average = self.average(getattr(self, grid))
            out[grid] = {"average": average, "per_label": [float(x) for x in per_label],
                         "per_subject": [[float(x) for x in row] for row in getattr(self, grid)]}
        return out


def evaluate(checkpoint: str | Path, data: str | None = None, label_map: str | None = None,
             device: str = "auto") -> Evaluation:
    """Evaluates the checkpoint on its run's validation split (the run's splits, split and seed). The
    subjects are the run's dataset (data/label_map when it has moved); the demo dataset is looked for
    beside the run folder, where the trainer built it. ValueError naming what is wrong."""
    checkpoint = Path(checkpoint)
    dev = torch_device(device)
    model, config, names, _, epoch = load_model(checkpoint, dev)
    if data is not None:
        config.data, config.label_map = data, label_map
    pairs, classes = open_dataset(config.data, config.label_map, config.demo_settings(), config.demo_preset,
                                  checkpoint.resolve().parent.parent, config.limit_subjects)
    if list(classes.names) != names:
        raise ValueError(f"{checkpoint}: trained on classes {names}, the dataset has {list(classes.names)}")
    _, val_idx = random_splits(len(pairs), config.splits, seed=config.seed)[config.split]
    predictor = predictor_for(model, config, dev)
    original, resampled, subjects = [], [], []
    for i in val_idx:
        pair = pairs[i]
        image, r, _ = case_image((pair.image, *pair.more_channels), config)
        labels = predict_labels(predictor, image, config, len(names))
        truth = classes.apply(load_volume(pair.label, dtype=np.int64).data).astype(np.int64)
        pred_original = invert_labels(labels, r).astype(np.int64)
        original.append(hard_dice(torch.from_numpy(pred_original), torch.from_numpy(truth), len(names))[1:])
        resampled.append(hard_dice(torch.from_numpy(labels.astype(np.int64)),
                                   torch.from_numpy(apply_labels(truth, r).astype(np.int64)), len(names))[1:])
        subjects.append(pair.image.name)
    return Evaluation(str(checkpoint), epoch, subjects, names[1:], torch.stack(original).numpy(),
                      torch.stack(resampled).numpy())
