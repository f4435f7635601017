"""The network's evaluation forward, one definition for validation and the Predictor: logits under
autocast at a precision (float32: no autocast; normalisation statistics stay float32 either way), and the
labels they give."""

from __future__ import annotations

import torch
from torch import nn


def logits_at(model: nn.Module, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """model(image) (N, C, D, H, W) with autocast to dtype on image's device unless dtype is float32."""
    with torch.autocast(image.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(image)


def labels_at(model: nn.Module, image: torch.Tensor, dtype: torch.dtype,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The arg max over classes (N, D, H, W) int64 of logits_at for image (N, in_channels, D, H, W), given
    to the model in memory_format."""
    return logits_at(model, image.contiguous(memory_format=memory_format), dtype).argmax(1)
