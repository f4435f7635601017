"""Fused Triton kernels of the exp-log loss family, as an op of the native op's contract and autograd
(expseg_fast/op_contract.py).

Three kernels, the same math as csrc/explog_math.h (DESIGN.md section 2):
  _stats_kernel     one pass over the logits: per-voxel softmax, per-(sample, label) sums of
                    G (count), M (missed mass 1 - p_l), Q (false-positive mass) and T (t^gamma_cross),
                    block partials added atomically (float64), or written per block and reduced in a
                    fixed order when deterministic.
  _finalize_kernel  one program: the statistics reduced in order and the scalar loss (forward), or the
                    per-(sample, label) backward coefficients from the statistics (backward).
  _grad_kernel      one pass that recomputes the softmax and writes d loss / d logits once.
The statistics and gradient kernels come in two designs, chosen per kernel (TUNING, _launch): "tiles"
work on (labels x voxels) tiles; "rows" (_stats_rows_kernel, _grad_rows_kernel) go one label row at a
time, unrolled over the constexpr label count, so a voxel's labels stay in one thread.
Logits of any strides (contiguous or channels_last_3d, no copies), float32/bfloat16/float16, computed
in float32; integer labels of any dtype. Runs on CUDA, and on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from expseg_fast.numerics import GRAD_FLOOR
from expseg_fast.op_contract import register_autograd

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
def _sample_offsets(n, v, C: tl.constexpr, H, W, sn, sd, sh, sw, FLAT: tl.constexpr, PACKED: tl.constexpr):
    """Offsets (BLOCK_V,) int64 of label 0 at voxels v of sample n (label c is c label strides further).
    PACKED: channels-last with the C labels of a voxel adjacent (label stride 1, voxel stride C), where
    the constexpr C lets the compiler prove alignment and load a voxel's labels in vectors. In int64:
    n * sn alone passes 2^31 for N * C * V >= 2^31 (8 samples x 20 labels x 256^3)."""
    n = n.to(tl.int64)
    if PACKED:
        offs = n * sn + v.to(tl.int64) * C
    else:
        offs = n * sn + _voxel_offset(v, H, W, sd, sh, sw, FLAT)
    return offs


@triton.jit
def _label_offsets(n, c, v, C: tl.constexpr, H, W, sn, sc, sd, sh, sw, FLAT: tl.constexpr, PACKED: tl.constexpr):
    """Offsets (BLOCK_C, BLOCK_V) of labels c at voxels v of sample n."""
    if PACKED:
        rows = c[:, None]
    else:
        rows = c[:, None].to(tl.int64) * sc
    return rows + _sample_offsets(n, v, C, H, W, sn, sd, sh, sw, FLAT, PACKED)[None, :]


@triton.jit
def _load_labels(lab_ptr, n, v, in_v, C: tl.constexpr, H, W, stn, std, sth, stw, FLAT_T: tl.constexpr):
    """(label clamped to [0, C) for indexing, valid) of voxels v (offsets in int64)."""
    lab = tl.load(lab_ptr + n.to(tl.int64) * stn + _voxel_offset(v, H, W, std, sth, stw, FLAT_T), mask=in_v, other=-1)
    lab = lab.to(tl.int32)
    valid = in_v & (lab >= 0) & (lab < C)
    return tl.where(valid, lab, -1), valid


@triton.jit
def _tile_softmax(z_ptr, lab_ptr, n, v, C: tl.constexpr, V, H, W,
                  szn, szc, szd, szh, szw, stn, std, sth, stw,
                  FLAT_Z: tl.constexpr, PACKED_Z: tl.constexpr, FLAT_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Softmax of the voxels v (BLOCK_V,) of sample n relative to their labels.

    Returns c (BLOCK_C,), in_v, valid (label in [0, C)), nonfinite, is_lab and is_arg
    (BLOCK_C, BLOCK_V), e = exp(z - max) (BLOCK_C, BLOCK_V), inv_S = 1 / sum e, R = sum_{j != l} e
    and t = -ln p_l.
    """
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    in_v = v < V
    lab, valid = _load_labels(lab_ptr, n, v, in_v, C, H, W, stn, std, sth, stw, FLAT_T)
    offs = _label_offsets(n, c, v, C, H, W, szn, szc, szd, szh, szw, FLAT_Z, PACKED_Z)
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
def _store_stats(part_ptr, bad_ptr, g_acc, m_acc, q_acc, t_acc, bad_label, bad_logit, n, pid, c, in_c,
                 C: tl.constexpr, NEED_CROSS: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Adds a program's sums (BLOCK_C,) to part (N, 1, C, 4) atomically, or stores them in its slot of
    part (N, P, C, 4) when deterministic; adds the bad-label and bad-logit counts."""
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
def _stats_kernel(z_ptr, lab_ptr, part_ptr, bad_ptr, C: tl.constexpr, V, H, W, n_tiles,
                  szn, szc, szd, szh, szw, stn, std, sth, stw, gamma_cross,
                  NEED_CROSS: tl.constexpr, DETERMINISTIC: tl.constexpr,
                  FLAT_Z: tl.constexpr, PACKED_Z: tl.constexpr, FLAT_T: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
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
            z_ptr, lab_ptr, n, v, C, V, H, W, szn, szc, szd, szh, szw, stn, std, sth, stw,
            FLAT_Z, PACKED_Z, FLAT_T, BLOCK_C)
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
    _store_stats(part_ptr, bad_ptr, g_acc, m_acc, q_acc, t_acc, bad_label, bad_logit, n, pid, c, in_c, C,
                 NEED_CROSS, DETERMINISTIC)


@triton.jit
def _finalize_kernel(part_ptr, w_ptr, out_ptr, loss_ptr, N, C, P, V,
                     w_dice, w_cross, gamma_dice, gamma_cross, eps, grad_floor,
                     LINEAR: tl.constexpr, COEFS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Reduces the P partials (N, P, C, 4) of each sample in order; writes the loss and either (COEFS) the
    backward coefficients out (N, 3, C) float32 = (a, b, kappa), dL/dp_i = a_i - b_i [l == i] and the cross
    part's scale kappa_i, or the statistics out (N, C, 4) float64 (the backward passes them as P = 1)."""
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
        if COEFS:
            base = out_ptr + n * 3 * C + c
            tl.store(base, (w_dice * dphi / (b_ * nc)).to(tl.float32), mask=in_c)
            tl.store(base + C, (2.0 * w_dice * dphi / (a_ * nc)).to(tl.float32), mask=in_c)
            tl.store(base + 2 * C, (w_cross * w * gamma_cross / nv).to(tl.float32), mask=in_c)
        else:
            base = out_ptr + (n * C + c) * 4
            tl.store(base + 0, g, mask=in_c)
            tl.store(base + 1, m, mask=in_c)
            tl.store(base + 2, q, mask=in_c)
            tl.store(base + 3, tt, mask=in_c)
    tl.store(loss_ptr, tl.sum(total, axis=0).to(tl.float32))


@triton.jit
def _grad_kernel(z_ptr, lab_ptr, g_ptr, coef_ptr, gout_ptr, C: tl.constexpr, V, H, W,
                 szn, szc, szd, szh, szw, stn, std, sth, stw, sgn, sgc, sgd, sgh, sgw, gamma_cross,
                 FLAT_Z: tl.constexpr, PACKED_Z: tl.constexpr, FLAT_T: tl.constexpr,
                 FLAT_G: tl.constexpr, PACKED_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    c, in_v, valid, nonfinite, is_lab, is_arg, e, inv_s, r, t = _tile_softmax(
        z_ptr, lab_ptr, n, v, C, V, H, W, szn, szc, szd, szh, szw, stn, std, sth, stw,
        FLAT_Z, PACKED_Z, FLAT_T, BLOCK_C)
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
    offs = _label_offsets(n, c, v, C, H, W, sgn, sgc, sgd, sgh, sgw, FLAT_G, PACKED_G)
    tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=in_c[:, None] & in_v[None, :])


# --- The row design: one label row (BLOCK_V,) at a time, unrolled over the constexpr C ------------
# Each thread owns whole voxels, so the per-voxel sums over labels never leave the thread (no shuffles),
# and rows of contiguous logits load as wide vectors. Three passes re-read the tile's rows (from the
# cache after the first): 1) max, arg max, the label's logit; 2) exponentials and their sums; 3) the
# per-label statistics (stats kernel) or the gradient (grad kernel).


@triton.jit
def _rows_softmax(zp, szc, lab, in_v, C: tl.constexpr):
    """Passes 1 and 2 over the rows at zp (label stride szc): max m, arg max, the label's logit, a
    non-finite flag, s1 = sum_{j != arg} e_j and r = sum_{j != l} e_j with e_j = exp(z_j - m)."""
    m = tl.full(lab.shape, float("-inf"), tl.float32)
    arg = tl.zeros(lab.shape, tl.int32)
    z_lab = tl.zeros(lab.shape, tl.float32)
    nonfinite = lab != lab
    row = zp
    for c in tl.static_range(C):
        z = tl.load(row, mask=in_v, other=0.0).to(tl.float32)
        nonfinite = nonfinite | ((z - z) != 0.0)
        take = z > m  # the first maximum wins, as argmax
        arg = tl.where(take, c, arg)
        m = tl.where(take, z, m)
        z_lab = tl.where(lab == c, z, z_lab)
        row += szc
    s1 = tl.zeros(lab.shape, tl.float32)
    r = tl.zeros(lab.shape, tl.float32)
    row = zp
    for c in tl.static_range(C):
        e = tl.exp(tl.load(row, mask=in_v, other=0.0).to(tl.float32) - m)
        s1 += tl.where(arg == c, 0.0, e)
        r += tl.where(lab == c, 0.0, e)
        row += szc
    return m, arg, z_lab, nonfinite, s1, r


@triton.jit
def _stats_rows_kernel(z_ptr, lab_ptr, part_ptr, bad_ptr, C: tl.constexpr, V, H, W, n_tiles,
                       szn, szc, szd, szh, szw, stn, std, sth, stw, gamma_cross,
                       NEED_CROSS: tl.constexpr, DETERMINISTIC: tl.constexpr,
                       FLAT_Z: tl.constexpr, PACKED_Z: tl.constexpr, FLAT_T: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """_stats_kernel's sums (same outputs, same persistence), computed row by row."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cidx = tl.arange(0, BLOCK_C)
    in_c = cidx < C
    g_acc = tl.zeros((BLOCK_C,), tl.float32)
    m_acc = tl.zeros((BLOCK_C,), tl.float32)
    q_acc = tl.zeros((BLOCK_C,), tl.float32)
    t_acc = tl.zeros((BLOCK_C,), tl.float32)
    bad_label = tl.zeros((BLOCK_V,), tl.int32)
    bad_logit = tl.zeros((BLOCK_V,), tl.int32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        in_v = v < V
        lab, valid = _load_labels(lab_ptr, n, v, in_v, C, H, W, stn, std, sth, stw, FLAT_T)
        zp = z_ptr + _sample_offsets(n, v, C, H, W, szn, szd, szh, szw, FLAT_Z, PACKED_Z)
        m, arg, z_lab, nonfinite, s1, r = _rows_softmax(zp, szc, lab, in_v, C)
        vf = valid.to(tl.float32)
        pv = vf / (1.0 + s1)
        poisoned = nonfinite & valid  # a non-finite logit makes M and T (and the loss) NaN
        miss = tl.where(poisoned, float("nan"), r * pv)
        t_val = tl.zeros_like(vf)
        if NEED_CROSS:
            t_val = tl.where(poisoned, float("nan"), _pow((m - z_lab) + _log1p(s1), gamma_cross) * vf)
        row = zp
        for c in tl.static_range(C):
            e = tl.exp(tl.load(row, mask=in_v, other=0.0).to(tl.float32) - m)
            is_c = lab == c
            here = cidx == c
            g_acc += tl.where(here, tl.sum(tl.where(is_c, vf, 0.0), axis=0), 0.0)
            m_acc += tl.where(here, tl.sum(tl.where(is_c, miss, 0.0), axis=0), 0.0)
            q_acc += tl.where(here, tl.sum(tl.where(is_c, 0.0, e * pv), axis=0), 0.0)
            if NEED_CROSS:
                t_acc += tl.where(here, tl.sum(tl.where(is_c, t_val, 0.0), axis=0), 0.0)
            row += szc
        bad_label += (in_v & ~valid).to(tl.int32)
        bad_logit += (in_v & nonfinite).to(tl.int32)
    _store_stats(part_ptr, bad_ptr, g_acc, m_acc, q_acc, t_acc, bad_label, bad_logit, n, pid, cidx, in_c, C,
                 NEED_CROSS, DETERMINISTIC)


@triton.jit
def _grad_rows_kernel(z_ptr, lab_ptr, g_ptr, coef_ptr, gout_ptr, C: tl.constexpr, V, H, W,
                      szn, szc, szd, szh, szw, stn, std, sth, stw, sgn, sgc, sgd, sgh, sgw, gamma_cross,
                      FLAT_Z: tl.constexpr, PACKED_Z: tl.constexpr, FLAT_T: tl.constexpr,
                      FLAT_G: tl.constexpr, PACKED_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """_grad_kernel's gradient (same math, pivoted on the arg max), computed row by row."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = v < V
    lab, valid = _load_labels(lab_ptr, n, v, in_v, C, H, W, stn, std, sth, stw, FLAT_T)
    zp = z_ptr + _sample_offsets(n, v, C, H, W, szn, szd, szh, szw, FLAT_Z, PACKED_Z)
    m, arg, z_lab, nonfinite, s1, r = _rows_softmax(zp, szc, lab, in_v, C)
    scale = tl.load(gout_ptr).to(tl.float32)
    coef = coef_ptr + n * 3 * C
    # g_k = a_k - b_k [k == l]; the pivot g* = g_{arg max}; kappa of the voxel's label
    g_star = tl.zeros_like(m)
    kappa = tl.zeros_like(m)
    for c in tl.static_range(C):
        a_c = tl.load(coef + c)
        b_c = tl.load(coef + C + c)
        g_star = tl.where(arg == c, a_c - tl.where(lab == c, b_c, 0.0), g_star)
        kappa = tl.where(lab == c, tl.load(coef + 2 * C + c), kappa)
    inv_s = 1.0 / (1.0 + s1)
    t = (m - z_lab) + _log1p(s1)
    # gbar = sum_{k != k*} p_k (g_k - g*)
    gbar = tl.zeros_like(m)
    row = zp
    for c in tl.static_range(C):
        e = tl.exp(tl.load(row, mask=in_v, other=0.0).to(tl.float32) - m)
        diff = tl.where(arg == c, 0.0, tl.load(coef + c) - tl.where(lab == c, tl.load(coef + C + c), 0.0) - g_star)
        gbar += e * diff
        row += szc
    gbar = gbar * inv_s
    # cross part: kappa_l t^gamma (p_j - [j == l]) / t, with (1 - p_l) / t -> 1 and p_j / t -> 0
    tg = kappa * _pow(t, gamma_cross)
    t_pos = t > 0.0
    safe_t = tl.where(t_pos, t, 1.0)
    tg_miss = tg * tl.where(t_pos, r * inv_s / safe_t, 1.0)
    tg_pos = tl.where(t_pos, tg, 0.0) / safe_t
    row = zp
    gp = g_ptr + _sample_offsets(n, v, C, H, W, sgn, sgd, sgh, sgw, FLAT_G, PACKED_G)
    for c in tl.static_range(C):
        p = tl.exp(tl.load(row, mask=in_v, other=0.0).to(tl.float32) - m) * inv_s
        diff = tl.where(arg == c, 0.0, tl.load(coef + c) - tl.where(lab == c, tl.load(coef + C + c), 0.0) - g_star)
        grad = p * (diff - gbar) + tl.where(lab == c, -tg_miss, tg_pos * p)
        grad = tl.where(valid, grad * scale, 0.0)
        tl.store(gp, grad.to(g_ptr.dtype.element_ty), mask=in_v)
        row += szc
        gp += sgc


def _flat(strides: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether voxel v of a sample sits at v * strides[-1] (strides and shape of D, H, W)."""
    (d, h, w), (sd, sh, sw) = shape, strides
    return (h == 1 or sh == w * sw) and (d == 1 or sd == h * w * sw)


def _packed(x: torch.Tensor) -> bool:
    """Whether (N, C, D, H, W) x holds label c of voxel v at v * C + c within a sample (dense channels-last)."""
    return _flat(x.stride()[2:], tuple(x.shape[2:])) and x.stride(1) == 1 and x.stride(4) == x.shape[1]


# Launch configuration overrides, per kernel ("stats", "grad"): a dict with any of "design" ("tiles":
# (BLOCK_C, BLOCK_V) tiles; "rows": one label row at a time), "block_v" (voxels per program) and
# "num_warps"; what is missing comes from _launch's measured defaults. bench/gpu_loss.py sweeps these
# per kernel; bench/NOTES.md has the figures, bench/triton_static.py the register and instruction counts.
TUNING: dict[str, dict | None] = {"stats": None, "grad": None}
DESIGNS = ("tiles", "rows")


@dataclass(frozen=True)
class Launch:
    rows: bool  # the row design (else tiles)
    block_c: int
    block_v: int
    num_warps: int


def _launch(kernel: str, num_labels: int, channels_last: bool) -> Launch:
    """Design and configuration of a kernel ("stats" or "grad"). Defaults measured on an H100 at
    C = 20 (bench/NOTES.md): tiles, contiguous logits 128 voxels x 2 warps, channels-last 64 x 8;
    the row design's default (256 x 4) is the largest without spills (bench/triton_static.py)."""
    chosen = TUNING[kernel] or {}
    design = chosen.get("design", "tiles")
    if design not in DESIGNS:
        raise ValueError(f"TUNING[{kernel!r}]['design'] must be one of {DESIGNS}, got {design!r}")
    block_c = triton.next_power_of_2(num_labels)
    if design == "rows":
        block_v, warps = 256, 4
    elif channels_last:
        block_v, warps = max(16, min(256, 2048 // block_c)), 8
    else:
        block_v, warps = max(16, min(256, 4096 // block_c)), 2
    return Launch(design == "rows", block_c, chosen.get("block_v", block_v), chosen.get("num_warps", warps))


def _programs_per_sample(device: torch.device, n_samples: int) -> int:
    """Programs of the persistent statistics kernel per sample: a few per multiprocessor (each
    program adds its sums once, so fewer programs mean fewer atomics on the same addresses)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, 4 * sms // max(1, n_samples))


# Voxel indices within a sample are int32 in the kernels (element offsets are int64): D * H * W must
# stay below this bound; the native op has no such bound.
MAX_VOXELS = 2**31 - 2**16


def _geometry(logits: torch.Tensor, target: torch.Tensor) -> dict:
    spatial = tuple(logits.shape[2:])
    voxels = logits.shape[2] * logits.shape[3] * logits.shape[4]
    if voxels > MAX_VOXELS:
        raise ValueError(f"logits: {voxels} voxels per sample (D * H * W) exceed the Triton kernels' bound of "
                         f"{MAX_VOXELS}; use backend='native'")
    return dict(
        C=logits.shape[1],
        V=logits.shape[2] * logits.shape[3] * logits.shape[4],
        H=logits.shape[3],
        W=logits.shape[4],
        szn=logits.stride(0), szc=logits.stride(1), szd=logits.stride(2), szh=logits.stride(3), szw=logits.stride(4),
        stn=target.stride(0), std=target.stride(1), sth=target.stride(2), stw=target.stride(3),
        FLAT_Z=_flat(logits.stride()[2:], spatial),
        PACKED_Z=_packed(logits),
        FLAT_T=_flat(target.stride()[1:], spatial),
    )


@torch.library.custom_op("expseg_fast::triton_explog_forward", mutates_args=())
def explog_forward(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
    w_dice: float, w_cross: float, gamma_dice: float, gamma_cross: float, linear_dice: bool, eps: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's forward (expseg_fast/op_contract.py): (loss () float32, statistics (N, C, 4) float64,
    bad (2,) int64 counts of labels outside [0, C) and of voxels with a non-finite logit)."""
    n_samples, num_labels = logits.shape[:2]
    geo = _geometry(logits, target)
    launch = _launch("stats", num_labels, logits.stride(1) == 1)
    n_tiles = triton.cdiv(geo["V"], launch.block_v)
    programs = max(1, min(n_tiles, _programs_per_sample(logits.device, n_samples)))
    slots = programs if deterministic else 1
    alloc = torch.empty if deterministic else torch.zeros
    part = alloc((n_samples, slots, num_labels, 4), dtype=torch.float64, device=logits.device)
    bad = torch.zeros(2, dtype=torch.int32, device=logits.device)
    stats = torch.empty((n_samples, num_labels, 4), dtype=torch.float64, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    if geo["V"] > 0:
        kernel = _stats_rows_kernel if launch.rows else _stats_kernel
        kernel[(programs, n_samples)](
            logits, target, part, bad, n_tiles=n_tiles, gamma_cross=gamma_cross, NEED_CROSS=w_cross != 0.0,
            DETERMINISTIC=deterministic, BLOCK_C=launch.block_c, BLOCK_V=launch.block_v, num_warps=launch.num_warps,
            **geo)
    else:
        part.zero_()
    _finalize(part, weights, stats, loss, geo["V"], (w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps))
    return loss, stats, bad.to(torch.int64)


def _finalize(part: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, loss: torch.Tensor, voxels: int,
              op_args: tuple) -> None:
    """_finalize_kernel over part (N, P, C, 4): the statistics into out (N, C, 4), or, where out is
    (N, 3, C), the backward coefficients."""
    n_samples, slots, num_labels = part.shape[:3]
    w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps = op_args
    _finalize_kernel[(1,)](
        part, weights, out, loss, n_samples, num_labels, slots, voxels,
        w_dice, w_cross, gamma_dice, gamma_cross, eps, GRAD_FLOOR, LINEAR=linear_dice, COEFS=out.shape[1] == 3,
        BLOCK_C=triton.next_power_of_2(num_labels), BLOCK_P=max(1, min(64, triton.next_power_of_2(slots))))


@explog_forward.register_fake
def _(logits, target, weights, w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps, deterministic):
    n_samples, num_labels = logits.shape[:2]
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((n_samples, num_labels, 4), dtype=torch.float64),
        logits.new_empty((2,), dtype=torch.int64),
    )


@torch.library.custom_op("expseg_fast::triton_explog_backward", mutates_args=())
def explog_backward(
    grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, stats: torch.Tensor,
    w_dice: float, w_cross: float, gamma_dice: float, gamma_cross: float, linear_dice: bool, eps: float,
    deterministic: bool,
) -> torch.Tensor:
    """The contract's backward: d loss / d logits (logits' dtype and memory format) scaled by grad (a 0-d
    tensor), from the backward coefficients of the statistics (N, C, 4)."""
    out = torch.empty_like(logits)
    n_samples, num_labels = logits.shape[:2]
    geo = _geometry(logits, target)
    coef = torch.empty((n_samples, 3, num_labels), dtype=torch.float32, device=logits.device)
    unused_loss = torch.empty((), dtype=torch.float32, device=logits.device)
    _finalize(stats.unsqueeze(1).contiguous(), weights, coef, unused_loss, geo["V"],
              (w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps))
    launch = _launch("grad", num_labels, logits.stride(1) == 1)
    if out.numel():
        spatial = tuple(logits.shape[2:])
        kernel = _grad_rows_kernel if launch.rows else _grad_kernel
        kernel[(triton.cdiv(geo["V"], launch.block_v), n_samples)](
            logits, target, out, coef, grad.float().contiguous(),
            sgn=out.stride(0), sgc=out.stride(1), sgd=out.stride(2), sgh=out.stride(3), sgw=out.stride(4),
            gamma_cross=gamma_cross, FLAT_G=_flat(out.stride()[2:], spatial), PACKED_G=_packed(out),
            BLOCK_C=launch.block_c, BLOCK_V=launch.block_v, num_warps=launch.num_warps, **geo)
    return out


@explog_backward.register_fake
def _(grad, logits, target, weights, stats, *op_args):
    return torch.empty_like(logits)


register_autograd(explog_forward, explog_backward)


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
    loss, _stats, bad = explog_forward(logits, target, weights.float(), *op_args, deterministic)
    return loss, bad
