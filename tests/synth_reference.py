"""The label-map generator as it was before it drew only its window (expseg_fast/data/synth.py before
issue 34): the whole scan synthesised on the plan's grid, normalised, then the window cut. The reference
that the window-first generator's distribution is compared with (tests/test_synth_window.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from expseg_fast.data.synth import ImageGenerator, LabelMapSource


class FullFieldGenerator(ImageGenerator):
    """Draws (image (1, S, S, S) float32, labels (S, S, S) uint8 class indices) as the generator did before
    issue 34: the whole scan, then the window (its tables, priors and random affine are the ImageGenerator's)."""

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
            spread = self.std_prior[1] * torch.randn(groups, generator=gen, device=self.device)
            stds = (self.std_prior[0] + spread).abs()
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
