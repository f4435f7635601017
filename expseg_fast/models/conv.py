"""The network's 3D convolutions, kept on oneDNN on the CPU in fp32.

PyTorch's CPU backend choice (`use_mkldnn` in aten/src/ATen/native/Convolution.cpp, torch 2.x) sends an fp32
convolution of ONE image with at most ONEDNN_MIN_ROWS rows N*C*D*H and a kernel of at most 3 (ours: the
deeper levels, and the first level's one-channel input) to its unvectorised im2col path. On a 2-core AVX2
CPU that path ran the (1, 12, 32^3) -> 24 convolution's forward and backward in 138 ms against 16 ms for
the same work on oneDNN, and its outputs come out contiguous, so a channels-last network converts layouts
around it (bench/NOTES.md, 2026-12-07). A batch of two passes that test: such a convolution is computed
on the image's two halves along D, each with the one plane of its neighbour (or of zero padding) that
the kernel reaches, as a batch of two; in channels-last the two outputs are the whole output's memory
as it stands (a view). The same function to float rounding; everything else goes to F.conv3d as before.

The backward of such an fp32 CPU convolution ("same" padding, odd kernel) is ours too (_SameConv3d): oneDNN's
weight gradient ran at a quarter of the CPU's multiply-add rate at the network's channel counts (36 -> 12 at
64^3: 130 ms against 70 for the forward's same work), so it is the native op expseg_fast::conv3d_weight_grad
(csrc/conv_weight_grad.*). The input gradient stays oneDNN's, and where the forward took two slabs it is
the forward convolution of the output gradient by the kernel flipped and transposed (the same function for
stride 1 and padding k // 2) through the same path. Elsewhere (CUDA, bf16 or fp16, autocast, the extension
not built) PyTorch's backward.

A 1x1x1 convolution of one input channel (the first block's skip) is a per-channel scale and shift of that
channel: oneDNN took 5.5 ms forward for the (1, 1, 64^3) -> 12 one on the 2-core CPU, and a broadcast
multiply-add computes the same function, written channels-last, in 1.4 ms (_ChannelScale, with a backward
of one matrix-vector product for the weight and a sum for the bias; fp32 on the CPU outside autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from expseg_fast.extension import kernel_device_types

ONEDNN_MIN_ROWS = 20480  # PyTorch takes oneDNN for one fp32 image above this N*C*D*H (kernels <= 3)
_CL = torch.channels_last_3d
DEVICE_TYPES = kernel_device_types("conv3d_weight_grad")  # fixed at import, as torch.compile needs


def takes_two_slabs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv3d of x (N, C, D, H, W) by weight (O, C, k, k, k), stride 1, is computed as two slabs:
    one fp32 CPU image PyTorch would send to its im2col path (not under CPU autocast, whose bf16 or fp16
    convolutions always take oneDNN), D even, oneDNN present, k odd."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.dim() == 5 and x.shape[0] == 1
            and x.shape[1] * x.shape[2] * x.shape[3] <= ONEDNN_MIN_ROWS and x.shape[2] >= 2 and x.shape[2] % 2 == 0
            and weight.shape[2] % 2 == 1 and max(weight.shape[3:]) <= 3
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def takes_weight_op(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> bool:
    """Whether conv3d's backward is _SameConv3d's: an fp32 CPU convolution outside autocast with "same"
    padding (k // 2 along each axis, odd k), a gradient to compute, the extension built."""
    return (x.device.type in DEVICE_TYPES and x.dtype == weight.dtype == torch.float32 and x.dim() == 5
            and not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and all(k % 2 == 1 and p == k // 2 for k, p in zip(weight.shape[2:], padding)))


def takes_channel_scale(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> bool:
    """Whether conv3d of x by weight is _ChannelScale's: one input channel, a 1x1x1 kernel without padding,
    fp32 on the CPU outside autocast."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 5
            and not torch.is_autocast_enabled("cpu") and x.shape[1] == weight.shape[1] == 1
            and tuple(weight.shape[2:]) == (1, 1, 1) and tuple(padding) == (0, 0, 0))


class _ChannelScale(torch.autograd.Function):
    """conv3d of x (N, 1, D, H, W) by weight (O, 1, 1, 1, 1) and bias (O,) or None: x times each output
    channel's weight plus its bias, written channels-last (N, O, D, H, W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        voxels = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, 1): a view for either layout of one channel
        scale = weight.reshape(-1)
        y = torch.addcmul(bias, voxels, scale) if bias is not None else voxels * scale  # (N, D, H, W, O)
        return y.permute(0, 4, 1, 2, 3)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad_y.permute(0, 2, 3, 4, 1).reshape(-1, weight.shape[0])  # (N D H W, O); a view if channels-last
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (rows @ weight.reshape(-1)).reshape(x.shape[0], *x.shape[2:]).unsqueeze(1)
        if ctx.needs_input_grad[1]:
            grad_w = (x.permute(0, 2, 3, 4, 1).reshape(-1) @ rows).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


class _SameConv3d(torch.autograd.Function):
    """conv3d's function (forward: _conv3d) with the backward of the module's docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return _conv3d(x, weight, bias, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and takes_two_slabs(x, weight):  # as the forward: PyTorch's would be im2col
            grad_x = _conv3d(grad_y, weight.flip(2, 3, 4).transpose(0, 1), None, ctx.padding)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, weight, None, [1, 1, 1], list(ctx.padding),
                                                         [1, 1, 1], False, [0, 0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.expseg_fast.conv3d_weight_grad(grad_y, x, list(weight.shape[2:]))
            grad_w = grad_w.contiguous(memory_format=_CL) if weight.is_contiguous(memory_format=_CL) else grad_w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]
           ) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=padding) with stride 1, dilation 1, one group: x (N, C, D, H, W),
    weight (O, C, kD, kH, kW), padding kD // 2 along D -> (N, O, D, H, W); two slabs where
    takes_two_slabs says so, the backward _SameConv3d's where takes_weight_op says so; _ChannelScale where
    takes_channel_scale says so."""
    if takes_channel_scale(x, weight, padding):
        return _ChannelScale.apply(x, weight, bias)
    if takes_weight_op(x, weight, padding):
        return _SameConv3d.apply(x, weight, bias, tuple(padding))
    return _conv3d(x, weight, bias, padding)


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]
            ) -> torch.Tensor:
    """conv3d's forward: two slabs where takes_two_slabs says so, else F.conv3d."""
    if not takes_two_slabs(x, weight) or padding[0] != weight.shape[2] // 2:
        return F.conv3d(x, weight, bias, padding=padding)
    depth, pad = x.shape[2], padding[0]
    half = depth // 2
    padded = F.pad(x, (0, 0, 0, 0, pad, pad)) if pad else x
    slabs = torch.cat([padded[:, :, : half + 2 * pad], padded[:, :, half:]])  # (2, C, half + 2 pad, H, W)
    y = F.conv3d(slabs, weight, bias, padding=(0, *padding[1:]))  # (2, O, half, H, W)
    if y.shape[1] > 1 and y.is_contiguous(memory_format=_CL):  # memory (2, half, H, W, O) = (D, H, W, O)
        return y.movedim(1, -1).reshape(1, depth, *y.shape[3:], y.shape[1]).movedim(-1, 1)
    return torch.cat([y[:1], y[1:]], dim=2)


class Conv3d(nn.Conv3d):
    """nn.Conv3d (stride 1, zero padding of kD // 2 along D) computed by `conv3d`; the same parameters,
    state-dict keys and function."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.stride != (1, 1, 1) or self.dilation != (1, 1, 1) or self.groups != 1 or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, bias, self.padding)


if DEVICE_TYPES:  # the op is registered

    @torch.library.register_fake("expseg_fast::conv3d_weight_grad")
    def _weight_grad_fake(grad_y, x, kernel):
        return x.new_empty((grad_y.shape[1], x.shape[1], *kernel))
