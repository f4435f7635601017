"""Training images drawn from label maps alone, on the training device (SynthSeg: Billot et al., Medical
Image Analysis 2023): the network never sees a real image in training, and every scanner property is
randomised, so that it segments real scans of any site.

From one label map (expseg_fast/data/anatomy/: 1 mm, the generation table's indices) and a torch
generator, one example is drawn window first (as SynthSeg crops before it synthesises):
1. the window: the plan's training window within the plan's whole-scan grid of the map (the head at the
   plan's resolution): the cube for `fit`; for `spacing` a size^3 window drawn among those that
   inference slides over the scan (a model that only saw windows centred on the brain invents
   structures in the windows at a scan's edges);
2. the draws that are not per voxel (ExampleDraw): a random affine (scaling, rotation, shearing about
   the head's centre), a smooth displacement's control points, a Gaussian mixture's mean and standard
   deviation per intensity class (left and right share one) from the T1 priors (`t1`) or uniformly
   (`random`: means 25-225, stds 5-25), skull-stripping with a probability, a bias field's control
   points, a random acquisition resolution per axis, a noise level and a gamma;
3. only on the grid voxels the window's acquisition reads (the window and the margin of its blur and
   resampling, AcquisitionAxis): the map's labels through the affine and the displacement (nearest
   neighbour), the mixture (with partial_volume K > 1, each voxel's means and deviations averaged over
   the map's points at the centres of its K^3 sub-cubes), everything outside the map (and, skull-stripped,
   outside the brain) 0, the multiplicative bias field (the exponential of a trilinear field);
4. the acquisition on the window: per axis a Gaussian blur, then down- and up-sampling, each a matrix
   along the axis (the whole grid's operation, its rows for the window); noise, a gamma
   (x^exp(N(0, gamma))) on the image scaled by its maximum;
5. the plan's normalisation with the moments of the whole scan, estimated on a lattice of about 32^3
   of its voxels synthesised the same way: a window is normalised as inference normalises a scan.
Every draw comes from the generator, so a run resumes exactly. Everything is on the device of the label
map: on a GPU the generator costs milliseconds. tests/synth_reference.py keeps the full-field generator
this replaced; tests/test_synth_window.py compares their images.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expseg_fast.data.anatomy import CLASSES_FILE, GenerationTable, label_map_files
from expseg_fast.data.dataset import LabelMap
from expseg_fast.data.facts import composition, voxel_ml
from expseg_fast.data.nifti import load_volume
from expseg_fast.data.plans import Plan, value_moments


@dataclass(frozen=True)
class SynthSettings:
    """contrast: `t1` (the T1 priors) or `random`; scaling, rotation_deg, shearing: the largest of each
    (uniform, per axis); nonlinear_mm: the largest std of the displacement's control points (mm) on a
    grid of nonlinear_points per axis; bias: the largest std of the log bias field on bias_points per
    axis; resolution_mm: the range of the simulated acquisition's voxel edge (per axis); noise: the
    largest noise std, as a fraction of the intensity range; gamma: the std of the log gamma;
    skull_strip: the probability of a skull-stripped scan; field_of_view_mm: the smallest extent of the
    scans imitated (a 256 mm head scan: the map is centred in it); partial_volume: the map's points per
    axis of a grid voxel whose mixture means and deviations the voxel averages (1: its centre's class
    alone; 2: the 2^3 centres of its eighths, as a real scan's coarse voxel mixes what lies within it)."""

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
    partial_volume: int = 1


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
        self.indices = torch.from_numpy(np.ascontiguousarray(np.rint(volume.data), np.uint8)).to(device)
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        self.scan_shape = tuple(max(n, int(np.ceil(field_of_view_mm / s))) for n, s in zip(self.shape, spacing))
        shift = np.eye(4)
        shift[:3, 3] = -((np.array(self.scan_shape) - np.array(self.shape)) // 2)
        self.scan_affine = self.affine @ shift
        self.grid = plan.inference_grid(self.scan_shape, self.scan_affine)

    def classes(self, table: GenerationTable, label_map: LabelMap) -> np.ndarray:
        """The map's class indices on the imitated scan's grid (scan_shape; background around the head),
        through the table's FreeSurfer ids and label_map."""
        crop = label_map.apply(np.asarray(table.freesurfer_ids))[self.indices.cpu().numpy()]  # the table, then a gather
        scan = np.zeros(self.scan_shape, crop.dtype)
        lo = (np.array(self.scan_shape) - np.array(self.shape)) // 2
        scan[lo[0]:lo[0] + self.shape[0], lo[1]:lo[1] + self.shape[1], lo[2]:lo[2] + self.shape[2]] = crop
        return scan


def packaged_composition(names: list[str]) -> dict:
    """The composition (expseg_fast/data/facts.py) of the packaged label maps under the classes `names`:
    the record of the generator presets' checkpoints from before they stored one (all 20 maps, where
    such a run trained on its split of them). Read once per process and class list (20 maps, seconds);
    each call gets its own copy."""
    return json.loads(_packaged_composition(tuple(names)))


@functools.lru_cache(maxsize=4)
def _packaged_composition(names: tuple[str, ...]) -> str:
    """packaged_composition as JSON text (immutable, so the cache cannot be changed by a caller)."""
    table = GenerationTable.read()
    label_map, _ = LabelMap.from_json(CLASSES_FILE).aligned_to(names, str(CLASSES_FILE))
    index_class = label_map.apply(np.asarray(table.freesurfer_ids)).astype(np.int64)
    volumes = []
    for path in label_map_files():
        volume = load_volume(path, dtype=np.float64, max_voxels=None)
        counts = np.bincount(np.rint(volume.data).astype(np.int64).reshape(-1), minlength=len(index_class))
        per_class = np.bincount(index_class, weights=counts[: len(index_class)], minlength=len(names))[: len(names)]
        volumes.append(tuple(float(c) * voxel_ml(volume.affine) for c in per_class))
    return json.dumps(composition(volumes))


@dataclass(frozen=True)
class ExampleDraw:
    """The draws of one example that are not per voxel. affine: (3, 3), about the head's centre;
    displacement: (3, p, p, p) mm at the control points; means, stds: (groups,) of the mixture;
    skull_stripped: everything outside the brain 0; log_bias: (b, b, b) at the control points; factors:
    the acquisition's voxel edge over the grid's, per axis; noise: its std as a fraction of the window's
    maximum; gamma: the exponent."""

    affine: torch.Tensor
    displacement: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    skull_stripped: bool
    log_bias: torch.Tensor
    factors: tuple[float, ...]
    noise: float
    gamma: float


class ImageGenerator:
    """Draws (image (1, S, S, S) float32, labels (S, S, S) uint8 class indices) from label maps: the window
    first, then the map and the intensities only where the window's acquisition reads them."""

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
        grid = source.grid.target_shape
        window = tuple(slice(*w.indices(n)[:2]) for w, n in zip(self.plan.training_window(grid, None, gen), grid))
        draw = self._draw(source, gen)
        operators = [AcquisitionAxis.of(n, f, w) for n, f, w in zip(grid, draw.factors, window)]
        region = tuple(op.columns for op in operators)
        indices, inside, image = self._synthesise(source, draw, region, gen)
        crop = tuple(slice(w.start - r.start, w.stop - r.start) for w, r in zip(window, region))
        indices, inside, empty = indices[crop], inside[crop], image[crop] == 0
        image = _along_axes([op.matrix.to(self.device) for op in operators], image)
        level = draw.noise * float(image.max())
        image = self._noisy(image, empty, level, gen)
        scale = float(image.max()) or 1.0
        whole = all(w == slice(0, n) for w, n in zip(window, grid))
        moments = None if whole else self._scan_moments(source, draw, operators, level, scale, gen)
        image = self.plan.normalise((image / scale) ** draw.gamma, inside, moments)
        return image[None], self.to_class[indices.long()].to(torch.uint8)

    def _uniform(self, gen: torch.Generator, low, high, shape=()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen, device=self.device)

    def _draw(self, source: LabelMapSource, gen: torch.Generator) -> ExampleDraw:
        s, dev, groups = self.settings, self.device, self.mean_prior.shape[1]
        affine = self._random_affine(gen)
        std = self._uniform(gen, 0.0, s.nonlinear_mm)
        displacement = torch.randn((3, *(s.nonlinear_points,) * 3), generator=gen, device=dev) * std
        if s.contrast == "t1":
            means = self.mean_prior[0] + self.mean_prior[1] * torch.randn(groups, generator=gen, device=dev)
            stds = (self.std_prior[0] + self.std_prior[1] * torch.randn(groups, generator=gen, device=dev)).abs()
        else:
            means, stds = self._uniform(gen, 25.0, 225.0, (groups,)), self._uniform(gen, 5.0, 25.0, (groups,))
        skull_stripped = float(torch.rand((), generator=gen, device=dev)) < s.skull_strip
        std = self._uniform(gen, 0.0, s.bias)
        log_bias = torch.randn((s.bias_points,) * 3, generator=gen, device=dev) * std
        spacing = np.linalg.norm(source.grid.target_affine[:3, :3], axis=0)
        factors = tuple(float(self._uniform(gen, *s.resolution_mm)) / float(edge) for edge in spacing)
        noise = float(self._uniform(gen, 0.0, s.noise))
        gamma = math.exp(float(torch.randn((), generator=gen, device=dev)) * s.gamma)
        return ExampleDraw(affine, displacement, means, stds, skull_stripped, log_bias, factors, noise, gamma)

    def _synthesise(self, source: LabelMapSource, draw: ExampleDraw, axes: tuple, gen: torch.Generator,
                    blur: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(map indices uint8, inside the map, the biased mixture image), each (len(a) for a in axes), at
        the grid voxels of the three axes' indices (slices or index tensors): the map through the
        affine and the displacement, the mixture (its per-voxel deviations times `blur`), the bias."""
        dev, grid = self.device, source.grid
        axes = [torch.arange(a.start, a.stop, device=dev) if isinstance(a, slice) else a for a in axes]
        to_world, from_world = grid.target_affine, np.linalg.inv(source.affine)
        centre = source.affine[:3, :3] @ ((np.array(source.shape) - 1) / 2) + source.affine[:3, 3]
        turn = draw.affine.double().cpu().numpy()
        matrix = from_world[:3, :3] @ turn @ to_world[:3, :3]  # grid voxel -> map voxel, before the displacement
        offset = from_world[:3, :3] @ (turn @ (to_world[:3, 3] - centre) + centre) + from_world[:3, 3]
        matrix, offset = (torch.as_tensor(a, dtype=torch.float32, device=dev) for a in (matrix, offset))
        columns = [(a.float()[:, None] * matrix[:, i]).view(*(-1 if j == i else 1 for j in range(3)), 3)
                   for i, a in enumerate(axes)]
        to_map = matrix.new_tensor(from_world[:3, :3]).T
        displacement = _smooth_field(draw.displacement, grid.target_shape, axes) @ to_map
        src = columns[0] + columns[1] + columns[2] + offset + displacement  # (.., 3) map voxel coordinates
        k = self.settings.partial_volume
        if k > 1:  # the mixture over the voxel's k^3 points of the map (before src is rounded for its centre)
            shifts = [matrix @ matrix.new_tensor(point) for point in _sub_cube_centres(k)]  # map voxels
            mean, std, keep = self._mixture(draw, (_map_indices(source, src + shift) for shift in shifts))
        indices, inside = _map_indices(source, src)
        if k == 1:
            mean, std, keep = self._mixture(draw, [(indices, inside)])
        deviation = torch.randn(indices.shape, generator=gen, device=dev)
        image = torch.where(keep, (mean + blur * std * deviation).clamp_min(0.0), 0.0)
        bias = torch.exp(_smooth_field(draw.log_bias[None], grid.target_shape, axes)[..., 0])
        return indices, inside, image * bias

    def _mixture(self, draw: ExampleDraw, points: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, kept) per voxel from each of its points' (map indices, inside the map): the mixture's
        means and standard deviations averaged over the points, those outside the map (or, skull-stripped,
        outside the brain) counting 0, and whether any point is kept."""
        kept_index = self.brain if draw.skull_stripped else torch.ones_like(self.brain)
        means, stds = (v[self.intensity_class] * kept_index for v in (draw.means, draw.stds))  # per map index
        mean = std = kept = None
        count = 0
        for indices, inside in points:
            index = indices.long()
            keep, weight = inside & kept_index[index], inside.float()
            m, d = means[index].mul_(weight), stds[index].mul_(weight)
            mean, std, kept = (m, d, keep) if mean is None else (mean.add_(m), std.add_(d), kept.logical_or_(keep))
            count += 1
        return (mean / count, std / count, kept) if count > 1 else (mean, std, kept)

    def _noisy(self, image: torch.Tensor, empty: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
        """The acquired image with noise of std `level`, clamped at 0; voxels empty before it stay 0."""
        image = image + level * torch.randn(image.shape, generator=gen, device=self.device)
        return torch.where(empty, 0.0, image.clamp_min(0.0))

    def _scan_moments(self, source: LabelMapSource, draw: ExampleDraw, operators: list["AcquisitionAxis"],
                      level: float, scale: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole scan's normalisation moments, from the example on a lattice of about 32^3 of its grid
        voxels acquired as a scan of voxels the lattice's stride times the grid's (its blur darkens the
        edges as the window's does; the mixture's deviations scaled to keep the variance the window's
        acquisition leaves them; the noise and the contrast as the window's), so that a window is
        normalised as its whole scan would be."""
        grid = source.grid.target_shape
        stride = max(1, math.ceil(max(grid) / LATTICE))
        axes = tuple(torch.arange(stride // 2, n, stride, device=self.device) for n in grid)
        lattice = [AcquisitionAxis.of(len(a), f / stride, slice(0, len(a))) for a, f in zip(axes, draw.factors)]
        kept = math.sqrt(math.prod(op.noise_variance for op in operators)
                         / math.prod(op.noise_variance for op in lattice))
        _, inside, image = self._synthesise(source, draw, axes, gen, kept)
        empty = image == 0
        image = self._noisy(_along_axes([op.matrix.to(self.device) for op in lattice], image), empty, level, gen)
        return value_moments(self.plan.normalised_values((image / scale) ** draw.gamma, inside))

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


LATTICE = 32  # voxels per axis of the lattice that estimates a whole scan's normalisation moments


@dataclass(frozen=True)
class AcquisitionAxis:
    """The acquisition along one axis of the grid, restricted to the window's voxels: matrix (window,
    columns) maps the grid voxels `columns` (a slice holding every voxel the window reads) to the window;
    noise_variance: the fraction of independent per-voxel noise's variance the whole axis keeps (the
    mean squared norm of its rows)."""

    matrix: torch.Tensor
    columns: slice
    noise_variance: float

    @classmethod
    def of(cls, n: int, factor: float, window: slice) -> "AcquisitionAxis":
        """The axis of n grid voxels scanned with voxels `factor` times the grid's: a Gaussian blur of sigma
        0.4 factor (what the acquisition and the interpolation smooth; zero beyond the grid), and, where
        the acquisition is coarser than the grid, its max(2, round(n / factor)) voxels sampled linearly
        and interpolated back (align_corners: the first and last voxels on the grid's)."""
        operator = torch.eye(n, dtype=torch.float64)
        sigma = 0.4 * factor
        if sigma >= 0.15:  # a kernel of a fraction of a voxel: nothing to blur
            radius = max(1, int(math.ceil(3 * sigma)))
            t = torch.arange(-radius, radius + 1, dtype=torch.float64)
            kernel = torch.exp(-0.5 * (t / sigma) ** 2)
            kernel /= kernel.sum()
            offset = torch.arange(n)[None] - torch.arange(n)[:, None]  # column - row
            operator = torch.where(offset.abs() <= radius, kernel[(offset + radius).clamp(0, 2 * radius)], 0.0)
        coarse = max(2, int(round(n / max(factor, 1.0))))
        operator = _linear_matrix(_positions(n, coarse), coarse) @ _linear_matrix(_positions(coarse, n), n) @ operator
        rows = operator[window]
        used = torch.nonzero(rows.abs().sum(0)).flatten()
        lo, hi = min(int(used.min()), window.start), max(int(used.max()) + 1, window.stop)
        return cls(rows[:, lo:hi].float(), slice(lo, hi), float((operator ** 2).sum(1).mean()))


def _map_indices(source: LabelMapSource, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the map's indices at its voxels nearest the map voxel coordinates src (..., 3), 0 outside the
    map; inside it). src is rounded in place."""
    size = src.new_tensor(source.shape)
    inside = ((src >= -0.5) & (src <= size - 0.5)).all(-1)
    voxel = torch.minimum(src.round_().clamp_min_(0), size - 1).long()
    flat = (voxel[..., 0] * source.shape[1] + voxel[..., 1]) * source.shape[2] + voxel[..., 2]
    return torch.where(inside, source.indices.reshape(-1)[flat], 0), inside


def _sub_cube_centres(k: int) -> list[tuple[float, float, float]]:
    """The centres of a voxel's k^3 equal sub-cubes, in voxels from its centre."""
    steps = [(2 * i + 1) / (2 * k) - 0.5 for i in range(k)]
    return [(a, b, c) for a in steps for b in steps for c in steps]


def _positions(n: int, m: int) -> torch.Tensor:
    """(n,) where each of n voxels of an axis falls on the same axis sampled with m voxels, the first
    and the last of both on each other (align_corners)."""
    return torch.arange(n, dtype=torch.float64) * ((m - 1) / (n - 1) if n > 1 else 0.0)


def _linear_matrix(positions: torch.Tensor, m: int) -> torch.Tensor:
    """(len(positions), m): linear interpolation at positions (in voxels) of an axis of m voxels."""
    low = positions.floor().clamp(0, m - 1)
    frac = (positions - low).to(torch.float64)
    low = low.long()
    high = (low + 1).clamp_max(m - 1)
    matrix = torch.zeros(len(positions), m, dtype=torch.float64)
    rows = torch.arange(len(positions))
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def _smooth_field(coarse: torch.Tensor, grid: tuple[int, ...], axes: list[torch.Tensor]) -> torch.Tensor:
    """(len(axes[0]), len(axes[1]), len(axes[2]), C): a field of C channels given at (C, p, q, r) control
    points spanning the grid (trilinear, align_corners), at the grid voxels of the axes' indices."""
    weights = [_linear_matrix(a.double().cpu() * ((m - 1) / (n - 1) if n > 1 else 0.0), m).to(coarse)
               for a, n, m in zip(axes, grid, coarse.shape[1:])]
    x = weights[0] @ coarse.transpose(0, 1).reshape(coarse.shape[1], -1)
    x = x.view(-1, coarse.shape[0], *coarse.shape[2:])  # (i, C, q, r)
    x = weights[1] @ x  # (i, C, j, r)
    return (x @ weights[2].T).permute(0, 2, 3, 1)  # (i, j, k, C)


def _along_axes(matrices: list[torch.Tensor], volume: torch.Tensor) -> torch.Tensor:
    """volume (a, b, c) -> (m0, m1, m2): matrices[i] (m_i, len_i) applied along axis i."""
    x = (matrices[0] @ volume.reshape(volume.shape[0], -1)).reshape(-1, *volume.shape[1:])
    x = (matrices[1] @ x.transpose(0, 1).reshape(volume.shape[1], -1)).reshape(-1, x.shape[0], x.shape[2])
    return x.transpose(0, 1) @ matrices[2].T
