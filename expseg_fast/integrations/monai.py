"""The loss family with MONAI's conventions, backed by the fused op (MONAI itself is not imported).

input: logits (N, C, *spatial), 1 to 3 spatial dimensions, any float dtype and memory format.
target: with to_onehot_y=True (the default here), labels (N, 1, *spatial) of any integer or integral float
dtype, passed to the op as integers, never expanded to one-hot; with to_onehot_y=False, one-hot (N, C,
*spatial), turned into labels (a voxel with no 1 is ignored; a value other than 0 or 1, or two 1s in a
voxel, is a ValueError when validating). The constructors take the core classes' arguments in their order
(expseg_fast.losses: the label weights first), then MONAI's keywords:
- include_background=False leaves label 0 out of the Dice mean (as MONAI's DiceLoss and DiceCELoss do:
  the softmax still runs over every channel; the cross term keeps every voxel);
- reduction: "mean" (the paper's loss, through the op's fused value), "sum" (each mean undone: the Dice
  terms and the per-voxel cross terms summed), "none" for the Dice losses (the Dice terms (N, C', 1, ...),
  broadcastable against the input, as MONAI returns them). Other than the paper's mean over every label,
  the loss is built in float64 from the op's differentiable per-(sample, label) statistics
  (expseg_fast.losses.statistics), whose gradient the op's voxel pass applies: still nothing of size
  C*V is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from expseg_fast import losses
from expseg_fast.losses import loss, statistics
from expseg_fast.losses.api import _LossModule
from expseg_fast.losses.statistics import cross_sum, dice_terms


def as_volume(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, C, *spatial) with 1-3 spatial dims -> (N, C, D, H, W), trailing singleton dims added (a view)."""
    if not isinstance(x, torch.Tensor) or not 3 <= x.dim() <= 5:
        raise ValueError(f"{name} must be (N, C, *spatial) with 1 to 3 spatial dimensions, got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    return x.reshape(*x.shape, *([1] * (5 - x.dim())))


def labels_of(target: torch.Tensor, num_labels: int, to_onehot_y: bool, validate: bool) -> torch.Tensor:
    """Integer labels (N, D, H, W) from a 5-d target: (N, 1, ...) labels, or (N, C, ...) one-hot (a voxel
    with no 1 becomes -1, ignored)."""
    if to_onehot_y:
        if target.shape[1] != 1:
            raise ValueError(f"target must be (N, 1, *spatial) labels with to_onehot_y=True, got {tuple(target.shape)}"
                             " (one-hot targets: to_onehot_y=False)")
        labels = target[:, 0]
        if labels.is_floating_point():
            if validate and not bool((labels == labels.round()).all()):
                raise ValueError("target: labels must be whole numbers (to_onehot_y=True)")
            labels = labels.long()
        return labels
    if target.shape[1] != num_labels:
        raise ValueError(f"target must be one-hot (N, {num_labels}, *spatial) with to_onehot_y=False, got "
                         f"{tuple(target.shape)}")
    if validate:
        hot = target != 0
        if not bool(((target == 0) | (target == 1)).all()) or int(hot.sum(1).max()) > 1:
            raise ValueError("target: not one-hot (values other than 0 and 1, or more than one 1 in a voxel); "
                             "soft labels are not supported")
    labels = target.argmax(1)
    return labels.masked_fill(target.amax(1) == 0, -1)


class _MonaiLoss(nn.Module):
    """A core loss module (expseg_fast.losses: its arguments, defaults and weights buffer) with MONAI's
    target forms, include_background and reduction."""

    reductions: tuple[str, ...] = ("mean", "sum", "none")

    def __init__(self, core: _LossModule, to_onehot_y: bool, include_background: bool, reduction: str) -> None:
        super().__init__()
        if reduction not in self.reductions:
            raise ValueError(f"reduction must be one of {self.reductions} for {type(self).__name__}, got {reduction!r}")
        if not to_onehot_y and core.ignore_index is not None:
            raise ValueError("ignore_index has no meaning for one-hot targets (to_onehot_y=False): a voxel with no 1 "
                             "is ignored")
        self.core = core
        self.to_onehot_y, self.include_background, self.reduction = to_onehot_y, include_background, reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's name)
        """input (N, C, *spatial) logits, target as to_onehot_y says -> the loss (float32, float64 for float64
        logits): a scalar, or (N, C', 1, ...) for reduction "none"."""
        core = self.core
        logits = as_volume(input, "input")
        if not isinstance(target, torch.Tensor) or target.dim() != input.dim() or target.shape[2:] != input.shape[2:]:
            raise ValueError(f"target must be (N, {'1' if self.to_onehot_y else 'C'}, *spatial) matching input "
                             f"{tuple(input.shape)}, got {tuple(getattr(target, 'shape', ()))}")
        labels = labels_of(as_volume(target, "target"), logits.shape[1], self.to_onehot_y, bool(core.validate))
        ignore = core.ignore_index if self.to_onehot_y else -1
        weights = core.weights if core.weights is None else core.weights.to(logits.device)  # a module left on the CPU
        if self.reduction == "mean" and (self.include_background or not core.spec.w_dice):
            return loss(logits, labels, weights, core.spec, core.backend, core.validate, ignore)
        backend = "auto" if core.backend == "triton" else core.backend  # the Triton kernels give the loss only
        stats = statistics(logits, labels, core.spec.gamma_cross, backend, core.validate, ignore)
        return self._from_statistics(stats, weights, labels[0].numel(), input.dim()).to(
            torch.promote_types(logits.dtype, torch.float32))

    def _from_statistics(self, stats: torch.Tensor, weights: torch.Tensor | None, voxels: int,
                         dims: int) -> torch.Tensor:
        """The loss from the statistics (N, C, 4), label weights (C,) or None, `voxels` per sample, an input of
        `dims` dimensions."""
        spec = self.core.spec
        value = stats.new_zeros(())
        if spec.w_dice:
            terms = dice_terms(stats, spec)[:, 0 if self.include_background else 1:]  # (N, C')
            if self.reduction == "none":
                return terms.reshape(*terms.shape, *([1] * (dims - 2)))
            value = value + spec.w_dice * (terms.sum() if self.reduction == "sum" else terms.mean())
        if spec.w_cross:
            cross = cross_sum(stats, torch.ones(stats.shape[1], device=stats.device) if weights is None else weights)
            value = value + spec.w_cross * (cross if self.reduction == "sum" else cross / (stats.shape[0] * voxels))
        return value

    def extra_repr(self) -> str:
        return (f"to_onehot_y={self.to_onehot_y}, include_background={self.include_background}, "
                f"reduction={self.reduction!r}")


class ExpLogLoss(_MonaiLoss):
    """L_Exp with MONAI's conventions: expseg_fast.losses.ExpLogLoss's arguments (weights, w_dice, w_cross,
    gamma_dice, gamma_cross, eps, backend, validate, ignore_index), then MONAI's keywords."""

    reductions = ("mean", "sum")

    def __init__(self, *args, to_onehot_y: bool = True, include_background: bool = True, reduction: str = "mean",
                 **kwargs) -> None:
        super().__init__(losses.ExpLogLoss(*args, **kwargs), to_onehot_y, include_background, reduction)


class LinearDiceLoss(_MonaiLoss):
    """1 - Dice with MONAI's conventions (MONAI's DiceLoss(softmax=True) with smooth_nr = smooth_dr = eps):
    expseg_fast.losses.LinearDiceLoss's arguments (eps, backend, validate, ignore_index), then MONAI's."""

    def __init__(self, *args, to_onehot_y: bool = True, include_background: bool = True, reduction: str = "mean",
                 **kwargs) -> None:
        super().__init__(losses.LinearDiceLoss(*args, **kwargs), to_onehot_y, include_background, reduction)


class LogDiceLoss(_MonaiLoss):
    """(-ln Dice)^gamma with MONAI's conventions: expseg_fast.losses.LogDiceLoss's arguments (gamma, eps,
    backend, validate, ignore_index), then MONAI's keywords."""

    def __init__(self, *args, to_onehot_y: bool = True, include_background: bool = True, reduction: str = "mean",
                 **kwargs) -> None:
        super().__init__(losses.LogDiceLoss(*args, **kwargs), to_onehot_y, include_background, reduction)


class CrossLoss(_MonaiLoss):
    """L_Cross(gamma) with MONAI's conventions: expseg_fast.losses.CrossLoss's arguments (weights, gamma,
    backend, validate, ignore_index), then to_onehot_y and reduction ("mean" over voxels, or "sum"); it has
    no background to leave out."""

    reductions = ("mean", "sum")

    def __init__(self, *args, to_onehot_y: bool = True, reduction: str = "mean", **kwargs) -> None:
        super().__init__(losses.CrossLoss(*args, **kwargs), to_onehot_y, True, reduction)
