"""Where a run's subjects come from: a dataset on disk, or the synthetic demo dataset built once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from expseg_fast.data import demo
from expseg_fast.data.dataset import LabelMap, Pair, find_pairs, validate


def open_dataset(data: str | None, label_map: str | None, demo_settings: demo.DemoSettings, demo_name: str,
                 demo_root: Path, limit_subjects: int | None = None,
                 size: int | None = None) -> tuple[list[Pair], LabelMap]:
    """(pairs, label map), scanned (every problem at once, before anything is written; with size, also
    the volumes that resampling to size^3 would lose). data: a dataset folder or list, with its JSON
    label_map; None: the demo dataset of demo_settings, built once in demo_root/demo-data-NAME-SUBJECTS.
    limit_subjects: only the first N pairs (and only N demo subjects built)."""
    problems: list[str] = []
    if data is None:
        if limit_subjects:  # build only what is used
            demo_settings = dataclasses.replace(demo_settings, subjects=max(2, limit_subjects))
        root = demo.build(demo_root / f"demo-data-{demo_name}-{demo_settings.subjects}", demo_settings)
        labels = LabelMap.from_json(root / "label_map.json")
        pairs = find_pairs(root, problems)
    else:
        if label_map is None:
            raise ValueError("--label-map is required with --data (it names the classes)")
        pairs = find_pairs(data, problems)
        labels = LabelMap.from_json(label_map)
    if limit_subjects:
        pairs = pairs[:limit_subjects]
    validate(pairs, labels, size, problems)
    return pairs, labels
