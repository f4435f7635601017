"""Where a run's subjects come from: a dataset on disk, or the synthetic demo dataset built once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from expseg_fast.data import demo
from expseg_fast.data.dataset import DatasetError, LabelMap, Pair, find_pairs, validate
from expseg_fast.data.identity import SubjectId
from expseg_fast.data.nifti import MAX_VOXELS
from expseg_fast.data.plans import Plan


@dataclass
class Dataset:
    """A scanned dataset: its pairs with their SubjectIds (same order), the label map, where it lies
    (root: the folder or list, absolute) and the label map's file (None for the demo dataset's own)."""

    pairs: list[Pair]
    label_map: LabelMap
    subjects: list[SubjectId]
    root: Path
    label_map_file: Path | None


def open_dataset(data: str | None, label_map: str | None, demo_settings: demo.DemoSettings, demo_name: str,
                 demo_root: Path, limit_subjects: int | None = None, plan: Plan | None = None,
                 max_voxels: int = MAX_VOXELS) -> Dataset:
    """The dataset, scanned (every problem at once, the label map's with the data's, before anything is
    written; with a plan, also the scans it would lose or that would cost too much). data: a dataset folder
    or list, with its JSON label_map; None: the demo dataset of demo_settings, built once in
    demo_root/demo-data-NAME-SUBJECTS. limit_subjects: only the first N pairs (and only N demo
    subjects built). DatasetError listing the problems."""
    problems: list[str] = []
    labels: LabelMap | None
    map_file: Path | None = None
    if data is None:
        if limit_subjects:  # build only what is used
            demo_settings = dataclasses.replace(demo_settings, subjects=max(2, limit_subjects))
        root = demo.build(demo_root / f"demo-data-{demo_name}-{demo_settings.subjects}", demo_settings)
        labels = LabelMap.from_json(root / "label_map.json")
    else:
        if label_map is None:
            raise ValueError("--label-map is required with --data (it names the classes)")
        root, map_file = Path(data), Path(label_map)
        try:
            labels = LabelMap.from_json(map_file)
        except ValueError as error:  # reported with the data's problems
            problems.append(str(error))
            labels = None
    try:
        pairs = find_pairs(root, problems)
    except DatasetError as error:
        raise DatasetError(problems + [p for p in error.problems if p not in problems]) from None
    if limit_subjects:
        pairs = pairs[:limit_subjects]
    subjects = validate(pairs, labels, plan, problems, max_voxels)
    return Dataset(pairs, labels, subjects, Path(root).resolve(), map_file.resolve() if map_file else None)
