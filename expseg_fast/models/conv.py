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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_ROWS = 20480  # PyTorch takes oneDNN for one fp32 image above this N*C*D*H (kernels <= 3)
_CL = torch.channels_last_3d


def takes_two_slabs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv3d of x (N, C, D, H, W) by weight (O, C, k, k, k), stride 1, is computed as two slabs:
    one fp32 CPU image PyTorch would send to its im2col path (not under CPU autocast, whose bf16 or fp16
    convolutions always take oneDNN), D even, oneDNN present, k odd."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.dim() == 5 and x.shape[0] == 1
            and x.shape[1] * x.shape[2] * x.shape[3] <= ONEDNN_MIN_ROWS and x.shape[2] >= 2 and x.shape[2] % 2 == 0
            and weight.shape[2] % 2 == 1 and max(weight.shape[3:]) <= 3
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]
           ) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=padding) with stride 1, dilation 1, one group: x (N, C, D, H, W),
    weight (O, C, kD, kH, kW), padding kD // 2 along D -> (N, O, D, H, W); two slabs where
    takes_two_slabs says so."""
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
