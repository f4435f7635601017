"""segment.py's --volumes: a CSV of a row per segmented scan, as SynthSeg's and FastSurfer's users expect —
the input's file name, then the volume (mm³) of every class but the background, named in the header by
the class names, then their total (for the generator's models: the brain), each counted on the scan's
own grid from its segmentation."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from expseg_fast.atomic import write_atomic
from expseg_fast.data.facts import class_volumes_ml

TOTAL = "total"  # the last column: every class but the background


def volume_row(name: str, labels: np.ndarray, affine: np.ndarray, num_classes: int) -> list:
    """[name, mm³ of class 1, ..., mm³ of class num_classes - 1, their total] of a label volume (its own
    grid, `affine` its voxel -> world in mm)."""
    mm3 = [1000.0 * ml for ml in class_volumes_ml(labels, affine, num_classes)[1:]]
    return [name, *mm3, sum(mm3)]


def write_volumes(path: Path, names: list[str], rows: list[list]) -> None:
    """The CSV (header: file, the class names but the background's, total) written atomically; volumes in
    mm³ with three decimals."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", *names[1:], TOTAL])
    writer.writerows([row[0], *(f"{v:.3f}" for v in row[1:])] for row in rows)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text.getvalue()), path.suffix or ".csv")
