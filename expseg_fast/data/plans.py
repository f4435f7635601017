"""The preprocessing plan: one object, one class per mode, that the cache, the trainer, segment.py and
evaluate.py all ask (as nnU-Net's plans). It answers everything that depends on the mode: the intensity
normalisation, the cache key, the training grid of a subject, the inference grid and windows of a whole
scan, what a scan would lose or cost, and its own record for the checkpoint (rebuilt by `from_record`).
No other module branches on the mode; a new mode is one new class in PLANS.

- FitPlan (`fit`, the paper's section 3.1): the whole scan padded to a cube and resized to size^3, in
  training and at inference alike; the `fov` normalisation; one window.
- SpacingPlan (`spacing`, as nnU-Net and MONAI): voxels of spacing_mm; in training the size^3 cube
  around the foreground, at inference the whole scan at that voxel size under half-overlapping windows;
  the `nonzero` normalisation (DESIGN.md section 5).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from expseg_fast.data.nifti import voxel_bound_problem
from expseg_fast.data.preprocess import (
    Resampling,
    ScanStatistics,
    apply_image,
    foreground_centre,
    plan,
    plan_spacing,
    plan_spacing_whole,
    resampling_problem,
)

WINDOW_OVERLAP = 0.5  # of the windows sliding over a whole scan, along every axis


def window_starts(length: int, window: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Start indices of windows covering [0, length): a step of window * (1 - overlap), the last at the end."""
    if length < window:
        raise ValueError(f"a volume of {length} voxels along an axis is shorter than the window ({window})")
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def value_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) of 1-D values, the deviation 1 where it is 0 and (0, 1) for none: the
    torch twin of preprocess.array_moments (tested equal), for the label-map generator on its device
    (no synchronisation)."""
    if not values.numel():
        return values.new_zeros(()), values.new_ones(())
    std = values.std(unbiased=False)
    return values.mean(), torch.where(std > 0, std, 1.0)


class Plan(ABC):
    """What every mode answers. size: the training cube's edge (voxels), which is also the window edge."""

    mode: ClassVar[str]  # the --preprocessing name
    normalisation: ClassVar[str]  # the intensity rule: `fov` or `nonzero` (expseg_fast/data/preprocess.py)
    max_windows: ClassVar[int | None]  # windows of one scan at inference (None: as many as it needs)
    absorbed: ClassVar[tuple[str, ...]]  # what about a scan (expseg_fast/data/facts.py) the plan makes alike
    size: int

    def __post_init__(self) -> None:
        """ValueError for settings no scan can be preprocessed with (a hand-edited record, say)."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preprocessing {self.mode}: size must be a positive whole number of voxels, "
                             f"got {self.size!r}")
        spacing = getattr(self, "spacing_mm", 1.0)
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing < float("inf"):
            raise ValueError(f"preprocessing {self.mode}: spacing_mm must be a positive number of mm, got {spacing!r}")

    @classmethod
    @abstractmethod
    def of(cls, size: int, spacing_mm: float) -> "Plan":
        """The plan of a training cube's edge (voxels) and voxel size (mm; modes that resample to the cube
        ignore it)."""

    @abstractmethod
    def training_grid(self, shape: tuple[int, int, int], affine: np.ndarray, classes: np.ndarray) -> Resampling:
        """The resampling of a training subject (its class-index labels given) onto the training cube."""

    @abstractmethod
    def inference_grid(self, shape: tuple[int, int, int], affine: np.ndarray) -> Resampling:
        """The resampling of a whole scan for inference (every edge at least size)."""

    @abstractmethod
    def statistics(self, data: np.ndarray) -> ScanStatistics | None:
        """The scan statistics its normalisation uses (None: those of the grid's field of view)."""

    @abstractmethod
    def scan_problem(self, path, shape: tuple[int, int, int], affine: np.ndarray, max_voxels: int) -> str | None:
        """One line naming the file when the plan would lose the scan or its grid would cost more than
        max_voxels, else None."""

    @abstractmethod
    def normalised_values(self, image: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """The voxels of an image (and the mask of its voxels inside the original) whose mean and standard
        deviation the plan's rule normalises by (1-D)."""

    @abstractmethod
    def normalise(self, image: torch.Tensor, inside: torch.Tensor,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """A whole scan on the plan's grid (and the mask of its voxels inside the original) normalised by
        the plan's rule, in torch (the label-map generator's; `image` is the files' numpy path); or a part
        of one, with the whole scan's `moments` (value_moments of its normalised_values)."""

    @abstractmethod
    def training_window(self, grid: tuple[int, int, int], classes: torch.Tensor,
                        gen: torch.Generator | None = None) -> tuple[slice, slice, slice]:
        """The training cube within the plan's whole-scan grid of a subject (its class indices given):
        centred on the foreground, or, with a generator, drawn among the windows inference slides over
        the grid (so that training also sees the scan's edges)."""

    def image(self, channels: list[np.ndarray], r: Resampling) -> np.ndarray:
        """The channels (original grid) resampled by r and normalised, stacked (K, ...) float32."""
        return np.stack([apply_image(data, r, self.statistics(data)) for data in channels])

    def windows(self, grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """The corners of the size^3 windows that cover a grid (one when the grid is the cube)."""
        return list(itertools.product(*(window_starts(n, self.size) for n in grid)))

    def record(self) -> dict:
        """What a checkpoint stores of the plan (from_record rebuilds it)."""
        return {"mode": self.mode, **asdict(self)}

    def key(self) -> dict:
        """What decides a cache entry's content besides the source files and the label map."""
        return {**self.record(), "normalisation": self.normalisation}

    @staticmethod
    def from_record(record: dict) -> "Plan":
        """The plan a checkpoint stored; ValueError for an unknown mode or settings."""
        settings = dict(record)
        mode = settings.pop("mode", None)
        if mode not in PLANS:
            raise ValueError(f"unknown preprocessing mode {mode!r} (known: {', '.join(PLANS)})")
        try:
            return PLANS[mode](**settings)
        except TypeError as error:
            raise ValueError(f"preprocessing {mode}: {error}") from None


@dataclass(frozen=True)
class FitPlan(Plan):
    mode: ClassVar[str] = "fit"
    normalisation: ClassVar[str] = "fov"
    max_windows: ClassVar[int | None] = 1
    absorbed: ClassVar[tuple[str, ...]] = ()  # the anatomy's scale follows the field of view
    size: int

    @classmethod
    def of(cls, size: int, spacing_mm: float) -> "FitPlan":
        return cls(int(size))

    def training_grid(self, shape, affine, classes) -> Resampling:
        return plan(shape, affine, self.size)

    def inference_grid(self, shape, affine) -> Resampling:
        return plan(shape, affine, self.size)

    def statistics(self, data) -> None:
        return None

    def scan_problem(self, path, shape, affine, max_voxels) -> str | None:
        return resampling_problem(path, shape, affine, self.size)  # the grid is size^3, within the bound

    def normalised_values(self, image: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        return image[inside]

    def normalise(self, image, inside, moments=None) -> torch.Tensor:
        mean, std = moments or value_moments(self.normalised_values(image, inside))
        return torch.where(inside, (image - mean) / std, 0.0)

    def training_window(self, grid, classes, gen=None) -> tuple[slice, slice, slice]:
        return (slice(None),) * 3  # the grid is the cube


@dataclass(frozen=True)
class SpacingPlan(Plan):
    mode: ClassVar[str] = "spacing"
    normalisation: ClassVar[str] = "nonzero"
    max_windows: ClassVar[int | None] = None
    absorbed: ClassVar[tuple[str, ...]] = ("spacing_mm", "field_of_view_mm")  # resampled; windows slide over any
    size: int
    spacing_mm: float

    @classmethod
    def of(cls, size: int, spacing_mm: float) -> "SpacingPlan":
        return cls(int(size), float(spacing_mm))

    def training_grid(self, shape, affine, classes) -> Resampling:
        return plan_spacing(shape, affine, (self.size,) * 3, self.spacing_mm, foreground_centre(classes))

    def inference_grid(self, shape, affine) -> Resampling:
        return plan_spacing_whole(shape, affine, self.size, self.spacing_mm)

    def statistics(self, data) -> ScanStatistics:
        return ScanStatistics.of(data)

    def scan_problem(self, path, shape, affine, max_voxels) -> str | None:
        return voxel_bound_problem(path, self.inference_grid(shape, affine).target_shape, max_voxels,
                                   f"resampled to {self.spacing_mm:g} mm voxels, a grid of ")

    def normalised_values(self, image: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        return image[inside & (image != 0)]

    def normalise(self, image, inside, moments=None) -> torch.Tensor:
        mean, std = moments or value_moments(self.normalised_values(image, inside))
        return (torch.where(inside, image, 0.0) - mean) / std

    def training_window(self, grid, classes, gen=None) -> tuple[slice, slice, slice]:
        if gen is not None:
            corners = [int(torch.randint(n - self.size + 1, (), generator=gen, device=gen.device)) for n in grid]
            return tuple(slice(c, c + self.size) for c in corners)
        centre = foreground_centre(classes.cpu().numpy())
        corners = [min(max(int(round(c - (self.size - 1) / 2)), 0), n - self.size) for c, n in zip(centre, grid)]
        return tuple(slice(c, c + self.size) for c in corners)


PLANS: dict[str, type[Plan]] = {p.mode: p for p in (FitPlan, SpacingPlan)}


def plan_of(mode: str, size: int, spacing_mm: float) -> Plan:
    """The plan of a mode name, a training cube's edge (voxels) and a voxel size (mm); ValueError for an
    unknown mode."""
    if mode not in PLANS:
        raise ValueError(f"preprocessing must be one of {', '.join(PLANS)}, got {mode!r}")
    return PLANS[mode].of(size, spacing_mm)

