"""Does an input look like a scan of the training kind? Two checks, each a note that segment.py and
evaluate.py print as a warning naming the file (the segmentation is written all the same):

- its intensities (any model): a constant image, a handful of distinct values (a mask or a label map),
  or noise (neighbouring voxels uncorrelated along every axis; in any real scan, of any resolution,
  skull-stripped or not, neighbours are strongly correlated along at least one axis);
- its prediction (checkpoints that record their training labels' composition, `data_range
  ["composition"]`, expseg_fast/data/facts.py): the predicted foreground's volume in mL (the input's
  voxel size applied) far outside the training labels' range, or its make-up (each class's share of the
  foreground) far from theirs.
"""

from __future__ import annotations

import numpy as np

from expseg_fast.data.facts import SAMPLE_VOXELS, class_volumes_ml, regular_sample

FEWEST_VALUES = 8  # distinct intensities a scan has more of (a mask or a label map has a handful)
LEAST_CORRELATION = 0.5  # neighbour correlation along the best axis, below which an image is noise-like
FOREGROUND_FACTOR = 2.0  # the predicted foreground may be this much smaller or larger than the training's
SHARE_MARGIN = 0.25  # shares may lie this much (total variation) further from the mean than training's did


def intensity_note(data: np.ndarray) -> str | None:
    """Why the image (D, H, W) does not look like a scan (constant, a handful of values, noise), or None."""
    low, high = float(np.min(data)), float(np.max(data))
    if low == high:
        return f"every voxel has the intensity {low:.4g}: a constant image, not a scan"
    distinct = np.unique(regular_sample(data))
    if distinct.size <= FEWEST_VALUES:
        return f"only {distinct.size} distinct intensities: a mask or label map, not a scan"
    correlation = max(_neighbour_correlation(data, axis) for axis in range(data.ndim) if data.shape[axis] > 1)
    if correlation < LEAST_CORRELATION:
        return (f"neighbouring voxels are uncorrelated (at most {correlation:.2f} along an axis; scans are above "
                f"{LEAST_CORRELATION}): noise, not a scan")
    return None


def _neighbour_correlation(data: np.ndarray, axis: int) -> float:
    """Correlation of each voxel with its neighbour along axis, over about SAMPLE_VOXELS voxels (the other two
    axes strided, so a 512³ scan costs no float64 copy of itself)."""
    a = np.moveaxis(data, axis, 0)
    step = max(1, int((a.size / SAMPLE_VOXELS) ** 0.5))
    a = a[:, ::step, ::step]
    x, y = a[:-1].astype(np.float64).reshape(-1), a[1:].astype(np.float64).reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / scale) if scale > 0 else 0.0


def prediction_note(labels: np.ndarray, affine: np.ndarray, seen: dict | None, names: list[str]) -> str | None:
    """Why the predicted label volume (on the input's grid, with its affine) is unlike the training labels
    (volume of the foreground, its composition), or None; None too without the record."""
    composition = (seen or {}).get("composition")
    if composition is None or len(composition["share_mean"]) != len(names) - 1:
        return None
    ml = np.asarray(class_volumes_ml(labels, affine, len(names))[1:])
    total = float(ml.sum())
    low, high = composition["foreground_ml"]
    if total < low / FOREGROUND_FACTOR or total > high * FOREGROUND_FACTOR:
        return (f"the predicted structures fill {total:.4g} mL, far from the training labels' {low:.4g} to "
                f"{high:.4g} mL")
    mean = np.asarray(composition["share_mean"])
    share = ml / total
    distance = 0.5 * float(np.abs(share - mean).sum())
    if distance > composition["share_spread"] + SHARE_MARGIN:
        top = int(np.argmax(share - mean))
        return (f"the predicted structures are made up unlike the training labels (share distance {distance:.2f}, "
                f"training at most {composition['share_spread']:.2f}; {names[top + 1]} is {100 * share[top]:.0f} % "
                f"of them, {100 * mean[top]:.0f} % in training)")
    return None
