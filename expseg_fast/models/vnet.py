"""V-Net (Milletari et al. 2016) as the baseline: 5x5x5 convolutions with PReLU in residual stages,
2x2x2 stride-2 convolutions down and transposed convolutions up, encoder features concatenated in the
decoder; stages of 1, 2, 3, 3 convolutions down, 3 at the bottom, 3, 3, 2, 1 up, channels 16 to 256
(the original Caffe model). BatchNorm after each convolution, as in the common PyTorch ports, so that
it trains in mixed precision like our network (or instance norm: expseg_fast/models/norms.py).
"""

from __future__ import annotations

import torch
from torch import nn

from expseg_fast.models.norms import norm_layer
from expseg_fast.models.shapes import check_spatial_shape


def _conv5(in_channels: int, channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, channels, 5, padding=2, bias=False), norm_layer(norm, channels), nn.PReLU(channels)
    )


class _Stage(nn.Module):
    """n x conv5 on x, plus x (residual), then PReLU."""

    def __init__(self, in_channels: int, channels: int, n: int, norm: str) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[_conv5(in_channels if i == 0 else channels, channels, norm) for i in range(n)])
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + residual)


class _Down(nn.Module):
    def __init__(self, in_channels: int, n: int, norm: str) -> None:
        super().__init__()
        channels = 2 * in_channels
        self.down = nn.Sequential(
            nn.Conv3d(in_channels, channels, 2, stride=2, bias=False), norm_layer(norm, channels), nn.PReLU(channels)
        )
        self.stage = _Stage(channels, channels, n, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down(x)
        return self.stage(down, down)


class _Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, channels: int, n: int, norm: str) -> None:
        super().__init__()
        half = channels // 2
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_channels, half, 2, stride=2, bias=False), norm_layer(norm, half), nn.PReLU(half)
        )
        self.stage = _Stage(half + skip_channels, channels, n, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        merged = torch.cat([up, skip], dim=1)
        return self.stage(merged, merged)


class VNet(nn.Module):
    """image (N, in_channels, D, H, W) -> logits (N, num_labels, D, H, W); D, H, W multiples of 16."""

    levels = 5

    def __init__(self, in_channels: int = 1, num_labels: int = 20, width: int = 16, norm: str = "batch") -> None:
        super().__init__()
        if in_channels < 1 or num_labels < 2 or width < 1:
            raise ValueError(f"in_channels >= 1, num_labels >= 2, width >= 1 required, got {in_channels}, "
                             f"{num_labels}, {width}")
        self.width = width
        self.input = _conv5(in_channels, width, norm)
        self.down = nn.ModuleList(_Down(width * 2**i, n, norm) for i, n in enumerate((2, 3, 3, 3)))
        # up i takes the previous stage's output (256 channels for the first two at width 16), halves
        # it, concatenates the encoder's width * 2^(3 - i) channels: width * 2^(4 - i) channels, n convs
        self.up = nn.ModuleList(
            _Up(width * 2 ** min(4, 5 - i), width * 2 ** (3 - i), width * 2 ** (4 - i), n, norm)
            for i, n in enumerate((3, 3, 2, 1))
        )
        self.output = nn.Conv3d(width * 2, num_labels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_spatial_shape(image.shape, self.levels)
        # The input stage's residual: the image broadcast over the channels (its channel mean when
        # there are several), which keeps the convolution output's memory format.
        residual = image if image.shape[1] == 1 else image.mean(dim=1, keepdim=True)
        x = self.input(image) + residual
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return self.output(x)
