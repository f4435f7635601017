"""Test-time flip averaging: each window is also segmented mirrored left-right in the scan's anatomical
frame, its softmax mirrored back and averaged with the plain one. Classes that merge left and right need
nothing more; a label map with lateralised classes ("left X" and "right X", "Left-X" and "Right-X") has
each pair's channels swapped in the mirrored output, since the mirror turns one side into the other."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

_SIDE = re.compile(r"^(left|right)([ _-].*)$", re.IGNORECASE)


def lateral_swap(names: list[str]) -> list[int] | None:
    """The channel permutation that exchanges each left/right pair of class names (a class without its
    twin stays), or None when no class is lateralised."""
    index = {name.lower(): i for i, name in enumerate(names)}
    order, swapped = list(range(len(names))), False
    for i, name in enumerate(names):
        side = _SIDE.match(name)
        if side:
            other = ("right" if side.group(1).lower() == "left" else "left") + side.group(2).lower()
            if other in index:
                order[i], swapped = index[other], True
    return order if swapped else None


def left_right_axis(affine: np.ndarray) -> int:
    """The grid axis (0, 1 or 2) of a voxel -> world (RAS, mm) affine that runs closest to left-right."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[0])))


def mirrored(probabilities: Callable[[torch.Tensor], torch.Tensor], axis: int,
             swap: list[int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """probabilities (windows (B, K, D, H, W) -> softmax (B, C, D, H, W)) averaged with its mirror: the
    windows flipped along grid `axis`, their softmax flipped back (its channels permuted by swap)."""

    def averaged(windows: torch.Tensor) -> torch.Tensor:
        plain = probabilities(windows).float()
        flipped = probabilities(windows.flip(2 + axis)).float().flip(2 + axis)
        return (plain + (flipped[:, swap] if swap is not None else flipped)) / 2

    return averaged
