"""The paper's rigid augmentation (section 2.3), batched, on the tensors' device, in one resampling.

Each volume, with probability p, gets a rotation about the axial axis (within +-max_rotation_deg), a
shift (within +-max_shift of the extent per axis) and an isotropic scaling (within `scale`) — the paper's
0.8, 30 degrees, 20 % and [0.8, 1.2] are TrainConfig's defaults (expseg_fast/config.py); images are
resampled trilinearly and labels by nearest neighbour from ONE sampling grid per volume, so they stay
aligned. Volumes are in canonical (RAS) voxel order, as the preprocessing leaves them: the axial
(superior) axis is the last one, so the rotation turns the first two axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    probability: float
    max_rotation_deg: float
    max_shift: float  # fraction of the extent
    scale: tuple[float, float]


def sampling_matrix(angle_rad: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, 3, 4) matrices for F.affine_grid (normalised output -> input coordinates, in (W, H, D)
    order) of a rotation by angle (N,) in the plane of the first two volume axes (D, H), a shift
    (N, 3) in (D, H, W) fractions of the extent, and an isotropic scale (N,)."""
    n = angle_rad.shape[0]
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    theta = torch.zeros(n, 3, 4, dtype=torch.float32)
    # grid coordinate order is (x, y, z) = (W, H, D): rotate (y, z), keep x; sample at (R p) / scale
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1], theta[:, 1, 2] = cos, -sin
    theta[:, 2, 1], theta[:, 2, 2] = sin, cos
    theta[:, :, :3] /= scale.view(n, 1, 1)
    # a shift of f of the extent is 2 f in normalised coordinates; the grid samples at p - shift
    theta[:, 0, 3] = -2.0 * shift[:, 2]
    theta[:, 1, 3] = -2.0 * shift[:, 1]
    theta[:, 2, 3] = -2.0 * shift[:, 0]
    return theta


def random_matrices(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, 4) sampling matrices; identity for the volumes not augmented (probability 1 - p).
    Drawn on the CPU from `generator`, so a seed gives the same augmentation on any device."""
    u = torch.rand(n, 6, generator=generator)
    active = (u[:, 0] < config.probability).float()
    angle = math.radians(config.max_rotation_deg) * (2 * u[:, 1] - 1) * active
    shift = config.max_shift * (2 * u[:, 2:5] - 1) * active[:, None]
    low, high = config.scale
    scale = 1.0 + (low + (high - low) * u[:, 5] - 1.0) * active
    return sampling_matrix(angle, shift, scale)


def augment(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, C, D, H, W) float, labels (N, D, H, W) integer -> the same shapes, augmented on
    their device (zeros / label 0 where the transform leaves the volume); the inputs themselves where no
    volume was drawn for augmentation (the draws are taken either way)."""
    if images.dim() != 5 or labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images (N, C, D, H, W) and labels (N, D, H, W) expected, got {images.shape}, {labels.shape}")
    theta = random_matrices(images.shape[0], config, generator)
    if torch.equal(theta, torch.eye(3, 4).expand_as(theta)):  # none drawn for augmentation: nothing to resample
        return images, labels
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    out_images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_images.to(images.dtype), out_labels[:, 0].round().to(labels.dtype)
