"""The exponential logarithmic loss family (paper Table 1) behind one API with several backends."""

from expseg_fast.losses.api import (
    CrossLoss,
    ExpLogLoss,
    LinearDiceLoss,
    LogDiceLoss,
    available_backends,
    cross_loss,
    exp_log_loss,
    linear_dice_loss,
    log_dice_loss,
    loss,
    statistics,
)
from expseg_fast.losses.spec import LossSpec
from expseg_fast.losses.weights import label_counts, label_weights
from expseg_fast.numerics import GRAD_FLOOR

__all__ = [
    "GRAD_FLOOR",
    "CrossLoss",
    "ExpLogLoss",
    "LinearDiceLoss",
    "LogDiceLoss",
    "LossSpec",
    "available_backends",
    "cross_loss",
    "exp_log_loss",
    "label_counts",
    "label_weights",
    "linear_dice_loss",
    "log_dice_loss",
    "loss",
    "statistics",
]
