"""The normalisation after each convolution, one choice for both networks.

- `batch`: BatchNorm3d, statistics over the batch and the volume in training, running averages in eval
  (the paper's).
- `instance`: instance norm with a learned scale and shift, statistics over each image's own volume in
  training and in eval alike (nnU-Net's): nothing depends on the other images of a batch or on running
  averages, which images of random contrast (the label-map generator) pull about. The engine's own op
  (expseg_fast/models/instance_norm.py: one pass for the statistics, one for the output, ReLU fused,
  bf16 and channels-last kept) where the native extension is built, else GroupNorm with one channel per
  group (the same function and state-dict keys as before the op).
"""

from __future__ import annotations

from torch import nn

from expseg_fast.models.instance_norm import InstanceNormReLU

NORMS = ("batch", "instance")


def _check(kind: str) -> None:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The `kind` normalisation of (N, channels, D, H, W) features (an activation of its own follows)."""
    _check(kind)
    return nn.BatchNorm3d(channels) if kind == "batch" else InstanceNormReLU(channels, relu=False)


def norm_relu(kind: str, channels: int) -> list[nn.Module]:
    """The `kind` normalisation then ReLU, as two modules (the norm's, then the activation's place: the
    fused op leaves an Identity there, so a Sequential's indices and checkpoint keys stay as they were)."""
    _check(kind)
    if kind == "batch":
        return [nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]
    return [InstanceNormReLU(channels, relu=True), nn.Identity()]
