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

from expseg_fast.data.identity import SubjectId
from expseg_fast.data.nifti import (
    MAX_VOXELS,
    VolumeError,
    affines_match,
    content_digest,
    load_volume,
    nonfinite_problem,
    volume_suffix,
    voxel_digest,
)
from expseg_fast.data.plans import Plan
from expseg_fast.data.preprocess import IGNORE


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
    """Classes: names[c] is class c; source ids (FreeSurfer, AAL, Neuromorphometrics, ...) map to classes
    through `lookup`. JSON form: {"classes": [{"name": "background", "ids": [0]}, ...]}, and for a map
    that scores another protocol's labels, "unlisted": "ignore": ids it does not list are not scored
    (they become IGNORE) instead of being an error."""

    names: tuple[str, ...]
    lookup: dict[int, int]
    ignore_unlisted: bool = False

    @classmethod
    def identity(cls, num_classes: int) -> "LabelMap":
        return cls(tuple(f"class {c}" for c in range(num_classes)), {c: c for c in range(num_classes)})

    @classmethod
    def from_json(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
            classes = spec["classes"]
            if spec.get("unlisted", "error") not in ("error", "ignore"):
                raise ValueError(f"unlisted must be 'error' or 'ignore', got {spec['unlisted']!r}")
            names = tuple(str(c["name"]) for c in classes)
            lookup: dict[int, int] = {}
            for index, c in enumerate(classes):
                for source in c["ids"]:
                    if isinstance(source, bool) or not isinstance(source, int):
                        raise ValueError(f"class {c['name']!r}: id {source!r} is not an integer")
                    if source in lookup:
                        raise ValueError(f"source id {source} is listed for two classes")
                    lookup[source] = index
        except RecursionError:
            raise ValueError(f"{path}: not a label map (nested too deeply to read)") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a label map ({error}); expected "
                             '{"classes": [{"name": ..., "ids": [...]}, ...]}') from error
        if len(names) < 2:
            raise ValueError(f"{path}: a label map needs at least 2 classes, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: a class name is listed twice")
        return cls(names, lookup, spec.get("unlisted") == "ignore")

    def unknown(self, values: np.ndarray) -> list[int]:
        """The values (sorted) that the map does not know (none when it ignores unlisted ids)."""
        if self.ignore_unlisted:
            return []
        return [v for v in present_values(values) if v not in self.lookup]

    def aligned_to(self, names: tuple[str, ...] | list[str], where: str) -> tuple["LabelMap", list[int]]:
        """(this map with its ids mapped onto the classes `names` (a model's), the indices of the classes
        of names that this map lacks: not listed, or listed without ids; never scored). ValueError naming a
        class of this map that names lacks, or when the map lacks class 0 (background)."""
        position = {name: i for i, name in enumerate(names)}
        extra = [name for name in self.names if name not in position]
        if extra:
            raise ValueError(f"{where}: classes {extra} are not among the model's {list(names)}")
        lookup = {source: position[self.names[c]] for source, c in self.lookup.items()}
        listed = {self.names[c] for c in self.lookup.values()}  # a class with "ids": [] is not in the data
        lacking = [i for i, name in enumerate(names) if name not in listed]
        if 0 in lacking:
            raise ValueError(f"{where}: lists no ids for the model's class 0, {names[0]!r}: without it the voxels "
                             f"where no structure is are never scored and every other class's Dice is inflated; "
                             f"add {{\"name\": \"{names[0]}\", \"ids\": [...]}} with the ids of those voxels")
        return LabelMap(tuple(names), lookup, self.ignore_unlisted), lacking

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Source ids -> class indices (uint8 for up to 255 classes, else int16); ids the map does not
        list become IGNORE when it ignores them."""
        dtype = np.uint8 if len(self.names) < IGNORE else np.int16
        span = _integer_span(labels)
        if span is not None:  # one table over the ids' range: a gather, where sorting 256^3 voxels takes seconds
            table = np.array([self.lookup.get(v, IGNORE) for v in range(span[0], span[1] + 1)], dtype)
            return table[_from_lowest(labels, span[0])]
        values, inverse = np.unique(labels, return_inverse=True)
        classes = np.array([self.lookup.get(int(v), IGNORE) for v in values])
        return classes[inverse].reshape(labels.shape).astype(dtype)


TABLE_SPAN = 1 << 16  # the widest range of integer ids mapped by one lookup table (else by sorting)


def _integer_span(labels: np.ndarray) -> tuple[int, int] | None:
    """(lowest, highest) id of an integer array whose ids span at most TABLE_SPAN values, else None."""
    if not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return None
    low, high = int(labels.min()), int(labels.max())
    return (low, high) if high - low < TABLE_SPAN else None


def _from_lowest(labels: np.ndarray, low: int) -> np.ndarray:
    """Integer ids as offsets from `low` (in the platform's index type where they move, so int8 cannot wrap)."""
    return labels if low == 0 else np.subtract(labels, low, dtype=np.intp)


def present_values(labels: np.ndarray) -> list[int]:
    """The distinct values of an array of integer ids, sorted (counted over their range where it is narrow)."""
    span = _integer_span(labels)
    if span is None:
        return [int(v) for v in np.unique(labels)]
    counts = np.bincount(_from_lowest(labels, span[0]).ravel(), minlength=span[1] - span[0] + 1)
    return [int(v) + span[0] for v in np.flatnonzero(counts)]


def plain_name(path: Path) -> str:
    """The file name without its volume suffix (.nii.gz, .nii, .mgz, .mgh)."""
    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def volume_files(folder: Path) -> list[Path]:
    """The volume files (NIfTI or MGH, by suffix) of a folder, sorted."""
    return sorted(p for p in folder.iterdir() if volume_suffix(p) and not p.is_dir())


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
        labels = {plain_name(p): p for p in volume_files(labels_dir)}
        images = group_channels(volume_files(images_dir), found, set(labels))
        unpaired = found + [f"{images[k][0]}: no label file in {labels_dir}"
                            for k in sorted(images.keys() - labels.keys())]
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
    except RecursionError:
        raise DatasetError([f"{path}: cannot read the image/label list (nested too deeply)"]) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError([f"{path}: cannot read the image/label list ({error})"]) from error


def subject_names(pairs: list[Pair]) -> list[str]:
    """Each pair's name: its label file's name without the NIfTI suffix (the case name), or, where two
    pairs share that name, the label file's path relative to the folder all label files lie under."""
    plain = [plain_name(pair.label) for pair in pairs]
    if len(set(plain)) == len(plain):
        return plain
    labels = [Path(pair.label).resolve() for pair in pairs]
    parents = [p.parent.parts for p in labels]
    common = next((i for i in range(len(parents[0])) if any(len(q) <= i or q[i] != parents[0][i] for q in parents)),
                  len(parents[0]))
    return [str(p.relative_to(Path(*parents[0][:common]))) for p in labels]


@dataclass
class ScanResult:
    """problems: one line each naming its file; subjects: the SubjectId of each pair (None where one of
    its files could not be read)."""

    problems: list[str]
    subjects: list[SubjectId | None]


def scan(pairs: list[Pair], label_map: LabelMap | None, plan: Plan | None = None,
         max_voxels: int = MAX_VOXELS) -> list[str]:
    """Every problem of every pair (reads all files), one message each naming the file (scan_dataset)."""
    return scan_dataset(pairs, label_map, plan, max_voxels).problems


def scan_dataset(pairs: list[Pair], label_map: LabelMap | None, plan: Plan | None = None,
                 max_voxels: int = MAX_VOXELS) -> ScanResult:
    """Every problem of every pair (reads all files, none declaring more than max_voxels), one message
    each naming the file, and each pair's content digests. With a plan, also the scans it would lose or
    whose grid would cost more than max_voxels (Plan.scan_problem); without a label map (an unreadable
    one, reported elsewhere), the checks of label values against it are left out. The same image voxels
    under two case names are a problem (one copy could land in training, the other in validation)."""
    problems = _duplicates(pairs)
    channel_counts = {len(pair.images) for pair in pairs}
    if len(channel_counts) > 1:
        problems.append(f"the cases have different numbers of channels: {sorted(channel_counts)}")
    names = subject_names(pairs)
    subjects: list[SubjectId | None] = []
    first_with: dict[tuple[str, ...], Pair] = {}
    for pair, name in zip(pairs, names):
        image, digests, voxels = None, [], []
        for index, path in enumerate(pair.images):
            try:
                channel = load_volume(path, max_voxels=max_voxels)
            except VolumeError as error:
                problems.append(str(error))
                continue
            problems += filter(None, [nonfinite_problem(path, channel)])
            voxels.append(voxel_digest(channel.data))
            digests.append(content_digest(channel))
            if index == 0:
                image = channel
            elif image is not None and (channel.data.shape != image.data.shape or not affines_match(image, channel)):
                problems.append(f"{path}: shape or affine differs from channel 0 ({pair.image})")
        try:
            label = load_volume(pair.label, dtype=np.float64, max_voxels=max_voxels)
        except VolumeError as error:
            problems.append(str(error))
            label = None
        if label is not None:
            problems += _label_problems(pair.label, label.data, label_map)
        if image is not None and label is not None:
            if image.data.shape != label.data.shape:
                problems.append(f"{pair.label}: shape {label.data.shape} differs from its image's {image.data.shape}")
            elif not affines_match(image, label):
                problems.append(f"{pair.label}: affine differs from its image's ({pair.image})")
        if image is not None and plan is not None:
            problems += filter(None, [plan.scan_problem(pair.image, image.data.shape, image.affine, max_voxels)])
        complete = len(digests) == len(pair.images) and label is not None
        subjects.append(SubjectId(name, tuple(digests), content_digest(label)) if complete else None)
        key = tuple(voxels)
        if complete and key in first_with and Path(first_with[key].image).resolve() != Path(pair.image).resolve():
            problems.append(f"{pair.image}: the same image voxels as {first_with[key].image} (one scan under two case "
                            f"names: one copy could be trained on and the other validated on); remove one")
        first_with.setdefault(key, pair)
    return ScanResult(problems, subjects)


def _label_problems(path: Path, values: np.ndarray, label_map: LabelMap | None) -> list[str]:
    """Label values that are not integers, outside the label map, or background only."""
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        return [f"{path}: label values must be integers"]
    if label_map is None:
        return []
    unknown = label_map.unknown(values.astype(np.int64))
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        return [f"{path}: label values outside the label map: {shown}"]
    if (label_map.apply(values.astype(np.int64)) == 0).all():
        return [f"{path}: empty label map (background only)"]
    return []


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


def validate(pairs: list[Pair], label_map: LabelMap | None, plan: Plan | None = None,
             problems: list[str] | None = None, max_voxels: int = MAX_VOXELS) -> list[SubjectId]:
    """The pairs' SubjectIds; DatasetError listing all problems at once (the given ones, e.g. from
    find_pairs or an unreadable label map, first). Nothing should be written before this passes."""
    result = scan_dataset(pairs, label_map, plan, max_voxels)
    problems = list(problems or []) + result.problems
    if problems:
        raise DatasetError(problems)
    return [s for s in result.subjects if s is not None]
