"""The paper's network (ExpLogNet) and the V-Net baseline, same input/output convention:
image (N, in_channels, D, H, W) -> logits (N, num_labels, D, H, W)."""

from torch import nn

from expseg_fast.models.explog_net import ExpLogNet, NetConfig
from expseg_fast.models.shapes import check_spatial_shape
from expseg_fast.models.vnet import VNet

__all__ = ["ExpLogNet", "NetConfig", "VNet", "check_spatial_shape", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
