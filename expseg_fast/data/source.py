"""Where a run's subjects come from: a dataset on disk, or the synthetic demo dataset built once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from expseg_fast.data import demo
from expseg_fast.data.dataset import DatasetError, LabelMap, Pair, find_pairs, plain_name, validate
from expseg_fast.data.identity import SubjectId
from expseg_fast.data.nifti import MAX_VOXELS, VolumeError, content_digest, load_volume
from expseg_fast.data.plans import Plan


@dataclass
class Dataset:
    """A scanned dataset: its pairs with their SubjectIds (same order), the label map, where it lies
    (root: the folder or list, absolute) and the label map's file (None for the demo dataset's own).
    The label maps the generator draws from (synth) have no pairs: their files are `maps`."""

    pairs: list[Pair]
    label_map: LabelMap
    subjects: list[SubjectId]
    root: Path
    label_map_file: Path | None
    maps: list[Path] = field(default_factory=list)
    lacking: list[int] = field(default_factory=list)  # classes (of the model it is aligned to) its labels lack

    @property
    def channels(self) -> int:
        """Image channels per case (the generator draws one)."""
        return len(self.pairs[0].images) if self.pairs else 1


SYNTH = "synth"  # the --data that trains on images drawn from the packaged label maps (expseg_fast/data/synth.py)


MAP_ORIENTATION = ("L", "I", "A")  # the packaged label maps' axes (anatomy.pack keeps the sources' FreeSurfer LIA)


def map_geometry_problem(affine: np.ndarray) -> str | None:
    """Why a label map's affine is not the packaged maps' geometry (1 mm voxels along the axes, in
    MAP_ORIENTATION order), or None."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = np.abs(affine[:3, :3] / spacing)
    codes = "".join(nib.aff2axcodes(affine))
    oblique = not np.allclose(direction, np.round(direction), atol=1e-3)
    if oblique or codes != "".join(MAP_ORIENTATION):
        return (f"orientation {codes}{' (oblique)' if oblique else ''}, the packaged label maps are "
                f"{''.join(MAP_ORIENTATION)} (FreeSurfer's conformed axes)")
    if not np.allclose(spacing, 1.0, atol=1e-3):
        return f"voxels of {' x '.join(f'{v:g}' for v in spacing)} mm, the packaged label maps have 1 mm"
    return None


def open_synth(limit: int | None = None) -> Dataset:
    """The packaged label maps (expseg_fast/data/anatomy/) as the generator's dataset: each checked
    (integer values the generation table knows) and digested; the first `limit` only."""
    from expseg_fast.data import anatomy

    files = anatomy.label_map_files()[:limit]
    table, problems, subjects = anatomy.GenerationTable.read(), [], []
    for path in files:
        try:
            volume = load_volume(path, dtype=np.float64, max_voxels=None)
        except VolumeError as error:
            problems.append(str(error))
            continue
        outside = sorted({int(v) for v in np.unique(volume.data)} - set(range(len(table.freesurfer_ids))))
        if outside:
            problems.append(f"{path}: label values outside the generation table: {outside[:10]}")
        geometry = map_geometry_problem(volume.affine)
        if geometry:
            problems.append(f"{path}: {geometry}")
        subjects.append(SubjectId(plain_name(path), (), content_digest(volume)))
    if problems or len(files) < 2:
        raise DatasetError(problems or [f"{anatomy.MAPS}: fewer than 2 label maps"])
    return Dataset([], LabelMap.from_json(anatomy.CLASSES_FILE), subjects, anatomy.MAPS.resolve(), None, list(files))


@dataclass(frozen=True)
class DataLocation:
    """Where a dataset lies: a dataset folder or list (data) with its JSON label map; or, data None, the
    demo dataset of the demo settings, built once in demo_root/demo-data-NAME-SUBJECTS."""

    data: str | None
    label_map: str | None = None
    demo: demo.DemoSettings | None = None
    demo_name: str = ""
    demo_root: Path = Path(".")


def open_dataset(where: DataLocation, limit_subjects: int | None = None, plan: Plan | None = None,
                 max_voxels: int = MAX_VOXELS) -> Dataset:
    """The dataset, scanned (every problem at once, the label map's with the data's, before anything is
    written; with a plan, also the scans it would lose or that would cost too much). limit_subjects: only
    the first N pairs (and only N demo subjects built). DatasetError listing the problems."""
    data, label_map = where.data, where.label_map
    problems: list[str] = []
    labels: LabelMap | None
    map_file: Path | None = None
    if data is None:
        settings = where.demo
        if limit_subjects:  # build only what is used
            settings = dataclasses.replace(settings, subjects=max(2, limit_subjects))
        root = demo.build(where.demo_root / f"demo-data-{where.demo_name}-{settings.subjects}", settings)
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
