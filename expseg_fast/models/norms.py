"""The normalisation after each convolution, one choice for both networks.

- `batch`: BatchNorm3d, statistics over the batch and the volume in training, running averages in eval
  (the paper's).
- `instance`: instance norm with a learned scale and shift, statistics over each image's own volume in
  training and in eval alike (nnU-Net's): nothing depends on the other images of a batch or on running
  averages, which images of random contrast (the label-map generator) pull about. Computed as GroupNorm
  with one channel per group (the same function), which keeps channels-last 3D features channels-last
  (InstanceNorm3d returns them contiguous); a bf16 training step costs a third more than BatchNorm's on
  the 2-core CPU (bench/NOTES.md).
"""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "instance")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The `kind` normalisation of (N, channels, D, H, W) features."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")
