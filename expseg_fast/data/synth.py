"""Training images drawn from label maps alone, on the training device (SynthSeg: Billot et al., Medical
Image Analysis 2023): the network never sees a real image in training, and every scanner property is
randomised, so that it segments real scans of any site.

From one label map (expseg_fast/data/anatomy/: 1 mm, the generation table's indices) and a torch
generator, one example is:
1. geometry: the plan's whole-scan grid of the map (the head at the plan's resolution) seen through a
   random affine (scaling, rotation, shearing about the head's centre) and a smooth random displacement
   (a coarse Gaussian field, trilinearly upsampled); labels by nearest neighbour;
2. intensities: a Gaussian mixture, one mean and standard deviation per intensity class (left and right
   share one), drawn from the T1 priors (`t1`) or uniformly (`random`: means 25-225, stds 5-25), then
   every voxel; with a probability, everything outside the brain set to 0 (a skull-stripped scan);
3. a smooth multiplicative bias field (the exponential of a coarse Gaussian field);
4. a random acquisition resolution per axis: Gaussian blur, then down- and up-sampling;
5. noise, a gamma (x^exp(N(0, gamma))) on the image scaled to [0, 1];
6. the plan's normalisation of the whole scan, then its training window (the cube for `fit`; for
   `spacing` a size^3 window drawn among those that inference slides over the scan: a model that only
   saw windows centred on the brain invents structures in the windows at a scan's edges).
Every draw comes from the generator, so a run resumes exactly. Everything is on the device of the label
map: on a GPU the generator costs milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expseg_fast.data.anatomy import CLASSES_FILE, GenerationTable, label_map_files
from expseg_fast.data.facts import composition, voxel_ml
from expseg_fast.data.dataset import LabelMap
from expseg_fast.data.nifti import load_volume
from expseg_fast.data.plans import Plan


@dataclass(frozen=True)
class SynthSettings:
    """contrast: `t1` (the T1 priors) or `random`; scaling, rotation_deg, shearing: the largest of each
    (uniform, per axis); nonlinear_mm: the largest std of the displacement's control points (mm) on a
    grid of nonlinear_points per axis; bias: the largest std of the log bias field on bias_points per
    axis; resolution_mm: the range of the simulated acquisition's voxel edge (per axis); noise: the
    largest noise std, as a fraction of the intensity range; gamma: the std of the log gamma;
    skull_strip: the probability of a skull-stripped scan; field_of_view_mm: the smallest extent of the
    scans imitated (a 256 mm head scan: the map is centred in it)."""

    contrast: str = "t1"
    scaling: float = 0.15
    rotation_deg: float = 15.0
    shearing: float = 0.012
    nonlinear_mm: float = 3.0
    nonlinear_points: int = 5
    bias: float = 0.5
    bias_points: int = 4
    resolution_mm: tuple[float, float] = (1.0, 3.0)
    noise: float = 0.03
    gamma: float = 0.4
    skull_strip: float = 0.5
    field_of_view_mm: float = 256.0


CONTRASTS = ("t1", "random")


class LabelMapSource:
    """A label map ready for the generator: its table indices (D, H, W) uint8 on the device, its affine,
    and the plan's whole-scan grid (its Resampling) of the scan it imitates: the map (cropped to the head)
    centred in a field of view at least field_of_view_mm along every axis, so that the training windows
    also see the empty space around the head that inference slides over."""

    def __init__(self, path: Path, plan: Plan, device: torch.device, field_of_view_mm: float) -> None:
        volume = load_volume(path, dtype=np.float64, max_voxels=None)  # checked by source.open_synth
        self.path = path
        self.shape = tuple(int(n) for n in volume.data.shape)
        self.affine = volume.affine
        self.indices = torch.from_numpy(np.rint(volume.data).astype(np.uint8)).to(device)
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        self.scan_shape = tuple(max(n, int(np.ceil(field_of_view_mm / s))) for n, s in zip(self.shape, spacing))
        shift = np.eye(4)
        shift[:3, 3] = -((np.array(self.scan_shape) - np.array(self.shape)) // 2)
        self.scan_affine = self.affine @ shift
        self.grid = plan.inference_grid(self.scan_shape, self.scan_affine)

    def classes(self, table: GenerationTable, label_map: LabelMap) -> np.ndarray:
        """The map's class indices on the imitated scan's grid (scan_shape; background around the head),
        through the table's FreeSurfer ids and label_map."""
        crop = label_map.apply(np.asarray(table.freesurfer_ids)[self.indices.cpu().numpy()])
        scan = np.zeros(self.scan_shape, crop.dtype)
        lo = (np.array(self.scan_shape) - np.array(self.shape)) // 2
        scan[lo[0]:lo[0] + self.shape[0], lo[1]:lo[1] + self.shape[1], lo[2]:lo[2] + self.shape[2]] = crop
        return scan


