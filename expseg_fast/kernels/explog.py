"""Fused Triton kernels of the exp-log loss family and their autograd op.

Three kernels, the same math as csrc/explog_math.h (DESIGN.md section 2):
  _stats_kernel     one pass over the logits: per-voxel softmax, per-(sample, label) sums of
                    G (count), M (missed mass 1 - p_l), Q (false-positive mass) and T (t^gamma_cross),
                    block partials added atomically (float64), or written per block and reduced in a
                    fixed order when deterministic.
  _finalize_kernel  one program: the scalar loss and the per-(sample, label) backward coefficients.
  _grad_kernel      one pass that recomputes the softmax and writes d loss / d logits once.
Logits of any strides (contiguous or channels_last_3d, no copies), float32/bfloat16/float16, computed
in float32; integer labels of any dtype. Runs on CUDA, and on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expseg_fast.losses.spec import GRAD_FLOOR

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_LABELS = 256


@triton.jit
def _log1p(x):
    """ln(1 + x) for x >= 0, accurate for small x (Kahan; triton.language has no log1p)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1(x):
    """e^x - 1, accurate for small x (Kahan)."""
    y = tl.exp(x)
    d = y - 1.0
    safe = tl.where((y == 1.0) | (d == -1.0), 2.0, y)
    return tl.where(y == 1.0, x, tl.where(d == -1.0, -1.0, (safe - 1.0) * x / tl.log(safe)))


@triton.jit
def _pow(x, y):
    """x^y for x >= 0 (0 at x = 0; NaN stays NaN)."""
    return tl.where(x == 0.0, 0.0, tl.exp(y * tl.log(tl.where(x == 0.0, 1.0, x))))


