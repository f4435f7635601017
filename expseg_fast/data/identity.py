"""What a run pins of its data, so that it never trains or scores on other data by accident.

Every subject of a dataset scan gets a `SubjectId`: its name and a content digest of each image channel
and of its label file (voxel values and geometry: a re-compressed copy has the same digest, an edited
one another). A `DataPin` is what a run stored when it started (in its checkpoints and, like nnU-Net's
splits_final.json, in OUT/splits.json): for its training and for its validation subjects, the data's
absolute location, the label map's digest and the subjects. A resumed run and evaluate.py select the
pinned subjects by name from the data as it is now; a pinned subject that is missing or changed, or a
changed label map, is an error naming it, and subjects added since are never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the dataset module builds SubjectIds in its scan
    from expseg_fast.data.dataset import LabelMap


@dataclass(frozen=True)
class SubjectId:
    """name: the case name; images: content digest of each channel file; label: of the label file."""

    name: str
    images: tuple[str, ...]
    label: str

    def to_dict(self) -> dict:
        return {"name": self.name, "images": list(self.images), "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "SubjectId":
        return cls(str(d["name"]), tuple(str(x) for x in d["images"]), str(d["label"]))

    def change(self, now: "SubjectId") -> str | None:
        """What differs between this pinned subject and the same name scanned now, or None."""
        changed = [f"image channel {c}" for c, (a, b) in enumerate(zip(self.images, now.images)) if a != b]
        if len(self.images) != len(now.images):
            changed.append(f"channel count ({len(self.images)} then, {len(now.images)} now)")
        if self.label != now.label:
            changed.append("labels")
        return ", ".join(changed) or None


def label_map_digest(label_map: LabelMap) -> str:
    """SHA-256 of a label map's meaning (class names and the source ids of each), not of its file's bytes."""
    text = json.dumps({"names": list(label_map.names), "lookup": sorted(label_map.lookup.items())})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PinnedSubjects:
    """One role's subjects as a run pinned them: where they lie (the dataset folder or list, the demo
    dataset's folder or the packaged label maps, absolute), the label map's file (None for the demo's
    and the packaged maps') and digest, and the subjects in the order the run uses them."""

    root: str
    label_map_file: str | None
    label_map_digest: str
    subjects: tuple[SubjectId, ...]

    def to_dict(self) -> dict:
        return {"root": self.root, "label_map_file": self.label_map_file, "label_map_digest": self.label_map_digest,
                "subjects": [s.to_dict() for s in self.subjects]}

    @classmethod
    def from_dict(cls, d: dict) -> "PinnedSubjects":
        return cls(str(d["root"]), d["label_map_file"], str(d["label_map_digest"]),
                   tuple(SubjectId.from_dict(s) for s in d["subjects"]))


@dataclass(frozen=True)
class DataPin:
    """The data a run started on: its training and validation subjects (each role from its own data:
    the same dataset, or label maps and real scans), and the split and seed they came from."""

    train: PinnedSubjects
    val: PinnedSubjects
    split: int
    seed: int

    def to_json(self) -> str:
        return json.dumps({"train": self.train.to_dict(), "val": self.val.to_dict(), "split": self.split,
                           "seed": self.seed}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DataPin":
        d = json.loads(text)
        if "root" in d:  # the first format (2026-11-30): one dataset for both roles
            side = {k: d[k] for k in ("root", "label_map_file", "label_map_digest")}
            d = {**d, "train": {**side, "subjects": d["train"]}, "val": {**side, "subjects": d["val"]}}
        return cls(PinnedSubjects.from_dict(d["train"]), PinnedSubjects.from_dict(d["val"]), int(d["split"]),
                   int(d["seed"]))

    def select(self, role: str, subjects: list[SubjectId], label_map: LabelMap, where: str) -> tuple[list[int], int]:
        """(indices of the pinned `role` ("training" or "validation") subjects among `subjects` (data at
        `where` scanned now), how many subjects there are not pinned for it). ValueError naming every
        pinned subject that is missing or changed, and a label map whose meaning changed."""
        pinned = self.train if role == "training" else self.val
        index = {s.name: i for i, s in enumerate(subjects)}
        problems = []
        if label_map_digest(label_map) != pinned.label_map_digest:
            problems.append(f"the label map ({pinned.label_map_file or 'the packaged one'}) has other classes or "
                            f"ids than the run was trained with")
        for subject in pinned.subjects:
            if subject.name not in index:
                problems.append(f"{subject.name} (a {role} subject of the run) is missing from {where}")
                continue
            change = subject.change(subjects[index[subject.name]])
            if change:
                problems.append(f"{subject.name} (a {role} subject of the run) has changed since the run "
                                f"started: {change}")
        if problems:
            listed = "\n".join(f"  {p}" for p in problems)
            raise ValueError(f"{where} is not the data the run was trained on:\n{listed}")
        return [index[s.name] for s in pinned.subjects], len(subjects) - len(pinned.subjects)

    def roles(self) -> dict[tuple[tuple[str, ...], str], str]:
        """{(image digests, label digest): "training" or "validation"} of the pinned subjects, to find
        them by content in other data."""
        out = {(s.images, s.label): "training" for s in self.train.subjects}
        out.update({(s.images, s.label): "validation" for s in self.val.subjects})
        return out