def packaged_composition(names: list[str]) -> dict:
    """The composition (expseg_fast/data/facts.py) of the packaged label maps under the classes `names`:
    the record of the generator presets' checkpoints from before they stored one (all 20 maps, where
    such a run trained on its split of them)."""
    table = GenerationTable.read()
    label_map, _ = LabelMap.from_json(CLASSES_FILE).aligned_to(names, str(CLASSES_FILE))
    index_class = label_map.apply(np.asarray(table.freesurfer_ids)).astype(np.int64)
    volumes = []
    for path in label_map_files():
        volume = load_volume(path, dtype=np.float64, max_voxels=None)
        counts = np.bincount(np.rint(volume.data).astype(np.int64).reshape(-1), minlength=len(index_class))
        per_class = np.bincount(index_class, weights=counts[: len(index_class)], minlength=len(names))[: len(names)]
        volumes.append(tuple(float(c) * voxel_ml(volume.affine) for c in per_class))
    return composition(volumes)


class Generator:
    """Draws (image (1, S, S, S) float32, labels (S, S, S) uint8 class indices) from label maps."""

    def __init__(self, table: GenerationTable, label_map: LabelMap, plan: Plan, settings: SynthSettings,
                 device: torch.device) -> None:
        self.plan, self.settings, self.device = plan, settings, device
        classes = label_map.apply(np.asarray(table.freesurfer_ids))
        self.to_class = torch.as_tensor(classes.astype(np.int64), device=device)
        self.intensity_class = torch.as_tensor(table.intensity_class, device=device)
        self.brain = torch.as_tensor(table.brain, device=device)
        groups = max(table.intensity_class) + 1
        t1 = np.zeros(groups, np.int64)
        t1[list(table.intensity_class)] = table.t1_class
        prior = lambda rows: torch.as_tensor(np.asarray(rows)[:, t1], dtype=torch.float32, device=device)  # noqa: E731
        self.mean_prior, self.std_prior = prior(table.t1_mean), prior(table.t1_std)  # (2, groups)

    def __call__(self, source: LabelMapSource, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.whole_scan(source, gen)
        window = self.plan.training_window(tuple(labels.shape), labels, gen)
        return image[window][None], labels[window]

    def whole_scan(self, source: LabelMapSource, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, labels uint8) of one draw on the plan's whole-scan grid, normalised, before the window."""
        indices, inside = self._geometry(source, gen)
        image = self._intensities(indices, inside, gen)
        image = self._acquisition(image, source, gen)
        return self.plan.normalise(image, inside), self.to_class[indices.long()].to(torch.uint8)

    def _uniform(self, gen: torch.Generator, low, high, shape=()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen, device=self.device)

    def _geometry(self, source: LabelMapSource, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The map's indices on the plan's whole-scan grid through a random affine and displacement, and
        the mask of grid voxels that fall inside the map."""
        s, dev = self.settings, self.device
        grid = source.grid
        to_world = torch.as_tensor(grid.target_affine, dtype=torch.float32, device=dev)
        voxels = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=dev)
                                              for n in grid.target_shape), indexing="ij"), -1)
        world = voxels @ to_world[:3, :3].T + to_world[:3, 3]
        centre = torch.as_tensor(source.affine[:3, :3] @ ((np.array(source.shape) - 1) / 2) + source.affine[:3, 3],
                                 dtype=torch.float32, device=dev)
        world = (world - centre) @ self._random_affine(gen).T + centre
        std = self._uniform(gen, 0.0, s.nonlinear_mm)
        coarse = torch.randn((1, 3, *(s.nonlinear_points,) * 3), generator=gen, device=dev) * std
        world = world + F.interpolate(coarse, size=grid.target_shape, mode="trilinear",
                                      align_corners=True)[0].permute(1, 2, 3, 0)
        from_world = torch.as_tensor(np.linalg.inv(source.affine), dtype=torch.float32, device=dev)
        src = world @ from_world[:3, :3].T + from_world[:3, 3]  # source voxel coordinates
        size = torch.as_tensor(source.shape, dtype=torch.float32, device=dev)
        inside = ((src >= -0.5) & (src <= size - 0.5)).all(-1)
        normalised = (2 * src / (size - 1) - 1).flip(-1)  # grid_sample's (x, y, z) = (W, H, D)
        sampled = F.grid_sample(source.indices[None, None].float(), normalised[None], mode="nearest",
                                padding_mode="zeros", align_corners=True)[0, 0]
        return torch.where(inside, sampled, 0.0).round().to(torch.uint8), inside

    def _intensities(self, indices: torch.Tensor, inside: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A Gaussian mixture image: per intensity class a mean and a std, then every voxel; outside the
        map and (with skull_strip's probability) outside the brain, 0."""
        s, groups = self.settings, self.mean_prior.shape[1]
        if s.contrast == "t1":
            means = self.mean_prior[0] + self.mean_prior[1] * torch.randn(groups, generator=gen, device=self.device)
            stds = (self.std_prior[0] + self.std_prior[1] * torch.randn(groups, generator=gen, device=self.device)).abs()
        else:
            means, stds = self._uniform(gen, 25.0, 225.0, (groups,)), self._uniform(gen, 5.0, 25.0, (groups,))
        group = self.intensity_class[indices.long()]
        noise = torch.randn(indices.shape, generator=gen, device=self.device)
        image = (means[group] + stds[group] * noise).clamp_min(0.0)
        keep = inside
        if float(torch.rand((), generator=gen, device=self.device)) < s.skull_strip:
            keep = keep & self.brain[indices.long()]
        return torch.where(keep, image, 0.0)

    def _acquisition(self, image: torch.Tensor, source: LabelMapSource, gen: torch.Generator) -> torch.Tensor:
        """Bias field, acquisition resolution, noise and gamma; zeros stay zeros."""
        s, dev = self.settings, self.device
        empty = image == 0
        std = self._uniform(gen, 0.0, s.bias)
        coarse = torch.randn((1, 1, *(s.bias_points,) * 3), generator=gen, device=dev) * std
        image = image * torch.exp(F.interpolate(coarse, size=image.shape, mode="trilinear", align_corners=True)[0, 0])
        spacing = np.linalg.norm(source.grid.target_affine[:3, :3], axis=0)
        factors = [float(self._uniform(gen, *s.resolution_mm)) / float(edge) for edge in spacing]
        image = _acquire(image, factors)
        image = image + self._uniform(gen, 0.0, s.noise) * float(image.max()) * torch.randn(
            image.shape, generator=gen, device=dev)
        image = torch.where(empty, 0.0, image.clamp_min(0.0))
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) / (high - low if high > low else 1.0)
        return scaled ** math.exp(float(torch.randn((), generator=gen, device=dev)) * s.gamma)

    def _random_affine(self, gen: torch.Generator) -> torch.Tensor:
        """(3, 3): a rotation about each axis, shearing and per-axis scaling, each uniform within the settings."""
        s, dev = self.settings, self.device
        angles = self._uniform(gen, -s.rotation_deg, s.rotation_deg, (3,)) * math.pi / 180
        matrix, off_diagonal = torch.eye(3, device=dev), 1 - torch.eye(3, device=dev)
        for axis in range(3):
            c, n = torch.cos(angles[axis]), torch.sin(angles[axis])
            i, j = [k for k in range(3) if k != axis]
            turn = torch.eye(3, device=dev)
            turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -n, n, c
            matrix = turn @ matrix
        shear = torch.eye(3, device=dev) + self._uniform(gen, -s.shearing, s.shearing, (3, 3)) * off_diagonal
        return matrix @ shear @ torch.diag(1 + self._uniform(gen, -s.scaling, s.scaling, (3,)))


def _acquire(image: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """The image as a scan of voxels `factors` times the grid's along each axis, then resampled onto the
    grid: a Gaussian blur of sigma 0.4 factor (what the acquisition and the interpolation smooth), and,
    where the acquisition is coarser than the grid, sampled at its voxels and interpolated back."""
    x = image[None, None]
    for axis, factor in enumerate(factors):
        sigma = 0.4 * factor
        if sigma < 0.15:  # a kernel of a fraction of a voxel: nothing to blur
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        x = F.conv3d(x, (kernel / kernel.sum()).view(shape), padding=tuple(padding))
    coarse = [max(2, int(round(n / max(f, 1.0)))) for n, f in zip(image.shape, factors)]
    x = F.interpolate(F.interpolate(x, size=coarse, mode="trilinear", align_corners=True), size=image.shape,
                      mode="trilinear", align_corners=True)
    return x[0, 0]
