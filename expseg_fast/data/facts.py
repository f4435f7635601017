"""What a volume is like (voxel size, field of view, orientation, intensity range) and the range the
training set covered, so that segmenting a scan unlike the training data warns, naming the file. With
the paper's `fit` preprocessing, a field of view far from the training ones changes the anatomy's scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np

from expseg_fast.data.preprocess import ScanStatistics

# How far outside the training range a value may lie before segment.py warns (a factor either way).
TOLERANCE = {"spacing_mm": 1.5, "field_of_view_mm": 1.3, "thinnest_mm": 1.3, "intensity_p99": 3.0,
             "intensity_scale": 3.0}
_SAID = {"spacing_mm": ("voxel size", " mm"), "field_of_view_mm": ("field of view", " mm"),
         "thinnest_mm": ("thinnest extent", " mm"), "intensity_p99": ("intensity (99th percentile)", ""),
         "intensity_scale": ("intensity scale (std of the non-zero voxels)", "")}


@dataclass(frozen=True)
class VolumeFacts:
    spacing_mm: float  # the smallest voxel edge
    field_of_view_mm: float  # the largest extent
    orientation: str  # nibabel's axis codes, e.g. "RAS"
    intensity_p99: float  # 99th percentile of the raw intensities
    thinnest_mm: float  # the smallest extent (a scan of a few slices is thin)
    intensity_mean: float  # the raw statistics the `nonzero` normalisation uses (ScanStatistics)
    intensity_scale: float

    @classmethod
    def of(cls, data: np.ndarray, affine: np.ndarray) -> "VolumeFacts":
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        extent = spacing * np.array(data.shape[:3])
        stats = ScanStatistics.of(data)
        return cls(float(spacing.min()), float(extent.max()), "".join(nib.aff2axcodes(affine)),
                   float(np.percentile(data, 99)), float(extent.min()), stats.mean, stats.std)

    def to_dict(self) -> dict:
        return asdict(self)


def training_range(facts: list[VolumeFacts]) -> dict:
    """{measure: [lowest, highest]} over the training subjects, and the orientations seen."""
    out = {key: [min(getattr(f, key) for f in facts), max(getattr(f, key) for f in facts)] for key in TOLERANCE}
    out["orientations"] = sorted({f.orientation for f in facts})
    return out


def out_of_range(facts: VolumeFacts, seen: dict, absorbed: tuple[str, ...] = ()) -> list[str]:
    """What about this volume lies far outside the training range (empty when nothing does). Not
    checked: what the preprocessing absorbs (`absorbed`, the plan's), and a measure the range lacks (an
    older checkpoint's, or the label-map generator's, which draws any intensity)."""
    notes = []
    for key, factor in TOLERANCE.items():
        if key not in seen or key in absorbed:
            continue
        low, high = seen[key]
        value = getattr(facts, key)
        if value < low / factor or value > high * factor:
            name, unit = _SAID[key]
            notes.append(f"{name} {value:.4g}{unit} lies far outside the training data's {low:.4g} to {high:.4g}{unit}")
    return notes
