"""The fused op's per-(sample, label) statistics as a differentiable tensor, for losses built from them in
plain PyTorch (MONAI's include_background and reductions: expseg_fast/integrations/monai.py).

statistics (N, C, 4) float64, columns (explog_math.h):
    G = #voxels labelled i,  M = sum_{l = i} (1 - p_i),  Q = sum_{l != i} p_i,  T = sum_{l = i} (-ln p_l)^gamma_cross
Voxels labelled outside [0, C) count nowhere. The "native" backend gathers them in the op's one forward
pass and sends their gradient back through the op's voxel pass (explog_coef_backward: dL/dp_i(x) =
dL/dQ_i - (dL/dQ_i + dL/dM_i) [l(x) = i], the cross part gamma_cross * dL/dT_i), so nothing of size C*V is
kept; "reference" computes them with autograd (the readable specification, float64 for float64 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expseg_fast.losses import native
from expseg_fast.losses.reference import _PowFlooredGrad, _SoftplusPow
from expseg_fast.losses.spec import LossSpec

STAT_G, STAT_M, STAT_Q, STAT_T = range(4)


class _NativeStatistics(torch.autograd.Function):
    """(logits (N, C, D, H, W), integer target (N, D, H, W)) -> statistics (N, C, 4) float64 and the
    int64 (2,) counts of bad labels and non-finite logits, through the native op."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, gamma_cross: float):
        ones = torch.ones(logits.shape[1], device=logits.device, dtype=torch.float32)
        _loss, stats, bad = torch.ops.expseg_fast.explog_forward(logits, target, ones, 1.0, 1.0, 1.0, gamma_cross,
                                                                  False, 1.0)
        ctx.save_for_backward(logits, target)
        ctx.gamma_cross = gamma_cross
        ctx.mark_non_differentiable(bad)
        return stats, bad

    @staticmethod
    def backward(ctx, grad_stats: torch.Tensor, _grad_bad):
        logits, target = ctx.saved_tensors
        g = grad_stats.to(torch.float64)
        coefs = torch.stack([g[..., STAT_Q], g[..., STAT_Q] + g[..., STAT_M], ctx.gamma_cross * g[..., STAT_T]])
        grad = torch.ops.expseg_fast.explog_coef_backward(coefs.contiguous(), logits, target, ctx.gamma_cross)
        return grad, None, None


def reference_statistics(logits: torch.Tensor, target: torch.Tensor, gamma_cross: float) -> torch.Tensor:
    """The statistics by autograd in plain PyTorch, (N, C, 4) in float64 (float32 math, float64 for
    float64 logits); the saturating quantities computed directly, as in reference.py."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_labels = z.shape[1]
    valid = (target >= 0) & (target < num_labels)
    label = target.long().where(valid, 0)
    is_label = F.one_hot(label, num_labels).movedim(-1, 1).bool() & valid.unsqueeze(1)  # (N, C, D, H, W)
    lse_all = torch.logsumexp(z, dim=1)
    lse_other = torch.logsumexp(z.masked_fill(is_label, float("-inf")), dim=1)  # over j != l
    z_label = z.gather(1, label.unsqueeze(1)).squeeze(1)
    miss = torch.exp(lse_other - lse_all)  # 1 - p_l
    p = torch.softmax(z, dim=1)
    t_gamma = _SoftplusPow.apply(lse_other - z_label, gamma_cross)  # (-ln p_l)^gamma
    dims = (2, 3, 4)
    stats = [
        is_label.to(z.dtype).sum(dims),
        (is_label * miss.unsqueeze(1)).sum(dims),
        p.masked_fill(is_label | ~valid.unsqueeze(1), 0.0).sum(dims),
        (is_label * t_gamma.unsqueeze(1)).sum(dims),
    ]
    return torch.stack(stats, dim=-1).to(torch.float64)


def label_statistics(logits: torch.Tensor, target: torch.Tensor, gamma_cross: float,
                     backend: str = "native") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(statistics (N, C, 4) float64, differentiable in M, Q and T; int64 (2,) bad label / bad logit counts,
    or None for the reference, which leaves the checks to its caller). backend: "native" or "reference"."""
    if backend == "native":
        if target.dtype not in native.LABEL_DTYPES:
            target = target.long()
        return _NativeStatistics.apply(logits, target, float(gamma_cross))
    if backend == "reference":
        return reference_statistics(logits, target, gamma_cross), None
    raise ValueError(f"backend must be 'native' or 'reference' for the label statistics, got {backend!r}")


def dice_terms(stats: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N, C) float64: each (sample, label)'s Dice term, 1 - Dice_i (linear) or (-ln Dice_i)^gamma_dice,
    Dice_i = (2 I_i + eps) / (G_i + P_i + eps); its gradient exact for saturated predictions (u floored
    only in gamma * u^(gamma - 1), as the op)."""
    G, M, Q = stats[..., STAT_G], stats[..., STAT_M], stats[..., STAT_Q]
    u = torch.log1p((M + Q) / (2.0 * (G - M) + spec.eps))  # -ln Dice_i
    return -torch.expm1(-u) if spec.linear_dice else _PowFlooredGrad.apply(u, spec.gamma_dice)


def cross_sum(stats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """() float64: sum over voxels of w_l (-ln p_l)^gamma_cross = sum over (sample, label) of w_i T_i."""
    return (stats[..., STAT_T] * weights.to(stats.device, torch.float64)).sum()
