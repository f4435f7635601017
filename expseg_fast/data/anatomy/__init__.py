"""Real anatomy: 20 label maps of 20 real subjects (the SynthSeg training label maps, Apache-2.0; see
LICENSE and NOTICE beside this file), packed compactly for the label-map generator (synth.py).

Each map is stored cropped to the head, its FreeSurfer ids replaced by their index in GENERATION_LABELS
(uint8), gzip-compressed NIfTI with the affine of the crop. `generation.json` holds, per index, the
FreeSurfer id, the intensity class (left and right share one), the T1 contrast class, and the T1
priors (per contrast class: mean and std of a normal draw of the class mean, and of the class std).
`freesurfer_classes.json` maps FreeSurfer ids to the project's classes (the paper's structures, left
and right merged; the three cerebellar vermal groups have no FreeSurfer id and are not among them;
ventral DC added, as FreeSurfer users expect it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
MAPS = HERE / "label_maps"
CLASSES_FILE = HERE / "freesurfer_classes.json"
MARGIN = 4  # voxels kept around the head when cropping


@dataclass(frozen=True)
class GenerationTable:
    """freesurfer_ids[i]: the FreeSurfer id of stored index i; intensity_class[i]: its Gaussian-mixture
    class; t1_class[i]: its class of the T1 priors; t1_mean, t1_std (2, classes): row 0 the mean, row 1
    the std, of a normal draw of each T1 class's mean (t1_mean) and std (t1_std)."""

    freesurfer_ids: tuple[int, ...]
    intensity_class: tuple[int, ...]
    t1_class: tuple[int, ...]
    t1_mean: tuple[tuple[float, ...], tuple[float, ...]]
    t1_std: tuple[tuple[float, ...], tuple[float, ...]]
    brain: tuple[bool, ...]  # whether the label is inside the brain (kept when skull-stripping)

    @classmethod
    def read(cls, path: Path = HERE / "generation.json") -> "GenerationTable":
        d = json.loads(path.read_text())
        return cls(tuple(d["freesurfer_ids"]), tuple(d["intensity_class"]), tuple(d["t1_class"]),
                   tuple(tuple(r) for r in d["t1_mean"]), tuple(tuple(r) for r in d["t1_std"]), tuple(d["brain"]))


def label_map_files() -> list[Path]:
    """The packed label maps, in subject order."""
    return sorted(MAPS.glob("subject_*.nii.gz"))


# FreeSurfer ids outside the brain (extra-cerebral tissue, CSF around it, vessels, optic chiasm): the
# generator removes them with the skull-stripping it simulates
_NOT_BRAIN = {0, 24, 30, 62, 72, 85} | set(range(500, 600))


def pack(source: Path, out: Path = HERE) -> list[Path]:
    """Packs SynthSeg's `data/` folder (training_label_maps/, labels_classes_priors/) into out: the
    cropped uint8 maps, generation.json. Returns the files written."""
    import nibabel as nib

    priors = source / "labels_classes_priors"
    ids = [int(x) for x in np.load(priors / "generation_labels.npy")]
    index = np.zeros(max(ids) + 1, np.uint8)
    index[ids] = np.arange(len(ids))
    written = []
    for number, path in enumerate(sorted((source / "training_label_maps").glob("*.nii.gz")), start=1):
        image = nib.load(str(path))
        labels = np.rint(np.asarray(image.dataobj)).astype(np.int64)
        inside = np.argwhere(labels > 0)
        lo = np.maximum(inside.min(0) - MARGIN, 0)
        hi = np.minimum(inside.max(0) + 1 + MARGIN, labels.shape)
        crop = index[labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]]
        shift = np.eye(4)
        shift[:3, 3] = lo
        packed = nib.Nifti1Image(crop, image.affine @ shift)
        packed.set_qform(packed.affine, code=1)
        packed.set_sform(packed.affine, code=1)
        target = out / "label_maps" / f"subject_{number:02d}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(packed, str(target))
        written.append(target)
    table = {"freesurfer_ids": ids,
             "intensity_class": [int(x) for x in np.load(priors / "generation_classes.npy")],
             "t1_class": [int(x) for x in np.load(priors / "generation_classes_contrast_specific.npy")],
             "t1_mean": np.load(priors / "prior_means_t1.npy").round(4).tolist(),
             "t1_std": np.load(priors / "prior_stds_t1.npy").round(4).tolist(),
             "brain": [i not in _NOT_BRAIN for i in ids]}
    (out / "generation.json").write_text(json.dumps(table, indent=1))
    return [*written, out / "generation.json"]


PROTOCOLS = HERE / "protocols"  # label maps that score real scans of other protocols (aal.json, ...)
COLIN27 = Path("/usr/share/mricron/templates")  # Debian's mricron-data (BSD-3): ch2bet, aal


def colin27_files(templates: Path = COLIN27) -> tuple[Path, Path]:
    """(Colin27's skull-stripped T1 ch2bet, its manual AAL labels) as Debian's mricron-data installs them
    in templates (or a copy of its two files carried elsewhere); they may not exist."""
    return templates / "ch2bet.nii.gz", templates / "aal.nii.gz"


def colin27_installed(templates: Path = COLIN27) -> bool:
    """Whether both of Colin27's files are there."""
    return all(path.exists() for path in colin27_files(templates))


def colin27_dataset(out: Path, templates: Path = COLIN27) -> Path:
    """A dataset folder (imagesTr/colin27_0000.nii.gz, labelsTr/colin27.nii.gz) of Colin27's
    skull-stripped T1 (ch2bet) with its manual AAL labels, linked to the files of Debian's mricron-data
    (read in place from templates: the package's folder, or a copy of its two files carried to a
    machine without the package). FileNotFoundError naming the package when they are not there."""
    templates = templates.resolve()  # the links are made elsewhere
    image, labels = colin27_files(templates)
    if not colin27_installed(templates):
        raise FileNotFoundError(f"{image}, {labels}: Colin27 comes with Debian's mricron-data "
                                f"(apt-get install mricron-data)")
    links = ((out / "imagesTr" / "colin27_0000.nii.gz", image), (out / "labelsTr" / "colin27.nii.gz", labels))
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target)
    return out
