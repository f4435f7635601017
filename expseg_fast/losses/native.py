"""The native op expseg_fast::explog_forward/backward (csrc/): loading, fake kernels, and the ops' one
autograd (expseg_fast/op_contract.py).

One forward pass gathers the per-(sample, label) statistics (N, C, 4), stored in float64 (on the CPU
summed from float64 chunk partials in a fixed order; on CUDA from float32 block partials through
float64 atomics, in no fixed order); the backward pass recomputes the softmax and writes
d loss / d logits once. Nothing of size C*V is saved.
"""

from __future__ import annotations

import torch

from expseg_fast.extension import LOAD_ERROR, kernel_device_types
from expseg_fast.op_contract import register_autograd

# Label dtypes the kernels read in place; other integer dtypes are converted to int64 first.
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)

# Device types with a native kernel, fixed at import (so torch.compile traces a constant).
DEVICE_TYPES = kernel_device_types("explog_forward")


def available(device: torch.device) -> bool:
    """Whether the native op has a kernel for this device type."""
    return device.type in DEVICE_TYPES


def unavailable_reason(device: torch.device) -> str:
    if LOAD_ERROR is not None:
        return (
            f"the extension expseg_fast._C is not built ({LOAD_ERROR}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
    return f"expseg_fast._C was built without {device.type.upper()} kernels (rebuild on a machine with nvcc)"


def explog(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, op_args: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, bad): the scalar loss (float32; float64 for float64 logits) and int64 (2,) counts of bad
    labels/logits."""
    loss, _stats, bad = torch.ops.expseg_fast.explog_forward(logits, target, weights, *op_args)
    return loss, bad


if LOAD_ERROR is None:

    @torch.library.register_fake("expseg_fast::explog_forward")
    def _forward_fake(logits, target, weights, w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps):
        n, c = logits.shape[:2]
        return (
            logits.new_empty((), dtype=torch.promote_types(logits.dtype, torch.float32)),
            logits.new_empty((n, c, 4), dtype=torch.float64),
            logits.new_empty((2,), dtype=torch.int64),
        )

    @torch.library.register_fake("expseg_fast::explog_backward")
    def _backward_fake(grad, logits, target, weights, stats, *op_args):
        return torch.empty_like(logits)

    @torch.library.register_fake("expseg_fast::explog_coef_backward")
    def _coef_backward_fake(coefs, logits, target, gamma_cross):
        return torch.empty_like(logits)

    register_autograd("expseg_fast::explog_forward", torch.ops.expseg_fast.explog_backward)
