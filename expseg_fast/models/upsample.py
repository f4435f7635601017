"""Trilinear resampling of channels-last features, F.interpolate(x, size, mode="trilinear",
align_corners=False)'s function, as one op of the native extension on the CPU:
expseg_fast::upsample_trilinear_forward / upsample_trilinear_backward (csrc/upsample.*): fake kernels,
autograd and `upsample`, which the network's decoder and deep-supervision fusion call.

PyTorch's CPU kernel took 28 ms forward and 20 ms backward for the fusion's (1, 33, 16^3) -> 64^3 in fp32
channels-last on a 2-core CPU, about ten times the 35 MB it writes at the measured copy bandwidth; the op
is separable (two input rows' D and H lerps summed once per output row, then the W lerps) with every
element written once (bench/NOTES.md). Values in x's dtype (sums in float for bf16), channels-last out.
Elsewhere (CUDA, a contiguous x, the extension not built) F.interpolate as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expseg_fast.extension import kernel_device_types

DEVICE_TYPES = kernel_device_types("upsample_trilinear_forward")  # fixed at import, as torch.compile needs
_CL = torch.channels_last_3d


def takes_the_op(x: torch.Tensor) -> bool:
    """Whether `upsample` of x (N, C, D, H, W) runs the native op: the extension has it for x's device
    (the CPU), x channels-last (or one channel) and floating point."""
    return x.device.type in DEVICE_TYPES and x.dim() == 5 and x.is_floating_point() \
        and x.is_contiguous(memory_format=_CL)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """x (N, C, D, H, W) resampled trilinearly to (N, C, *size), align_corners=False."""
    size = [int(s) for s in size]
    if takes_the_op(x):
        return torch.ops.expseg_fast.upsample_trilinear_forward(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


if DEVICE_TYPES:  # the op is registered

    @torch.library.register_fake("expseg_fast::upsample_trilinear_forward")
    def _forward_fake(x, size):
        return x.new_empty((*x.shape[:2], *size)).contiguous(memory_format=_CL)

    @torch.library.register_fake("expseg_fast::upsample_trilinear_backward")
    def _backward_fake(grad_y, input_size):
        return grad_y.new_empty(input_size).contiguous(memory_format=_CL)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.input_size = list(inputs[0].shape)

    def _backward(ctx, grad_y):
        return torch.ops.expseg_fast.upsample_trilinear_backward(grad_y, ctx.input_size), None

    torch.library.register_autograd("expseg_fast::upsample_trilinear_forward", _backward,
                                    setup_context=_setup_context)
