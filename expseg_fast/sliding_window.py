"""Sliding-window inference: a volume larger than the network's cube segmented whole.

Windows of the cube's edge overlap by half along every axis (the last window of an axis ends at its
end); their softmax outputs are weighted by a Gaussian centred in the window (sigma = edge / 8, so the
unreliable borders count little, as nnU-Net and MONAI do), summed and normalised by the summed weights,
then the arg max gives the labels. Windows go through the predictor in batches of its input shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def window_starts(length: int, window: int, overlap: float = 0.5) -> list[int]:
    """Start indices of windows covering [0, length): a step of window * (1 - overlap), the last at the end."""
    if length < window:
        raise ValueError(f"a volume of {length} voxels along an axis is shorter than the window ({window})")
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def gaussian_weights(window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(window,)^3 weights: a Gaussian of sigma window / 8 around the centre, 1 at its peak, never 0."""
    x = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    g = torch.exp(-0.5 * (x / (window / 8)) ** 2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return (w / w.max()).clamp_min(1e-4)


def sliding_window_labels(probabilities: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, window: int,
                          batch: int, num_labels: int, overlap: float = 0.5) -> torch.Tensor:
    """Labels (D, H, W) of an image (K, D, H, W) every edge of which is >= window.

    probabilities: (batch, K, window, window, window) -> softmax (batch, C, window, window, window)."""
    _, *grid = image.shape
    device = image.device
    weights = gaussian_weights(window, device)
    total = torch.zeros((num_labels, *grid), dtype=torch.float32, device=device)
    norm = torch.zeros(grid, dtype=torch.float32, device=device)
    corners = list(itertools.product(*(window_starts(n, window, overlap) for n in grid)))
    for first in range(0, len(corners), batch):
        chunk = corners[first:first + batch]
        windows = torch.zeros((batch, image.shape[0], window, window, window), dtype=image.dtype, device=device)
        for i, (a, b, c) in enumerate(chunk):
            windows[i] = image[:, a:a + window, b:b + window, c:c + window]
        probs = probabilities(windows)
        for i, (a, b, c) in enumerate(chunk):
            total[:, a:a + window, b:b + window, c:c + window] += probs[i].float() * weights
            norm[a:a + window, b:b + window, c:c + window] += weights
    return (total / norm).argmax(0)
