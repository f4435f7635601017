"""The loss family as one set of parameters (DESIGN.md section 2, paper eqs. 1-3), with a named
constructor for each loss of the paper's Table 1."""

from __future__ import annotations

from dataclasses import dataclass

# The paper's best loss (its Table 1): L_Exp with these weights and exponents, Dice smoothing eps = 1. The
# one home of these defaults: LossSpec, the loss functions and modules (losses/api.py) and the trainer's
# options (config.py) take them from here.
PAPER_W_DICE, PAPER_W_CROSS, PAPER_GAMMA, PAPER_EPS = 0.8, 0.2, 0.3, 1.0


@dataclass(frozen=True)
class LossSpec:
    """L = w_dice * L_Dice + w_cross * L_Cross.

    L_Dice = mean over (sample, label) of (-ln Dice_i)^gamma_dice, or of (1 - Dice_i) when
    linear_dice; L_Cross = mean over voxels of w_l * (-ln p_l)^gamma_cross.
    """

    w_dice: float = PAPER_W_DICE
    w_cross: float = PAPER_W_CROSS
    gamma_dice: float = PAPER_GAMMA
    gamma_cross: float = PAPER_GAMMA
    linear_dice: bool = False
    eps: float = PAPER_EPS

    def __post_init__(self) -> None:
        problems = self.problems(self.w_dice, self.w_cross, self.gamma_dice, self.gamma_cross, self.eps)
        if problems:
            raise ValueError("; ".join(problems))

    @staticmethod
    def problems(w_dice: float, w_cross: float, gamma_dice: float, gamma_cross: float, eps: float) -> list[str]:
        """One line per parameter out of its range (the one home of these ranges: TrainConfig.check asks
        too, so that the command line reports them with its other problems)."""
        found = [f"{name} must be a finite number >= 0, got {value}"
                 for name, value in (("w_dice", w_dice), ("w_cross", w_cross))
                 if not value >= 0.0 or value == float("inf")]
        if w_dice == 0.0 and w_cross == 0.0:
            found.append("w_dice and w_cross are both 0: the loss would be identically 0")
        found += [f"{name} must be a finite number > 0, got {value}"
                  for name, value in (("gamma_dice", gamma_dice), ("gamma_cross", gamma_cross), ("eps", eps))
                  if not 0.0 < value < float("inf")]
        return found

    @classmethod
    def exp_log(cls, w_dice: float = PAPER_W_DICE, w_cross: float = PAPER_W_CROSS, gamma_dice: float = PAPER_GAMMA,
                gamma_cross: float = PAPER_GAMMA, eps: float = PAPER_EPS) -> "LossSpec":
        """L_Exp = w_dice * L_Dice(gamma_dice) + w_cross * L_Cross(gamma_cross); the paper's best by default."""
        return cls(w_dice, w_cross, gamma_dice, gamma_cross, False, eps)

    @classmethod
    def linear(cls, eps: float = PAPER_EPS) -> "LossSpec":
        """The linear Dice loss: mean over (sample, label) of 1 - Dice_i."""
        return cls(1.0, 0.0, 1.0, 1.0, True, eps)

    @classmethod
    def log_dice(cls, gamma: float = 1.0, eps: float = PAPER_EPS) -> "LossSpec":
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
