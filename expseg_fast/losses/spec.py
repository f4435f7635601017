"""The loss family as one set of parameters (DESIGN.md section 2, paper eqs. 1-3)."""

from __future__ import annotations

from dataclasses import dataclass

# Floor on u = -ln Dice_i inside the gradient coefficient
# gamma * u^(gamma - 1), which is infinite at u = 0 for gamma < 1. The loss value is exact. The
# logit gradient itself stays bounded as u -> 0 (about gamma * u^gamma), so the floor only has to
# keep the coefficient finite: held at gamma * 1e-30^(gamma - 1) <= gamma * 1e30, every product with
# the vanishing probabilities stays finite in float32, and the gradient differs from the exact one
# only where u < 1e-30, by at most about gamma * 1e-30^gamma. Same value as expseg::kGradFloor in
# csrc/explog_math.h.
GRAD_FLOOR = 1e-30


@dataclass(frozen=True)
class LossSpec:
    """L = w_dice * L_Dice + w_cross * L_Cross.

    L_Dice = mean over (sample, label) of (-ln Dice_i)^gamma_dice, or of (1 - Dice_i) when
    linear_dice; L_Cross = mean over voxels of w_l * (-ln p_l)^gamma_cross.
    """

    w_dice: float = 0.8
    w_cross: float = 0.2
    gamma_dice: float = 0.3
    gamma_cross: float = 0.3
    linear_dice: bool = False
    eps: float = 1.0

    def __post_init__(self) -> None:
        for name in ("w_dice", "w_cross"):
            value = getattr(self, name)
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.w_dice == 0.0 and self.w_cross == 0.0:
            raise ValueError("w_dice and w_cross are both 0: the loss would be identically 0")
        for name in ("gamma_dice", "gamma_cross", "eps"):
            value = getattr(self, name)
            if not 0.0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    def op_args(self) -> tuple[float, float, float, float, bool, float]:
        """Arguments in the order of the native and Triton ops."""
        return (
            float(self.w_dice),
            float(self.w_cross),
            float(self.gamma_dice),
            float(self.gamma_cross),
            bool(self.linear_dice),
            float(self.eps),
        )
