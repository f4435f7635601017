"""The one contract of the exp-log loss ops (the native op of csrc/ and the Triton op of kernels/explog.py)
and their one autograd.

forward(logits (N, C, D, H, W), target (N, D, H, W), weights (C,) float32, *op_args) ->
    (loss () float32 (float64 for float64 logits), statistics (N, C, 4) float64, bad (2,) int64: labels
    outside [0, C) and voxels with a non-finite logit)
backward(grad (), logits, target, weights, statistics, *op_args) -> d loss / d logits (logits' dtype and
    memory format), the backward coefficients recomputed from the statistics.
What autograd keeps between the two is the same for both: logits, target, weights and the statistics
(N * C * 4 values; nothing of size C * V), and the op's scalar arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_autograd(forward: str | object, backward: Callable[..., torch.Tensor]) -> None:
    """Registers the contract's autograd on forward (an op name or a torch.library custom op), whose
    gradient is backward (an op of the contract's backward signature)."""

    def setup_context(ctx, inputs, output) -> None:
        logits, target, weights, *op_args = inputs
        _loss, stats, bad = output
        ctx.save_for_backward(logits, target, weights, stats)
        ctx.op_args = op_args
        ctx.mark_non_differentiable(stats, bad)

    def gradient(ctx, grad_loss, _grad_stats, _grad_bad):
        logits, target, weights, stats = ctx.saved_tensors
        grad = backward(grad_loss, logits, target, weights, stats, *ctx.op_args) if ctx.needs_input_grad[0] else None
        return (grad, None, None) + (None,) * len(ctx.op_args)

    torch.library.register_autograd(forward, gradient, setup_context=setup_context)
