"""Evaluation metrics: the paper's hard Dice of predicted label maps."""

from __future__ import annotations

import math

import torch


def hard_dice(pred: torch.Tensor, target: torch.Tensor, num_labels: int, ignore: int | None = None) -> torch.Tensor:
    """Per-label hard Dice (C,) float64 of two integer label volumes of one shape; NaN where a label is
    absent from both. Voxels whose target is `ignore` are not scored. Three bincounts of the V voxels:
    no one-hot (V, C) tensor is built."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    if ignore is not None:
        scored = target != ignore
        pred, target = pred[scored], target[scored]
    predicted = torch.bincount(pred, minlength=num_labels)[:num_labels].double()
    truth = torch.bincount(target, minlength=num_labels)[:num_labels].double()
    inter = torch.bincount(target[pred == target], minlength=num_labels)[:num_labels].double()
    denominator = predicted + truth
    return torch.where(denominator > 0, 2 * inter / denominator.clamp_min(1), torch.full_like(inter, math.nan))


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over dim 0, ignoring NaN."""
    mean = x.nanmean(0, keepdim=True)
    return ((x - mean) ** 2).nanmean(0).sqrt()
