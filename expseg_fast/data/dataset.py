"""Datasets of image/label NIfTI pairs: discovery, label maps, and a scan that reports every problem.

A dataset is a folder in the imagesTr/ + labelsTr/ convention (matched by name; images carry
nnU-Net's channel suffix: CASE_0000, CASE_0001, ... are the channels of one case, a file without the
suffix a single-channel case), or a JSON list [{"image": ... or [channel files], "label": ...}, ...]
or a CSV with columns image,label (paths relative to the list's folder). Every case of a dataset has
the same number of channels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expseg_fast.data.nifti import VolumeError, affines_match, load_volume, nonfinite_problem
from expseg_fast.data.preprocess import resampling_problem

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DatasetError(ValueError):
    """Problems found in a dataset, one line per problem, each naming its file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class Pair:
    """A case: its image (channel 0), its label map, and its further channels (1, 2, ...)."""

    image: Path
    label: Path
    more_channels: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        """Every channel's file, in channel order."""
        return (self.image, *self.more_channels)


@dataclass(frozen=True)
class LabelMap:
    """Training classes: names[c] is class c; source ids (FreeSurfer, Neuromorphometrics, ...) map to
    classes through `lookup`. JSON form: {"classes": [{"name": "background", "ids": [0]}, ...]}."""

    names: tuple[str, ...]
    lookup: dict[int, int]

    @classmethod
    def identity(cls, num_classes: int) -> "LabelMap":
        return cls(tuple(f"class {c}" for c in range(num_classes)), {c: c for c in range(num_classes)})

    @classmethod
    def from_json(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
            classes = spec["classes"]
            names = tuple(str(c["name"]) for c in classes)
            lookup: dict[int, int] = {}
            for index, c in enumerate(classes):
                for source in c["ids"]:
                    if isinstance(source, bool) or not isinstance(source, int):
                        raise ValueError(f"class {c['name']!r}: id {source!r} is not an integer")
                    if source in lookup:
                        raise ValueError(f"source id {source} is listed for two classes")
                    lookup[source] = index
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a label map ({error}); expected "
                             '{"classes": [{"name": ..., "ids": [...]}, ...]}') from error
        if len(names) < 2:
            raise ValueError(f"{path}: a label map needs at least 2 classes, got {len(names)}")
        return cls(names, lookup)

    def unknown(self, values: np.ndarray) -> list[int]:
        """The values (sorted) that the map does not know."""
        return sorted(int(v) for v in np.unique(values) if int(v) not in self.lookup)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Source ids -> class indices (uint8 for up to 256 classes, else int16)."""
        values, inverse = np.unique(labels, return_inverse=True)
        classes = np.array([self.lookup[int(v)] for v in values])
        dtype = np.uint8 if len(self.names) <= 256 else np.int16
        return classes[inverse].reshape(labels.shape).astype(dtype)


def plain_name(path: Path) -> str:
    """The file name without its NIfTI suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_and_channel(path: Path, known: set[str] = frozenset()) -> tuple[str, int]:
    """(case name, channel index) of an image file: NAME_0001.nii.gz -> ("NAME", 1). A name in `known`
    (a label file's name), or one without a channel suffix, is a single-channel case of that name."""
    name = plain_name(path)
    if name not in known and len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        return name[:-5], int(name[-4:])
    return name, 0


def group_channels(paths: list[Path], problems: list[str], known: set[str] = frozenset(),
                   expected: int | None = None) -> dict[str, tuple[Path, ...]]:
    """{case: channel files in order} of image files; a case whose channels are not 0..K-1, or whose K
    differs from `expected` (default: the most common count), is reported in problems and left out.
    known: case_and_channel's."""
    cases: dict[str, dict[int, Path]] = {}
    for path in paths:
        case, channel = case_and_channel(path, known)
        if channel in cases.setdefault(case, {}):
            problems.append(f"{path}: a second file for channel {channel} of case {case}")
            continue
        cases[case][channel] = path
    grouped = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(len(channels))):
            found = ", ".join(f"{c:04d}" for c in sorted(channels))
            problems.append(f"{channels[min(channels)]}: case {case} has channels {found}; expected 0000 to "
                            f"{len(channels) - 1:04d} without gaps")
            continue
        grouped[case] = tuple(channels[c] for c in range(len(channels)))
    counts = [len(v) for v in grouped.values()]
    if counts and (len(set(counts)) > 1 or expected is not None):
        usual = expected if expected is not None else max(set(counts), key=counts.count)
        for case in [c for c, v in grouped.items() if len(v) != usual]:
            problems.append(f"{grouped[case][0]}: case {case} has {len(grouped[case])} channel(s); "
                            f"{'the model takes' if expected is not None else 'the others have'} {usual}")
            del grouped[case]
    return grouped


