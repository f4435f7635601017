"""segment.py's --qc: a PNG per scan to look at before trusting its segmentation — three orthogonal slices
(axial, coronal, sagittal, in the scan's closest RAS orientation, through the segmentation's centre) of
the image in grey with the labels over it, and a legend of the classes present."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from expseg_fast.atomic import write_atomic

OPACITY = 0.45  # of the label colours over the image


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """data reoriented to the closest RAS axes of affine, and its voxel edges (mm) along them."""
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(data, ornt)
    edges = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    return data, edges


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through centre of an RAS volume: superior (axial: anterior) at the
    top, and the patient's left on the left of the axial and coronal views (neurological convention),
    posterior on the left of the sagittal one."""
    x, y, z = centre
    return [np.flipud(volume[:, :, z].T), np.flipud(volume[:, y, :].T), np.flipud(volume[x, :, :].T)]


def write_qc(path: Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray, names: list[str],
             title: str) -> None:
    """The QC figure of one scan (image and labels on its own grid, `affine` their voxel -> world) as a
    PNG at path, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image, edges = _canonical(np.asarray(image, np.float32), affine)
    labels, _ = _canonical(np.asarray(labels), affine)
    found = np.nonzero(labels)
    centre = tuple(int(round(a.mean())) for a in found) if found[0].size else tuple(n // 2 for n in labels.shape)
    low, high = np.percentile(image[image != 0] if np.any(image) else image, [1, 99.5])
    colours = matplotlib.colormaps["tab20"](np.arange(len(names)) % 20)
    colours[0, 3] = 0.0
    colours[1:, 3] = OPACITY
    aspects = [edges[1] / edges[0], edges[2] / edges[0], edges[2] / edges[1]]  # row edge over column edge
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 0.7]})
    for axis, picture, overlay, aspect, view in zip(axes, _slices(image, centre), _slices(labels, centre), aspects,
                                                    ("axial", "coronal", "sagittal")):
        axis.imshow(picture, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        axis.imshow(overlay, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, aspect=aspect,
                    interpolation="nearest")
        axis.set_title(view)
        axis.axis("off")
    present = [i for i in range(1, len(names)) if np.any(labels == i)]
    axes[3].axis("off")
    axes[3].legend(handles=[Patch(color=colours[i, :3], label=names[i]) for i in present], loc="center left",
                   fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80), ".png")
    finally:
        plt.close(figure)
