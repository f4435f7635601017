"""Sliding-window inference: a volume larger than the network's cube segmented whole.

The windows are the plan's (expseg_fast/data/plans.py: for `spacing`, cube-sized windows overlapping by
half along every axis, the last of an axis ending at its end; for `fit`, the one cube); their softmax
outputs are weighted by a Gaussian centred in the window (sigma = edge / 8, so the
unreliable borders count little, as nnU-Net and MONAI do), summed and normalised by the summed weights,
then the arg max gives the labels. Windows go through the predictor in batches of its input shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gaussian_weights(window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(window,)^3 weights: a Gaussian of sigma window / 8 around the centre, 1 at its peak, never 0."""
    x = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    g = torch.exp(-0.5 * (x / (window / 8)) ** 2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return (w / w.max()).clamp_min(1e-4)


def sliding_window_labels(probabilities: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, window: int,
                          batch: int, num_labels: int, corners: list[tuple[int, int, int]]) -> torch.Tensor:
    """Labels (D, H, W) of an image (K, D, H, W) covered by windows of edge `window` at `corners` (a
    plan's windows, expseg_fast/data/plans.py).

    probabilities: (batch, K, window, window, window) -> softmax (batch, C, window, window, window)."""
    _, *grid = image.shape
    device = image.device
    weights = gaussian_weights(window, device)
    total = torch.zeros((num_labels, *grid), dtype=torch.float32, device=device)
    norm = torch.zeros(grid, dtype=torch.float32, device=device)
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
