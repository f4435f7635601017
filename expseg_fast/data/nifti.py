"""NIfTI (.nii, .nii.gz) in and out with nibabel; every error names the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from expseg_fast.atomic import write_atomic


class VolumeError(ValueError):
    """A volume file that cannot be used; the message names the file."""


@dataclass
class Volume:
    """data (D, H, W) in voxel order, affine (4, 4) voxel -> world (mm)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along the three voxel axes."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def affines_match(reference: Volume, other: Volume) -> bool:
    """Whether other's affine equals reference's within a thousandth of reference's smallest voxel."""
    return bool(np.allclose(reference.affine, other.affine, atol=1e-3 * float(reference.spacing.min())))


def nonfinite_problem(path: str | Path, volume: Volume) -> str | None:
    """One line naming the file when some voxels are NaN or Inf, else None."""
    bad = int((~np.isfinite(volume.data)).sum())
    return f"{path}: {bad} voxels are NaN or Inf" if bad else None


def load_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Reads a 3-d NIfTI volume (a 4-d one with a single volume is squeezed)."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for broken files
        raise VolumeError(f"{path}: unreadable or truncated NIfTI file ({type(error).__name__}: {error})") from error
    if data.dtype.names is not None:  # RGB(A) NIfTI: a structured dtype of colour channels
        raise VolumeError(f"{path}: a colour (RGB) image; expected one intensity per voxel")
    if np.iscomplexobj(data):
        raise VolumeError(f"{path}: complex-valued voxels; expected real intensities")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-d volume, got shape {data.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: invalid (singular or non-finite) affine")
    return Volume(np.asarray(data, dtype=dtype), affine)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Writes data with affine atomically (a temporary file in the same folder, then a rename), so an
    interrupted write never leaves a truncated file behind."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    write_atomic(path, lambda tmp: nib.save(image, tmp), suffix)
