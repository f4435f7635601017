"""Numerical constants shared by every implementation of the loss (the reference, the native op's
Python side and the Triton kernels); csrc/explog_math.h holds the same values for C++ and CUDA.
DESIGN.md section 3 explains each."""

# Floor on u = -ln Dice_i inside the gradient coefficient gamma * u^(gamma - 1), which is infinite at
# u = 0 for gamma < 1. The loss value is exact. The logit gradient itself stays bounded as u -> 0
# (about gamma * u^gamma), so the floor only has to keep the coefficient finite: held at
# gamma * 1e-30^(gamma - 1) <= gamma * 1e30, every product with the vanishing probabilities stays
# finite in float32, and the gradient differs from the exact one only where u < 1e-30, by at most
# about gamma * 1e-30^gamma. Same value as expseg::kGradFloor in csrc/explog_math.h.
GRAD_FLOOR = 1e-30