def find_pairs(source: str | Path, problems: list[str] | None = None) -> list[Pair]:
    """Image/label pairs of a dataset folder or list file. Files without their partner raise
    DatasetError, or, when a `problems` list is given, are reported there and left out (so that one
    scan can name every problem of the dataset)."""
    source = Path(source)
    if source.is_dir():
        images_dir, labels_dir = source / "imagesTr", source / "labelsTr"
        if not images_dir.is_dir() or not labels_dir.is_dir():
            raise DatasetError([f"{source}: expected the folders imagesTr/ and labelsTr/"])
        found: list[str] = []
        labels = {plain_name(p): p for p in sorted(labels_dir.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
        images = group_channels([p for p in sorted(images_dir.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)], found,
                                set(labels))
        unpaired = found + [f"{images[k][0]}: no label file in {labels_dir}" for k in sorted(images.keys() - labels.keys())]
        unpaired += [f"{labels[k]}: no image file in {images_dir}" for k in sorted(labels.keys() - images.keys())]
        if unpaired and problems is None:
            raise DatasetError(unpaired)
        if unpaired:
            problems += unpaired
        pairs = [Pair(images[k][0], labels[k], images[k][1:]) for k in sorted(images.keys() & labels.keys())]
    elif source.suffix in (".json", ".csv") and source.is_file():
        pairs = _read_list(source)
    else:
        raise DatasetError([f"{source}: not a dataset folder (imagesTr/, labelsTr/) or a .json / .csv list"])
    if not pairs:
        raise DatasetError((problems or []) + [f"{source}: no image/label pairs found"])
    return pairs


def _read_list(path: Path) -> list[Pair]:
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        pairs = []
        for row in rows:
            images = [row["image"]] if isinstance(row["image"], str) else list(row["image"])
            channels = tuple(path.parent / image for image in images)
            pairs.append(Pair(channels[0], path.parent / row["label"], channels[1:]))
        return pairs
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError([f"{path}: cannot read the image/label list ({error})"]) from error


def scan(pairs: list[Pair], label_map: LabelMap, size: int | None = None) -> list[str]:
    """Every problem of every pair (reads all files), one message each naming the file. With size, also
    the volumes that resampling to size^3 would lose (resampling_problem)."""
    problems = _duplicates(pairs)
    channel_counts = {len(pair.images) for pair in pairs}
    if len(channel_counts) > 1:
        problems.append(f"the cases have different numbers of channels: {sorted(channel_counts)}")
    for pair in pairs:
        image = None
        for index, path in enumerate(pair.images):
            try:
                channel = load_volume(path)
            except VolumeError as error:
                problems.append(str(error))
                continue
            problems += filter(None, [nonfinite_problem(path, channel)])
            if index == 0:
                image = channel
            elif image is not None and (channel.data.shape != image.data.shape or not affines_match(image, channel)):
                problems.append(f"{path}: shape or affine differs from channel 0 ({pair.image})")
        try:
            label = load_volume(pair.label, dtype=np.float64)
        except VolumeError as error:
            problems.append(str(error))
            label = None
        if label is not None:
            values = label.data
            if not np.isfinite(values).all() or (values != np.round(values)).any():
                problems.append(f"{pair.label}: label values must be integers")
            else:
                unknown = label_map.unknown(values.astype(np.int64))
                if unknown:
                    shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
                    problems.append(f"{pair.label}: label values outside the label map: {shown}")
                elif (label_map.apply(values.astype(np.int64)) == 0).all():
                    problems.append(f"{pair.label}: empty label map (background only)")
        if image is not None and label is not None:
            if image.data.shape != label.data.shape:
                problems.append(f"{pair.label}: shape {label.data.shape} differs from its image's {image.data.shape}")
            elif not affines_match(image, label):
                problems.append(f"{pair.label}: affine differs from its image's ({pair.image})")
        if image is not None and size is not None:
            problem = resampling_problem(pair.image, image.data.shape, image.affine, size)
            if problem:
                problems.append(problem)
    return problems


def _duplicates(pairs: list[Pair]) -> list[str]:
    """A file listed in two pairs (one subject could land in training and validation at once)."""
    problems, seen = [], {}
    for index, pair in enumerate(pairs):
        for path in (*pair.images, pair.label):
            key = Path(path).resolve()
            if key in seen and seen[key] != index:
                problems.append(f"{path}: listed more than once in the dataset (pairs {seen[key] + 1} and {index + 1})")
            seen.setdefault(key, index)
    return problems


def validate(pairs: list[Pair], label_map: LabelMap, size: int | None = None, problems: list[str] | None = None) -> None:
    """Raise DatasetError listing all problems at once (the given ones, e.g. from find_pairs, first);
    nothing should be written before this passes."""
    problems = list(problems or []) + scan(pairs, label_map, size)
    if problems:
        raise DatasetError(problems)
