"""Instance norm with a learned scale and shift, then ReLU (optional), as one op of the native extension:
expseg_fast::instance_norm_forward / instance_norm_backward (csrc/instance_norm.*): loading, fake kernels,
autograd and the module.

Per sample and channel, statistics over D*H*W (biased variance, eps inside the root, as GroupNorm with
one channel per group), computed in float32 (float64 for float64 x) whatever x's dtype, so bf16 features
stay bf16 in and out with no casts around the op; channels-last x stays channels-last. The statistics
are (N, C): dmean, the mean less each (sample, channel)'s first voxel (so a large mean costs no
precision), and rstd. The forward saves x, y and them; the backward reads them in two passes. Where
the extension lacks the op for a device, `InstanceNormReLU` computes GroupNorm (+ ReLU) instead and says so once.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from expseg_fast.extension import kernel_device_types

EPS = 1e-5  # GroupNorm's

DEVICE_TYPES = kernel_device_types("instance_norm_forward")  # fixed at import, so torch.compile traces a constant
_said: set[str] = set()


def fused_available(device: torch.device) -> bool:
    """Whether the extension has the fused op for this device type."""
    return device.type in DEVICE_TYPES


def instance_norm_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = True,
                       eps: float = EPS) -> torch.Tensor:
    """relu(instance_norm(x) * weight + bias) of x (N, C, D, H, W) through the fused op; x's dtype and
    memory format (contiguous or channels-last; any other is made contiguous)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)):
        x = x.contiguous()
    y, _dmean, _rstd = torch.ops.expseg_fast.instance_norm_forward(x, weight, bias, eps, relu)
    return y


if DEVICE_TYPES:  # the op is registered

    @torch.library.register_fake("expseg_fast::instance_norm_forward")
    def _forward_fake(x, weight, bias, eps, relu):
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, c = x.shape[:2]
        return torch.empty_like(x), x.new_empty((n, c), dtype=stats), x.new_empty((n, c), dtype=stats)

    @torch.library.register_fake("expseg_fast::instance_norm_backward")
    def _backward_fake(grad_y, x, y, weight, dmean, rstd, relu):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, _eps, relu = inputs
        y, dmean, rstd = output
        ctx.save_for_backward(x, y, weight, dmean, rstd)
        ctx.relu = relu
        ctx.mark_non_differentiable(dmean, rstd)

    def _backward(ctx, grad_y, _grad_dmean, _grad_rstd):
        x, y, weight, dmean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.expseg_fast.instance_norm_backward(grad_y, x, y, weight, dmean, rstd,
                                                                              ctx.relu)
        return grad_x, grad_w, grad_b, None, None

    torch.library.register_autograd("expseg_fast::instance_norm_forward", _backward, setup_context=_setup_context)


class InstanceNormReLU(nn.Module):
    """Instance norm of (N, C, D, H, W) features with a learned scale and shift (GroupNorm(C, C)'s
    parameters and state-dict keys: `weight`, `bias`), then ReLU when `relu`: the fused op where the
    extension has it for the features' device, else GroupNorm (+ ReLU), said once per device type."""

    def __init__(self, channels: int, relu: bool = True, eps: float = EPS) -> None:
        super().__init__()
        self.channels, self.relu, self.eps = channels, relu, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_available(x.device):
            return instance_norm_relu(x, self.weight, self.bias, self.relu, self.eps)
        if x.device.type not in _said:
            _said.add(x.device.type)
            print(f"note: the native extension has no fused instance norm for {x.device.type}; using GroupNorm "
                  f"(slower; rebuild with `pip install --no-build-isolation -e .`)", file=sys.stderr, flush=True)
        y = nn.functional.group_norm(x, self.channels, self.weight, self.bias, self.eps)
        return nn.functional.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"{self.channels}, relu={self.relu}, eps={self.eps}"