@triton.jit
def _voxel_offset(v, H, W, s_d, s_h, s_w, FLAT: tl.constexpr):
    """Offset of voxel v = (d * H + h) * W + w for spatial strides (s_d, s_h, s_w)."""
    v = v.to(tl.int64)
    if FLAT:
        return v * s_w
    return (v // (W * H)) * s_d + ((v // W) % H) * s_h + (v % W) * s_w


@triton.jit
def _tile_softmax(z_ptr, lab_ptr, n, v, C, V, H, W,
                  szn, szc, szd, szh, szw, stn, std, sth, stw,
                  FLAT_Z: tl.constexpr, FLAT_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Softmax of the voxels v (BLOCK_V,) of sample n relative to their labels.

    Returns c (BLOCK_C,), in_v, valid (label in [0, C)), nonfinite, is_lab and is_arg
    (BLOCK_C, BLOCK_V), e = exp(z - max) (BLOCK_C, BLOCK_V), inv_S = 1 / sum e, R = sum_{j != l} e
    and t = -ln p_l.
    """
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    in_v = v < V
    lab = tl.load(lab_ptr + n * stn + _voxel_offset(v, H, W, std, sth, stw, FLAT_T), mask=in_v, other=-1)
    lab = lab.to(tl.int32)
    valid = in_v & (lab >= 0) & (lab < C)
    lab = tl.where(valid, lab, 0)
    offs = n * szn + c[:, None].to(tl.int64) * szc + _voxel_offset(v, H, W, szd, szh, szw, FLAT_Z)[None, :]
    mask = in_c[:, None] & in_v[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nonfinite = tl.max(tl.where(mask & ((z - z) != 0.0), 1, 0), axis=0) > 0
    z = tl.where(in_c[:, None], z, float("-inf"))
    m = tl.max(z, axis=0)
    arg = tl.argmax(z, axis=0)
    is_lab = c[:, None] == lab[None, :]
    is_arg = c[:, None] == arg[None, :]
    e = tl.exp(z - m[None, :])
    s1 = tl.sum(tl.where(is_arg, 0.0, e), axis=0)  # sum without the arg-max term exp(0) = 1
    r = tl.sum(tl.where(is_lab, 0.0, e), axis=0)
    z_lab = tl.sum(tl.where(is_lab, z, 0.0), axis=0)
    t = (m - z_lab) + _log1p(s1)
    return c, in_v, valid, nonfinite, is_lab, is_arg, e, 1.0 / (1.0 + s1), r, t


@triton.jit
def _stats_kernel(z_ptr, lab_ptr, part_ptr, bad_ptr, C, V, H, W, n_tiles,
                  szn, szc, szd, szh, szw, stn, std, sth, stw, gamma_cross,
                  NEED_CROSS: tl.constexpr, DETERMINISTIC: tl.constexpr,
                  FLAT_Z: tl.constexpr, FLAT_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """Persistent over tiles: program (pid, n) sums tiles pid, pid + P, ... of sample n in registers,
    then adds its sums atomically, or stores them in its own slot when deterministic."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    g_acc = tl.zeros((BLOCK_C,), tl.float32)
    m_acc = tl.zeros((BLOCK_C,), tl.float32)
    q_acc = tl.zeros((BLOCK_C,), tl.float32)
    t_acc = tl.zeros((BLOCK_C,), tl.float32)
    bad_label = tl.zeros((BLOCK_V,), tl.int32)
    bad_logit = tl.zeros((BLOCK_V,), tl.int32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        c, in_v, valid, nonfinite, is_lab, is_arg, e, inv_s, r, t = _tile_softmax(
            z_ptr, lab_ptr, n, v, C, V, H, W, szn, szc, szd, szh, szw, stn, std, sth, stw, FLAT_Z, FLAT_T, BLOCK_C)
        vf = valid.to(tl.float32)
        # A voxel with a non-finite logit poisons M and T (the loss is then NaN).
        miss = tl.where(nonfinite & valid, float("nan"), r * inv_s * vf)
        g_acc += tl.sum(tl.where(is_lab, vf[None, :], 0.0), axis=1)
        m_acc += tl.sum(tl.where(is_lab, miss[None, :], 0.0), axis=1)
        q_acc += tl.sum(tl.where(is_lab, 0.0, e * (inv_s * vf)[None, :]), axis=1)
        if NEED_CROSS:
            t_val = tl.where(nonfinite & valid, float("nan"), _pow(t, gamma_cross) * vf)
            t_acc += tl.sum(tl.where(is_lab, t_val[None, :], 0.0), axis=1)
        bad_label += (in_v & ~valid).to(tl.int32)
        bad_logit += (in_v & nonfinite).to(tl.int32)
    if DETERMINISTIC:
        base = part_ptr + ((n * tl.num_programs(0) + pid) * C + c) * 4
        tl.store(base + 0, g_acc.to(tl.float64), mask=in_c)
        tl.store(base + 1, m_acc.to(tl.float64), mask=in_c)
        tl.store(base + 2, q_acc.to(tl.float64), mask=in_c)
        tl.store(base + 3, t_acc.to(tl.float64), mask=in_c)
    else:
        base = part_ptr + (n * C + c) * 4
        tl.atomic_add(base + 0, g_acc.to(tl.float64), mask=in_c)
        tl.atomic_add(base + 1, m_acc.to(tl.float64), mask=in_c)
        tl.atomic_add(base + 2, q_acc.to(tl.float64), mask=in_c)
        if NEED_CROSS:
            tl.atomic_add(base + 3, t_acc.to(tl.float64), mask=in_c)
    tl.atomic_add(bad_ptr + 0, tl.sum(bad_label, axis=0))
    tl.atomic_add(bad_ptr + 1, tl.sum(bad_logit, axis=0))


@triton.jit
def _finalize_kernel(part_ptr, w_ptr, coef_ptr, loss_ptr, N, C, P, V,
                     w_dice, w_cross, gamma_dice, gamma_cross, eps, grad_floor,
                     LINEAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Reduces the P partials of each sample in order; writes the loss and coef (N, 3, C) =
    (a, b, kappa) with dL/dp_i = a_i - b_i [l == i] and the cross part's scale kappa_i."""
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    w = tl.load(w_ptr + c, mask=in_c, other=0.0).to(tl.float64)
    nc = (N * C).to(tl.float64)
    nv = (N * V).to(tl.float64)
    total = tl.zeros((BLOCK_C,), tl.float64)
    for n in range(N):
        g = tl.zeros((BLOCK_C,), tl.float64)
        m = tl.zeros((BLOCK_C,), tl.float64)
        q = tl.zeros((BLOCK_C,), tl.float64)
        tt = tl.zeros((BLOCK_C,), tl.float64)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = ((n * P + p[:, None]) * C + c[None, :]) * 4
            mask = (p[:, None] < P) & in_c[None, :]
            g += tl.sum(tl.load(part_ptr + offs + 0, mask=mask, other=0.0), axis=0)
            m += tl.sum(tl.load(part_ptr + offs + 1, mask=mask, other=0.0), axis=0)
            q += tl.sum(tl.load(part_ptr + offs + 2, mask=mask, other=0.0), axis=0)
            tt += tl.sum(tl.load(part_ptr + offs + 3, mask=mask, other=0.0), axis=0)
        a_ = 2.0 * (g - m) + eps  # 2 I + eps
        b_ = 2.0 * g - m + q + eps  # G + P + eps
        u = _log1p((m + q) / a_)  # -ln Dice
        if LINEAR:
            phi = -_expm1(-u)
            dphi = tl.exp(-u)
        else:
            phi = _pow(u, gamma_dice)
            dphi = gamma_dice * tl.exp((gamma_dice - 1.0) * tl.log(tl.maximum(u, grad_floor)))
        total += tl.where(in_c, w_dice * phi / nc + w_cross * w * tt / nv, 0.0)
        base = coef_ptr + n * 3 * C + c
        tl.store(base, (w_dice * dphi / (b_ * nc)).to(tl.float32), mask=in_c)
        tl.store(base + C, (2.0 * w_dice * dphi / (a_ * nc)).to(tl.float32), mask=in_c)
        tl.store(base + 2 * C, (w_cross * w * gamma_cross / nv).to(tl.float32), mask=in_c)
    tl.store(loss_ptr, tl.sum(total, axis=0).to(tl.float32))


@triton.jit
def _grad_kernel(z_ptr, lab_ptr, g_ptr, coef_ptr, gout_ptr, C, V, H, W,
                 szn, szc, szd, szh, szw, stn, std, sth, stw, sgn, sgc, sgd, sgh, sgw, gamma_cross,
                 FLAT_Z: tl.constexpr, FLAT_T: tl.constexpr, FLAT_G: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    c, in_v, valid, nonfinite, is_lab, is_arg, e, inv_s, r, t = _tile_softmax(
        z_ptr, lab_ptr, n, v, C, V, H, W, szn, szc, szd, szh, szw, stn, std, sth, stw, FLAT_Z, FLAT_T, BLOCK_C)
    in_c = c < C
    scale = tl.load(gout_ptr).to(tl.float32)
    a = tl.load(coef_ptr + n * 3 * C + c, mask=in_c, other=0.0) * scale
    b = tl.load(coef_ptr + n * 3 * C + C + c, mask=in_c, other=0.0) * scale
    kappa = tl.load(coef_ptr + n * 3 * C + 2 * C + c, mask=in_c, other=0.0) * scale
    p = e * inv_s[None, :]
    # Dice part through the softmax, pivoted on the arg max k*: dz_j = p_j ((g_j - g_k*) -
    # sum_{k != k*} p_k (g_k - g_k*)), g_k = a_k - b_k [k == l]: no cancellation for confident voxels.
    gk = a[:, None] - tl.where(is_lab, b[:, None], 0.0)
    g_star = tl.sum(tl.where(is_arg, gk, 0.0), axis=0)
    diff = tl.where(is_arg, 0.0, gk - g_star[None, :])
    gbar = tl.sum(p * diff, axis=0)
    dice = p * (diff - gbar[None, :])
    # Cross part: kappa_l t^gamma (p_j - [j == l]) / t, with (1 - p_l) / t -> 1 and p_j / t -> 0.
    tg = tl.sum(tl.where(is_lab, kappa[:, None], 0.0), axis=0) * _pow(t, gamma_cross)
    t_pos = t > 0.0
    safe_t = tl.where(t_pos, t, 1.0)
    tg_miss = tg * tl.where(t_pos, r * inv_s / safe_t, 1.0)
    tg_pos = tl.where(t_pos, tg, 0.0)
    cross = tl.where(is_lab, -tg_miss[None, :], tg_pos[None, :] * (p / safe_t[None, :]))
    grad = tl.where(valid[None, :], dice + cross, 0.0)
    offs = n * sgn + c[:, None].to(tl.int64) * sgc + _voxel_offset(v, H, W, sgd, sgh, sgw, FLAT_G)[None, :]
    tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=in_c[:, None] & in_v[None, :])


def _flat(strides: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether voxel v of a sample sits at v * strides[-1] (strides and shape of D, H, W)."""
    (d, h, w), (sd, sh, sw) = shape, strides
    return (h == 1 or sh == w * sw) and (d == 1 or sd == h * w * sw)


# Launch configuration override (voxels per program, warps); None keeps the measured defaults of
# _launch. The GPU benchmark (bench/gpu_loss.py) sweeps these; bench/NOTES.md has the figures.
TUNING: dict[str, int | None] = {"block_v": None, "num_warps": None}


def _launch(num_labels: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_V, num_warps). Defaults measured on an H100 at C = 20 (bench/NOTES.md):
    contiguous logits 128 voxels x 2 warps, channels-last 64 voxels x 8 warps."""
    block_c = triton.next_power_of_2(num_labels)
    if channels_last:
        block_v, warps = max(16, min(256, 2048 // block_c)), 8
    else:
        block_v, warps = max(16, min(256, 4096 // block_c)), 2
    return block_c, TUNING["block_v"] or block_v, TUNING["num_warps"] or warps


def _programs_per_sample(device: torch.device, n_samples: int) -> int:
    """Programs of the persistent statistics kernel per sample: a few per multiprocessor (each
    program adds its sums once, so fewer programs mean fewer atomics on the same addresses)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, 4 * sms // max(1, n_samples))



def _geometry(logits: torch.Tensor, target: torch.Tensor) -> dict:
    spatial = tuple(logits.shape[2:])
    return dict(
        C=logits.shape[1],
        V=logits.shape[2] * logits.shape[3] * logits.shape[4],
        H=logits.shape[3],
        W=logits.shape[4],
        szn=logits.stride(0), szc=logits.stride(1), szd=logits.stride(2), szh=logits.stride(3), szw=logits.stride(4),
        stn=target.stride(0), std=target.stride(1), sth=target.stride(2), stw=target.stride(3),
        FLAT_Z=_flat(logits.stride()[2:], spatial),
        FLAT_T=_flat(target.stride()[1:], spatial),
    )


@torch.library.custom_op("expseg_fast::triton_explog_forward", mutates_args=())
def explog_forward(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
    w_dice: float, w_cross: float, gamma_dice: float, gamma_cross: float, linear_dice: bool, eps: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () float32, coef (N, 3, C) float32 backward coefficients, bad (2,) int32 counts of
    labels outside [0, C) and of voxels with a non-finite logit)."""
    n_samples, num_labels = logits.shape[:2]
    geo = _geometry(logits, target)
    block_c, block_v, warps = _launch(num_labels, logits.stride(1) == 1)
    n_tiles = triton.cdiv(geo["V"], block_v)
    programs = max(1, min(n_tiles, _programs_per_sample(logits.device, n_samples)))
    slots = programs if deterministic else 1
    alloc = torch.empty if deterministic else torch.zeros
    part = alloc((n_samples, slots, num_labels, 4), dtype=torch.float64, device=logits.device)
    bad = torch.zeros(2, dtype=torch.int32, device=logits.device)
    coef = torch.empty((n_samples, 3, num_labels), dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    if geo["V"] > 0:
        _stats_kernel[(programs, n_samples)](
            logits, target, part, bad, n_tiles=n_tiles, gamma_cross=gamma_cross, NEED_CROSS=w_cross != 0.0,
            DETERMINISTIC=deterministic, BLOCK_C=block_c, BLOCK_V=block_v, num_warps=warps, **geo)
    else:
        part.zero_()
    _finalize_kernel[(1,)](
        part, weights, coef, loss, n_samples, num_labels, slots, geo["V"],
        w_dice, w_cross, gamma_dice, gamma_cross, eps, GRAD_FLOOR,
        LINEAR=linear_dice, BLOCK_C=block_c, BLOCK_P=max(1, min(64, triton.next_power_of_2(slots))))
    return loss, coef, bad


@explog_forward.register_fake
def _(logits, target, weights, w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps, deterministic):
    n_samples, num_labels = logits.shape[:2]
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((n_samples, 3, num_labels), dtype=torch.float32),
        logits.new_empty((2,), dtype=torch.int32),
    )


@torch.library.custom_op("expseg_fast::triton_explog_backward", mutates_args=())
def explog_backward(
    grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, gamma_cross: float
) -> torch.Tensor:
    """d loss / d logits (logits' dtype and memory format) scaled by grad (a 0-d tensor)."""
    out = torch.empty_like(logits)
    geo = _geometry(logits, target)
    block_c, block_v, warps = _launch(logits.shape[1], logits.stride(1) == 1)
    if out.numel():
        spatial = tuple(logits.shape[2:])
        _grad_kernel[(triton.cdiv(geo["V"], block_v), logits.shape[0])](
            logits, target, out, coef, grad.float().contiguous(),
            sgn=out.stride(0), sgc=out.stride(1), sgd=out.stride(2), sgh=out.stride(3), sgw=out.stride(4),
            gamma_cross=gamma_cross, FLAT_G=_flat(out.stride()[2:], spatial),
            BLOCK_C=block_c, BLOCK_V=block_v, num_warps=warps, **geo)
    return out


@explog_backward.register_fake
def _(grad, logits, target, coef, gamma_cross):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, target, _weights, _w_dice, _w_cross, _gamma_dice, gamma_cross = inputs[:7]
    _loss, coef, bad = output
    ctx.save_for_backward(logits, target, coef)
    ctx.gamma_cross = gamma_cross
    ctx.mark_non_differentiable(coef, bad)


def _backward(ctx, grad_loss, _grad_coef, _grad_bad):
    logits, target, coef = ctx.saved_tensors
    grad = explog_backward(grad_loss, logits, target, coef, ctx.gamma_cross) if ctx.needs_input_grad[0] else None
    return (grad,) + (None,) * 9


explog_forward.register_autograd(_backward, setup_context=_setup_context)


def explog(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, op_args: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, bad) like expseg_fast.losses.native.explog; deterministic statistics when
    torch.use_deterministic_algorithms(True) is on."""
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits: the triton backend takes float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] > MAX_LABELS:
        raise ValueError(f"logits: the triton backend takes at most {MAX_LABELS} labels, got {logits.shape[1]}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    loss, _coef, bad = explog_forward(logits, target, weights.float(), *op_args, deterministic)
    return loss, bad
