"""The paper's network (Wong et al. 2018, section 2.1, Fig. 1; DESIGN.md section 4).

Blocks of k x (3x3x3 conv, normalisation (BatchNorm, the paper's, or instance norm), ReLU) plus a 1x1x1
convolution skip, the two branches added; max pooling between encoder levels, channels doubling;
trilinear upsampling in the decoder, encoder features concatenated, channels halving. Deep supervision
is multi-level fusion into one output: the chosen decoder levels are upsampled to full size,
concatenated, and mapped by a 1x1x1 convolution to the labels (LevelFusion, which computes the same
function in a cheaper order). A Gaussian noise layer (on the input) and channel dropout (before the
fusion) act in training only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expseg_fast.models.conv import Conv3d, conv3d
from expseg_fast.models.norms import NORMS, norm_relu
from expseg_fast.models.shapes import check_spatial_shape
from expseg_fast.models.upsample import upsample


@dataclass(frozen=True)
class NetConfig:
    """in_channels: image channels; num_labels: output labels C; width: channels of the first block
    (doubling per level); blocks: convolutions k per block, encoder top to bottom (the decoder mirrors
    all but the bottom); fuse_levels: decoder levels fused for deep supervision (0 = full resolution,
    1 = half, ...; len(blocks) - 1 = the bottom block, which the paper left out for memory);
    noise_std: std of the training-time Gaussian noise on the input; dropout: rate before the fusion;
    norm: the normalisation after each convolution (expseg_fast/models/norms.py)."""

    in_channels: int = 1
    num_labels: int = 20
    width: int = 24
    blocks: tuple[int, ...] = (1, 2, 3, 3)
    fuse_levels: tuple[int, ...] = (0, 1, 2)
    noise_std: float = 0.1
    dropout: float = 0.2
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_labels < 2 or self.width < 1:
            raise ValueError(f"in_channels >= 1, num_labels >= 2 and width >= 1 required, got {self}")
        if len(self.blocks) < 2 or any(k < 1 for k in self.blocks):
            raise ValueError(f"blocks must list >= 2 levels of >= 1 convolutions, got {self.blocks}")
        if not self.fuse_levels or any(not 0 <= lv < len(self.blocks) for lv in self.fuse_levels):
            raise ValueError(f"fuse_levels must be non-empty, within [0, {len(self.blocks)}), got {self.fuse_levels}")
        if self.noise_std < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"noise_std >= 0 and 0 <= dropout < 1 required, got {self.noise_std}, {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training; identity in eval."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class ResBlock(nn.Module):
    """k x (3x3x3 conv, norm, ReLU) + 1x1x1 conv skip, added."""

    def __init__(self, in_channels: int, channels: int, k: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(k):
            layers += [
                Conv3d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                *norm_relu(norm, channels),
            ]
        self.body = nn.Sequential(*layers)
        self.skip = Conv3d(in_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class LevelFusion(nn.Conv3d):
    """Deep supervision's fusion: decoder levels [(N, w_l, D_l, H_l, W_l)] -> logits (N, labels, D, H, W),
    the 1x1x1 convolution of the levels upsampled to full size and concatenated, whole channels dropped
    before it (rate `dropout`, per sample, in training; the kept ones scaled by 1 / (1 - dropout)).
    Computed as the sum over levels of each level's own convolution, upsampled: the same function (both
    maps are linear, the trilinear weights sum to 1, the dropout folded into the weights), with `labels`
    channels upsampled instead of the levels' widths and no full-size concatenation; the sum in float32.
    Its parameters are the convolution's (checkpoints unchanged)."""

    def __init__(self, in_channels: int, labels: int, dropout: float) -> None:
        super().__init__(in_channels, labels, 1)
        self.dropout = dropout

    def forward(self, levels: list[torch.Tensor], size) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return self._fused(levels, self.weight, size)
        keep = torch.rand(levels[0].shape[0], self.in_channels, device=self.weight.device) >= self.dropout
        weights = self.weight[None] * (keep.to(self.weight.dtype) / (1 - self.dropout))[:, None, :, None, None, None]
        if levels[0].shape[0] == 1:  # one sample: no slices (whose backward writes each level's gradient anew)
            return self._fused(levels, weights[0], size)
        samples = zip(*(x.split(1) for x in levels))  # split: its backward is one cat, in the levels' layout
        return torch.cat([self._fused(list(xs), w, size) for xs, w in zip(samples, weights)])

    def _fused(self, levels: list[torch.Tensor], weight: torch.Tensor, size) -> torch.Tensor:
        total, owned = None, False  # owned: total is a sum made here, which add_ may write (never a level's output)
        for x, w in zip(levels, weight.split([x.shape[1] for x in levels], dim=1)):
            y = conv3d(x, w, None, (0, 0, 0))
            y = y if tuple(y.shape[2:]) == tuple(size) else upsample(y, size)
            if total is None:
                total = y.to(torch.promote_types(y.dtype, torch.float32))  # y itself in float32: no copy
            elif owned:
                total.add_(y)
            else:
                total, owned = total + y, True
        bias = self.bias.view(1, -1, 1, 1, 1)
        return (total.add_(bias) if owned else total + bias).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


class ExpLogNet(nn.Module):
    """image (N, in_channels, D, H, W) -> logits (N, num_labels, D, H, W); D, H, W multiples of
    2^(len(blocks) - 1)."""

    def __init__(self, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.config = config
        levels = len(config.blocks)
        widths = [config.width * 2**i for i in range(levels)]
        self.noise = GaussianNoise(config.noise_std)
        self.encoder = nn.ModuleList()
        in_ch = config.in_channels
        for width, k in zip(widths, config.blocks):
            self.encoder.append(ResBlock(in_ch, width, k, config.norm))
            in_ch = width
        # decoder[i] produces level i (width widths[i]) from level i + 1 upsampled + encoder level i
        self.decoder = nn.ModuleList(
            ResBlock(widths[i + 1] + widths[i], widths[i], config.blocks[i], config.norm) for i in range(levels - 1)
        )
        self.fuse = LevelFusion(sum(widths[lv] for lv in config.fuse_levels), config.num_labels, config.dropout)

    @property
    def levels(self) -> int:
        return len(self.config.blocks)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_spatial_shape(image.shape, self.levels)
        x = self.noise(image)
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        outputs = {self.levels - 1: x}  # level -> decoder output (the bottom block for the last)
        for i in reversed(range(self.levels - 1)):
            x = upsample(x, skips[i].shape[2:])
            x = self.decoder[i](torch.cat([x, skips[i]], dim=1))
            outputs[i] = x
        return self.fuse([outputs[lv] for lv in sorted(self.config.fuse_levels)], image.shape[2:])
