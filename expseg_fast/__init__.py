"""expseg_fast: fast, lean training of 3D segmentation with the exponential logarithmic loss."""

from expseg_fast.losses import (
    CrossLoss,
    ExpLogLoss,
    LinearDiceLoss,
    LogDiceLoss,
    available_backends,
    cross_loss,
    exp_log_loss,
    label_weights,
    linear_dice_loss,
    log_dice_loss,
)

__all__ = [
    "CrossLoss",
    "ExpLogLoss",
    "LinearDiceLoss",
    "LogDiceLoss",
    "available_backends",
    "cross_loss",
    "exp_log_loss",
    "label_weights",
    "linear_dice_loss",
    "log_dice_loss",
]
