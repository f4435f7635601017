"""Label weights of the weighted cross-entropy, from training-set label counts (paper eq. 3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def label_counts(targets: Iterable[torch.Tensor], num_labels: int) -> torch.Tensor:
    """Voxel count of each label (num_labels,) int64 over integer label volumes."""
    counts = torch.zeros(num_labels, dtype=torch.int64)
    for index, target in enumerate(targets):
        flat = target.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_labels):
            raise ValueError(f"targets[{index}] holds labels outside [0, {num_labels})")
        counts += torch.bincount(flat, minlength=num_labels)
    return counts


def label_weights(counts: torch.Tensor | Iterable[float]) -> torch.Tensor:
    """w_k = (sum_j f_j / f_k) ** 0.5 from per-label voxel counts f (C,), as float32.

    Count the labels once over the training set, not per batch: batch weights jump when a structure
    is absent from a crop. A label that never occurs has no defined weight and raises ValueError.
    """
    f = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if f.numel() < 1 or not torch.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"counts must be finite, non-negative label counts, got {f.tolist()}")
    missing = (f == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"counts: labels {missing} never occur, so their weight (sum f / f_k)^0.5 is undefined")
    return (f.sum() / f).sqrt().float()
