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
SAMPLE_VOXELS = 1 << 20  # about how many voxels a regular_sample holds
_COUNT_SLAB = 1 << 20  # voxels per bincount in class_volumes_ml
_SAID = {"spacing_mm": ("voxel size", " mm"), "field_of_view_mm": ("field of view", " mm"),
         "thinnest_mm": ("thinnest extent", " mm"), "intensity_p99": ("intensity (99th percentile)", ""),
         "intensity_scale": ("intensity scale (std of the non-zero voxels)", "")}


@dataclass(frozen=True)
class VolumeFacts:
    spacing_mm: float  # the smallest voxel edge
    field_of_view_mm: float  # the largest extent
    orientation: str  # nibabel's axis codes, e.g. "RAS"
    intensity_p99: float  # 99th percentile of the raw intensities (of a regular sample of about 2^20 voxels)
    thinnest_mm: float  # the smallest extent (a scan of a few slices is thin)
    intensity_mean: float  # the raw statistics the `nonzero` normalisation uses (ScanStatistics)
    intensity_scale: float
    class_ml: tuple[float, ...] = ()  # volume of each class in its label file (mL); () where none is known

    @classmethod
    def of(cls, data: np.ndarray, affine: np.ndarray, classes: np.ndarray | None = None,
           num_classes: int = 0) -> "VolumeFacts":
        """Facts of a volume (data (D, H, W), affine (4, 4)); with its class indices (D, H, W) (values
        >= num_classes, such as IGNORE, not counted) the volume of each class too."""
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        extent = spacing * np.array(data.shape[:3])
        stats = ScanStatistics.of(data)
        volumes = () if classes is None else class_volumes_ml(classes, affine, num_classes)
        return cls(float(spacing.min()), float(extent.max()), "".join(nib.aff2axcodes(affine)),
                   float(np.percentile(regular_sample(data), 99)), float(extent.min()), stats.mean, stats.std, volumes)

    def to_dict(self) -> dict:
        return asdict(self)


def regular_sample(data: np.ndarray, count: int = SAMPLE_VOXELS) -> np.ndarray:
    """Every k-th voxel of data in its own memory order, k chosen for about `count` of them: a view (no
    copy of a column-major volume, which reshape would make)."""
    flat = np.asarray(data).ravel(order="K")
    return flat[:: max(1, flat.size // count)]


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel (mL) of a grid with this affine."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def class_volumes_ml(classes: np.ndarray, affine: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """The volume (mL) of each class 0..num_classes-1 in a volume of class indices with this affine.
    Counted a slab of _COUNT_SLAB voxels at a time: no int64 copy of the whole volume."""
    flat = np.asarray(classes).reshape(-1)
    counts = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_SLAB):
        counts += np.bincount(flat[start:start + _COUNT_SLAB].astype(np.int64), minlength=num_classes)[:num_classes]
    return tuple(float(c) * voxel_ml(affine) for c in counts)


def composition(volumes: list[tuple[float, ...]]) -> dict:
    """What the training labels' structures are like, for the check of a prediction
    (expseg_fast/inference/plausibility.py): the range of the foreground's volume (mL, every class but
    0), each class's mean share of the foreground, and the largest total-variation distance of a
    subject's shares from that mean."""
    ml = np.asarray(volumes, dtype=np.float64)[:, 1:]
    total = ml.sum(axis=1)
    shares = ml / np.maximum(total, 1e-12)[:, None]
    mean = shares.mean(axis=0)
    return {"foreground_ml": [float(total.min()), float(total.max())], "share_mean": [float(x) for x in mean],
            "share_spread": float(0.5 * np.abs(shares - mean).sum(axis=1).max())}


def training_range(facts: list[VolumeFacts]) -> dict:
    """{measure: [lowest, highest]} over the training subjects, the orientations seen and, when every
    subject's class volumes are known, their composition."""
    out = {key: [min(getattr(f, key) for f in facts), max(getattr(f, key) for f in facts)] for key in TOLERANCE}
    out["orientations"] = sorted({f.orientation for f in facts})
    if all(f.class_ml for f in facts) and len({len(f.class_ml) for f in facts}) == 1:
        out["composition"] = composition([f.class_ml for f in facts])
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
