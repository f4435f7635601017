"""BatchNorm folded into the convolution before it, for inference: in eval mode y = gamma (W*x + b - mean)
/ sqrt(var + eps) + beta is one convolution with W' = W s and b' = (b - mean) s + beta, s = gamma /
sqrt(var + eps) per output channel. Computed in float64 and stored in float32, before any cast to a
lower precision, so the folded network equals the original to float32 rounding. Every (convolution,
BatchNorm) pair that follows each other in an nn.Sequential is folded (ours: the blocks' 3x3x3
convolutions; V-Net: its 5x5x5, strided and transposed convolutions); the BatchNorm becomes an Identity.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_CONVOLUTIONS = (nn.Conv3d, nn.ConvTranspose3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of model (eval mode) with every BatchNorm that follows a convolution folded into it."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, _CONVOLUTIONS) and isinstance(norm, nn.BatchNorm3d):
                    _fold(conv, norm)
                    module[i + 1] = nn.Identity()
    return folded


@torch.no_grad()
def _fold(conv: nn.Conv3d | nn.ConvTranspose3d, norm: nn.BatchNorm3d) -> None:
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    out_axis = 1 if isinstance(conv, nn.ConvTranspose3d) else 0  # ConvTranspose3d's weight is (in, out, ...)
    shape = [1] * conv.weight.dim()
    shape[out_axis] = -1
    weight = conv.weight.double() * scale.view(shape)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))
