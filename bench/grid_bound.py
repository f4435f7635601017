"""What a coarser grid costs a perfect model: the Dice of perfect partial-volume predictions on a grid of
G mm, upsampled trilinearly to the label map's own grid and taken by arg max, against the labels.

For each class, its exact volume fraction in every voxel of the coarse grid (the labels' one-hot averaged
over each coarse voxel, torch's `area` interpolation to round(extent / G) voxels per axis), upsampled
trilinearly (align_corners=False) to the source grid; the label is the arg max over classes. What a model
predicting on that grid cannot do better than, whatever it learns (issue 35 chooses its grid on it).

python -m bench.grid_bound LABELS MAP [--grids 2.5 2.0 1.5] [--out DIR]
  LABELS: a label volume (NIfTI or MGH; e.g. FreeSurfer's aparc+aseg at 1 mm), MAP: the protocol
  mapping its ids to classes (e.g. expseg_fast/data/anatomy/protocols/freesurfer_aseg.json).
Prints one table (Dice % per class and grid, the mean over the classes present); writes grid_bound.json/.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.outputs import publish
from expseg_fast.data import LabelMap, load_volume
from expseg_fast.data.preprocess import IGNORE


def bound(classes: np.ndarray, spacing: np.ndarray, grid_mm: float, num_classes: int) -> list[float]:
    """Dice (num_classes,) of the arg max of the upsampled partial volumes on a grid_mm grid, against
    `classes` (D, H, W) class indices on voxels of `spacing` mm (IGNORE: not scored); NaN where absent."""
    shape = classes.shape
    coarse = tuple(max(1, round(n * s / grid_mm)) for n, s in zip(shape, spacing, strict=True))
    labels = torch.from_numpy(classes.astype(np.int64))
    best = torch.full(shape, -1.0)
    arg = torch.zeros(shape, dtype=torch.int64)
    for c in range(num_classes):
        fraction = F.interpolate((labels == c).float()[None, None], size=coarse, mode="area")
        up = F.interpolate(fraction, size=shape, mode="trilinear", align_corners=False)[0, 0]
        better = up > best
        best = torch.where(better, up, best)
        arg = torch.where(better, c, arg)
    scored = labels != IGNORE
    dice = []
    for c in range(num_classes):
        truth, pred = (labels == c) & scored, (arg == c) & scored
        total = int(truth.sum() + pred.sum())
        dice.append(2 * int((truth & pred).sum()) / total if int(truth.sum()) else float("nan"))
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=Path)
    parser.add_argument("map", type=Path)
    parser.add_argument("--grids", type=float, nargs="+", default=[2.5, 2.0, 1.5])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    label_map = LabelMap.from_json(args.map)
    volume = load_volume(args.labels, dtype=np.int64, max_voxels=None)
    classes = label_map.apply(volume.data)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    names = label_map.names
    rows = [{"grid_mm": g, "dice": bound(classes, spacing, g, len(names)), "classes": list(names)} for g in args.grids]
    lines = ["| class | " + " | ".join(f"{g} mm" for g in args.grids) + " |", "|---" * (len(args.grids) + 1) + "|"]
    for c in range(1, len(names)):
        lines.append(f"| {names[c]} | " + " | ".join(f"{100 * r['dice'][c]:.1f}" for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * np.nanmean(r['dice'][1:]):.1f}**" for r in rows) + " |")
    text = (f"Perfect partial-volume predictions on each grid, upsampled to {args.labels.name}'s "
            f"{'x'.join(f'{s:g}' for s in spacing)} mm grid (Dice %, background left out):\n\n"
            + "\n".join(lines) + "\n")
    publish(args.out, "grid_bound", rows, "What a grid costs a perfect model", text)


if __name__ == "__main__":
    main()
