"""The loss family as one set of parameters (DESIGN.md section 2, paper eqs. 1-3), with a named
constructor for each loss of the paper's Table 1."""

from __future__ import annotations

from dataclasses import dataclass


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

    @classmethod
    def exp_log(cls, w_dice: float = 0.8, w_cross: float = 0.2, gamma_dice: float = 0.3, gamma_cross: float = 0.3,
                eps: float = 1.0) -> "LossSpec":
        """L_Exp = w_dice * L_Dice(gamma_dice) + w_cross * L_Cross(gamma_cross); the paper's best by default."""
        return cls(w_dice, w_cross, gamma_dice, gamma_cross, False, eps)

    @classmethod
    def linear(cls, eps: float = 1.0) -> "LossSpec":
        """The linear Dice loss: mean over (sample, label) of 1 - Dice_i."""
        return cls(1.0, 0.0, 1.0, 1.0, True, eps)

    @classmethod
    def log_dice(cls, gamma: float = 1.0, eps: float = 1.0) -> "LossSpec":
        """L_Dice(gamma) = mean over (sample, label) of (-ln Dice_i)^gamma."""
        return cls(1.0, 0.0, gamma, 1.0, False, eps)

    @classmethod
    def cross(cls, gamma: float = 1.0) -> "LossSpec":
        """L_Cross(gamma) = mean over voxels of w_l * (-ln p_l)^gamma (no Dice term, so no eps)."""
        return cls(0.0, 1.0, 1.0, gamma, False, 1.0)

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
