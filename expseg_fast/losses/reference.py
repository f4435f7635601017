"""Plain-PyTorch reference of the loss family: the readable specification (autograd does the rest).

Computes in float32 (float64 for float64 logits) and returns the loss in that dtype. It is written
so that autograd stays accurate for saturated logits: every quantity that vanishes for a confident
prediction is computed directly rather than as a difference of numbers close to 1,
    1 - p_l = exp(logsumexp_{j != l} z_j - logsumexp_j z_j)
    t = -ln p_l = softplus(logsumexp_{j != l} z_j - z_l), differentiated as a ratio (no floor)
    -ln Dice_i = log1p((M_i + Q_i) / (2 I_i + eps)), M_i = sum_{l = i} (1 - p_i), Q_i = sum_{l != i} p_i,
with I_i = G_i - M_i. Memory-hungry by design: it materialises several tensors of size N*C*V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expseg_fast.losses.spec import LossSpec
from expseg_fast.numerics import GRAD_FLOOR


class _PowFlooredGrad(torch.autograd.Function):
    """x ** gamma (x >= 0) with derivative gamma * max(x, GRAD_FLOOR) ** (gamma - 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.gamma = gamma
        return x.pow(gamma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ctx.gamma * x.clamp_min(GRAD_FLOOR).pow(ctx.gamma - 1.0), None


class _SoftplusPow(torch.autograd.Function):
    """softplus(x) ** gamma with derivative gamma * t^gamma * (sigmoid(x) / t), t = softplus(x).

    sigmoid(x) / t -> 1 as x -> -inf, so the derivative stays exact and finite where t^(gamma - 1)
    alone would overflow (t = -ln p_l of a confident voxel).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: float) -> torch.Tensor:
        t = F.softplus(x)
        ctx.save_for_backward(x, t)
        ctx.gamma = gamma
        return t.pow(gamma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, t = ctx.saved_tensors
        ratio = torch.where(t > 0, torch.sigmoid(x) / t, torch.ones_like(t))
        return grad * ctx.gamma * t.pow(ctx.gamma) * ratio, None


def reference_loss(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    """Loss of logits (N, C, D, H, W) against integer target (N, D, H, W) with label weights (C,). Voxels
    labelled outside [0, C) (ignored) contribute nothing; the cross term's mean stays over every voxel."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_labels = z.shape[1]
    valid = (target >= 0) & (target < num_labels)  # (N, D, H, W)
    target = target.long().where(valid, 0)
    label = target.unsqueeze(1)  # (N, 1, D, H, W)
    is_label = F.one_hot(target, num_labels).movedim(-1, 1).bool() & valid.unsqueeze(1)  # delta_il(x)
    lse_all = torch.logsumexp(z, dim=1)  # (N, D, H, W)
    lse_other = torch.logsumexp(z.masked_fill(is_label, float("-inf")), dim=1)  # over j != l
    z_label = z.gather(1, label).squeeze(1)
    dims = (2, 3, 4)
    loss = z.new_zeros(())
    if spec.w_dice:
        p = torch.softmax(z, dim=1)
        miss = torch.exp(lse_other - lse_all)  # 1 - p_l(x)
        present = is_label.to(z.dtype).sum(dims)  # G_i, (N, C)
        missed = (is_label * miss.unsqueeze(1)).sum(dims)  # M_i
        false_pos = (p.masked_fill(is_label | ~valid.unsqueeze(1), 0.0)).sum(dims)  # Q_i
        two_i_eps = 2.0 * (present - missed) + spec.eps  # 2 I_i + eps
        u = torch.log1p((missed + false_pos) / two_i_eps)  # -ln Dice_i
        per_label = -torch.expm1(-u) if spec.linear_dice else _PowFlooredGrad.apply(u, spec.gamma_dice)
        loss = loss + spec.w_dice * per_label.mean()
    if spec.w_cross:
        t_gamma = _SoftplusPow.apply(lse_other - z_label, spec.gamma_cross)  # (-ln p_l(x))^gamma
        w = weights.to(z.dtype)[target] * valid
        loss = loss + spec.w_cross * (w * t_gamma).mean()
    return loss
