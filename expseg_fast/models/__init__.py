"""The paper's network (ExpLogNet) and the V-Net baseline, same input/output convention:
image (N, in_channels, D, H, W) -> logits (N, num_labels, D, H, W)."""

from torch import nn

from expseg_fast.models.explog_net import ExpLogNet, NetConfig
from expseg_fast.models.norms import NORMS
from expseg_fast.models.shapes import check_spatial_shape
from expseg_fast.models.vnet import VNet

__all__ = ["NORMS", "ExpLogNet", "NetConfig", "VNet", "build_model", "check_spatial_shape", "count_parameters"]


def build_model(name: str, num_labels: int, width: int, fuse_levels: tuple[int, ...] = (0, 1, 2),
                in_channels: int = 1, norm: str = "batch") -> nn.Module:
    """The network `name` ("ours" or "vnet") with num_labels outputs; fuse_levels only for ours; norm: the
    normalisation after each convolution (NORMS)."""
    if name == "vnet":
        return VNet(in_channels=in_channels, num_labels=num_labels, width=width, norm=norm)
    if name == "ours":
        return ExpLogNet(NetConfig(in_channels=in_channels, num_labels=num_labels, width=width,
                                   fuse_levels=tuple(fuse_levels), norm=norm))
    raise ValueError(f"model must be 'ours' or 'vnet', got {name!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
