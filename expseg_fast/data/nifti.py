"""Volumes in and out with nibabel: NIfTI (.nii, .nii.gz) and FreeSurfer's MGH (.mgh, .mgz); every
error names the file, and a file's bytes always match its suffix. A volume is read only when its header
declares at most MAX_VOXELS voxels (a small compressed file can declare gigabytes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from expseg_fast.atomic import write_atomic

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")  # what the project reads and writes, by file name
MGH_SUFFIXES = (".mgz", ".mgh")

# The most voxels a volume (a file, or a grid it is resampled onto) may have unless the user raises the
# bound (--max-voxels): 512^3, 0.5 GiB as float32; resampling it takes a few GiB more.
MAX_VOXELS = 512**3


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


def voxel_bound_problem(path: str | Path, shape: tuple[int, ...], max_voxels: int, what: str = "") -> str | None:
    """One line naming the file when a grid of `shape` holds more than max_voxels voxels, else None."""
    count = int(np.prod([int(n) for n in shape], dtype=object))
    if count <= max_voxels:
        return None
    shown = "x".join(str(int(n)) for n in shape)
    return (f"{path}: {what}{shown} = {count:.3g} voxels is more than the limit of {max_voxels:.3g} "
            f"(raise it with --max-voxels if the memory is there)")


def volume_suffix(path: str | Path) -> str | None:
    """The volume format's suffix that the file name ends with (".nii.gz", ".nii", ".mgz", ".mgh"), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), None)


def load_volume(path: str | Path, dtype=np.float32, max_voxels: int | None = MAX_VOXELS) -> Volume:
    """Reads a 3-d NIfTI volume (a 4-d one with a single volume is squeezed); VolumeError naming the file
    when it cannot be used, before reading any voxel when its header declares more than max_voxels
    (None: a file the dataset scan has bounded already)."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        problem = max_voxels is not None and voxel_bound_problem(path, image.shape, max_voxels, "declares ")
        if problem:
            raise VolumeError(problem)
        data = np.asanyarray(image.dataobj)
    except VolumeError:
        raise
    except Exception as error:  # nibabel raises many types for broken files
        raise VolumeError(f"{path}: unreadable or truncated volume file ({type(error).__name__}: {error})") from error
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


def voxel_digest(data: np.ndarray) -> str:
    """SHA-256 of a volume's voxel values and shape (as float64, so the same values stored with another
    dtype or compression give the same digest)."""
    h = hashlib.sha256(repr(tuple(int(n) for n in data.shape)).encode())
    flat = np.ascontiguousarray(data).reshape(-1)
    for start in range(0, flat.size, 1 << 22):  # 32 MiB of float64 at a time
        h.update(np.ascontiguousarray(flat[start:start + (1 << 22)], dtype=np.float64).tobytes())
    return h.hexdigest()


def content_digest(volume: Volume) -> str:
    """SHA-256 of a volume's voxel values (voxel_digest) and its geometry (the affine to 1e-6 mm): what
    a run pins of each file it trained on."""
    h = hashlib.sha256(voxel_digest(volume.data).encode())
    h.update((np.round(np.asarray(volume.affine, dtype=np.float64), 6) + 0.0).tobytes())  # + 0.0: no -0.0
    return h.hexdigest()


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Writes data with affine atomically (a temporary file in the same folder, then a rename), so an
    interrupted write never leaves a truncated file behind; in the format its suffix names (NIfTI-1
    for .nii/.nii.gz, MGH for .mgh/.mgz; ValueError for any other name)."""
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: not a volume file name; expected one of {', '.join(VOLUME_SUFFIXES)}")
    affine = np.asarray(affine, dtype=np.float64)
    if suffix in MGH_SUFFIXES:  # MGH holds uint8, int16, int32 or float32
        data = np.asarray(data)
        kind = (data.dtype if data.dtype in (np.uint8, np.int16, np.int32, np.float32)
                else np.int32 if np.issubdtype(data.dtype, np.integer) else np.float32)
        image = nib.MGHImage(data.astype(kind, copy=False), affine)
    else:
        image = nib.Nifti1Image(np.asarray(data), affine)
        image.set_qform(image.affine, code=1)
        image.set_sform(image.affine, code=1)
    write_atomic(path, lambda tmp: nib.save(image, tmp), suffix)


def label_dtype(largest: int) -> type:
    """The integer type label volumes are kept and written in, for class indices up to `largest`: uint8,
    int16 from 256."""
    return np.uint8 if largest < 256 else np.int16


def save_labels(path: str | Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """Writes a label volume as save_volume does, in label_dtype."""
    save_volume(path, labels.astype(label_dtype(int(labels.max()) if labels.size else 0), copy=False), affine)
