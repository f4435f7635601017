// Math of the exponential logarithmic loss for the CPU (.cpp) and CUDA (.cu) kernels.
//
// Shared by both: the statistics layout, the per-(sample, label) Dice term, loss and backward
// coefficients, and the cross part's per-voxel factors (cross_factors). The per-logit gradient
// (logit_grad) is called by CUDA and spelled out in the CPU's tile loop (called there, GCC contracts
// it into FMAs differently: an ulp of difference). The softmax has two forms: one voxel per CUDA
// thread here (voxel_softmax, voxel_grad), and tiles of 64 voxels with vectorisable exp/log/pow in
// explog_loss.cpp (GCC vectorises loops over voxels only, and not through libm calls).
//
// Notation (DESIGN.md section 2): logits z (N, C, D, H, W), label l(x), p = softmax over C,
// V = D*H*W voxels per sample. Per (sample n, label i) the forward pass gathers, in float64:
//   G_i = #voxels labelled i
//   M_i = sum_{x: l=i} (1 - p_i(x))        missed mass
//   Q_i = sum_{x: l!=i} p_i(x)             false-positive mass
//   T_i = sum_{x: l=i} t(x)^gamma_cross    t = -ln p_l (cross-entropy, unweighted)
// so that I_i = G_i - M_i, P_i = I_i + Q_i and -ln Dice_i = log1p((M_i + Q_i) / (2 I_i + eps)).
// Every quantity that vanishes for a confident prediction (1 - p_l, p_j for j != l, t, u) is
// computed directly, never as a difference of numbers close to 1, so loss and gradient stay
// accurate and finite for saturated logits.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EXPSEG_HD __host__ __device__ __forceinline__
#else
#define EXPSEG_HD inline
#endif

namespace expseg {

// Columns of the statistics tensor (N, C, kStatCols), float64.
constexpr int kStatG = 0;
constexpr int kStatM = 1;
constexpr int kStatQ = 2;
constexpr int kStatT = 3;
constexpr int kStatCols = 4;

// Floor applied to u = -ln Dice_i in the gradient coefficient gamma * u^(gamma - 1) only (the loss
// value itself is exact): it keeps the coefficient below gamma * 1e30, finite in float32, while
// the logit gradient (about gamma * u^gamma) is exact for u >= 1e-30. Same value as GRAD_FLOOR in
// expseg_fast/numerics.py; DESIGN.md section 3.
constexpr double kGradFloor = 1e-30;

struct LossParams {
  double w_dice;       // weight of the Dice part
  double w_cross;      // weight of the cross-entropy part
  double gamma_dice;   // exponent of -ln Dice (ignored when linear_dice)
  double gamma_cross;  // exponent of -ln p_l
  double eps;          // Dice smoothing (paper: 1)
  bool linear_dice;    // Dice part is mean(1 - Dice) instead of mean((-ln Dice)^gamma)
};

EXPSEG_HD float xexp(float x) { return expf(x); }
EXPSEG_HD double xexp(double x) { return exp(x); }
EXPSEG_HD float xlog1p(float x) { return log1pf(x); }
EXPSEG_HD double xlog1p(double x) { return log1p(x); }
EXPSEG_HD float xpow(float x, float y) { return powf(x, y); }
EXPSEG_HD double xpow(double x, double y) { return pow(x, y); }
EXPSEG_HD bool xfinite(float x) { return isfinite(x); }
EXPSEG_HD bool xfinite(double x) { return isfinite(x); }

// Dice part of one (sample, label): its loss term phi(u) and the coefficients of
// d phi / d p_i(x) = coef_all - coef_label * [l(x) == i].
struct DiceTerm {
  double loss;
  double coef_all;
  double coef_label;
};

EXPSEG_HD DiceTerm dice_term(double G, double M, double Q, const LossParams& p) {
  const double A = 2.0 * (G - M) + p.eps;  // 2 I + eps
  const double B = 2.0 * G - M + Q + p.eps;  // G + P + eps
  const double u = log1p((M + Q) / A);  // -ln Dice >= 0
  double phi, dphi;
  if (p.linear_dice) {
    phi = -expm1(-u);  // 1 - Dice
    dphi = exp(-u);
  } else {
    phi = pow(u, p.gamma_dice);
    dphi = p.gamma_dice * pow(fmax(u, kGradFloor), p.gamma_dice - 1.0);
  }
  return {phi, dphi / B, 2.0 * dphi / A};
}

// Softmax of one voxel relative to its label, from C logits at z[j * cs].
template <typename acc_t>
struct VoxelSoftmax {
  acc_t m;    // max logit
  acc_t S;    // sum_j exp(z_j - m) >= 1
  acc_t R;    // sum_{j != l} exp(z_j - m): 1 - p_l = R / S
  acc_t t;    // -ln p_l >= 0
  int arg;    // arg max_j z_j (first of ties)
  bool finite;  // every logit of the voxel is finite
};

template <typename acc_t, typename scalar_t>
EXPSEG_HD VoxelSoftmax<acc_t> voxel_softmax(const scalar_t* z, int64_t cs, int C, int label) {
  acc_t m = static_cast<acc_t>(z[0]);
  int arg = 0;
  bool finite = true;
  for (int j = 0; j < C; ++j) {
    const acc_t v = static_cast<acc_t>(z[j * cs]);
    finite = finite && xfinite(v);
    if (v > m) {
      m = v;
      arg = j;
    }
  }
  acc_t S1 = 0, R = 0;  // S1: sum without the arg-max term, which is exp(0) = 1 exactly
  for (int j = 0; j < C; ++j) {
    const acc_t e = xexp(static_cast<acc_t>(z[j * cs]) - m);
    if (j != arg) S1 += e;
    if (j != label) R += e;
  }
  const acc_t zl = static_cast<acc_t>(z[label * cs]);
  return {m, acc_t(1) + S1, R, (m - zl) + xlog1p(S1), arg, finite};
}

// The cross part's per-voxel factors. The gradient of kappa t^gamma with respect to z_j is
// kappa t^gamma (p_j - [j == l]) / t: for the label, kappa t^gamma times (1 - p_l) / t (-> 1 as
// t -> 0); for the others, times p_j / t (-> 0: the voxel's other probabilities vanish with t).
// t can be subnormal, so the callers divide by it rather than multiply by 1 / t, which would
// overflow; where t = 0 the limits are used. tg = kappa t^gamma, miss = 1 - p_l.
template <typename acc_t>
struct CrossFactors {
  acc_t label;   // what the label's logit loses: tg (1 - p_l) / t
  acc_t other;   // tg where t > 0, else 0: another logit j gains other * p_j / safe_t
  acc_t safe_t;  // t where t > 0, else 1
};

template <typename acc_t>
EXPSEG_HD CrossFactors<acc_t> cross_factors(acc_t tg, acc_t miss, acc_t t) {
  const bool t_pos = t > acc_t(0);
  return {tg * (t_pos ? miss / t : acc_t(1)), t_pos ? tg : acc_t(0), t_pos ? t : acc_t(1)};
}

// dL/dz_j of one voxel from its probability p_j: the Dice part through the softmax pivoted on the
// arg max k* (dg = g_j - g_k*, 0 for k* itself; gbar = sum_{k != k*} p_k (g_k - g_k*)), plus the
// cross part (a select, not a mask factor: p_l / t overflows for the label of a confident voxel).
template <typename acc_t>
EXPSEG_HD acc_t logit_grad(acc_t p, acc_t dg, acc_t gbar, bool is_label, acc_t cross_label, acc_t cross_other,
                           acc_t safe_t) {
  return p * (dg - gbar) + (is_label ? -cross_label : cross_other * (p / safe_t));
}

// Gradient of the loss with respect to the C logits of one voxel, written to g[j * gs].
// a, b: per-label Dice coefficients (dL/dp_i = a_i - b_i [l == i]), already scaled by the
// loss weight, 1 / (N C) and the incoming gradient; kappa: w_cross * w_l * gamma_cross / (N V)
// times the incoming gradient, or 0 when the cross part is off.
template <typename acc_t, typename scalar_t, typename coef_t>
EXPSEG_HD void voxel_grad(const scalar_t* z, int64_t cs, scalar_t* g, int64_t gs, int C, int label,
                          const coef_t* a, const coef_t* b, acc_t kappa, acc_t gamma_cross) {
  const VoxelSoftmax<acc_t> s = voxel_softmax<acc_t>(z, cs, C, label);
  const acc_t inv_S = acc_t(1) / s.S;
  const acc_t miss = s.R * inv_S;  // 1 - p_l
  // Dice part through the softmax: dz_j = p_j (g_j - sum_k p_k g_k), g_k = a_k - b_k [k == l].
  // Pivot on the arg max k*: g_j - sum_k p_k g_k = (g_j - g_k*) - sum_{k != k*} p_k (g_k - g_k*),
  // a sum of small terms, so confident voxels (right or wrong) lose nothing to cancellation.
  const acc_t bl = acc_t(b[label]);
  const acc_t g_star = acc_t(a[s.arg]) - (s.arg == label ? bl : acc_t(0));
  acc_t gbar = 0;  // sum_{k != k*} p_k (g_k - g_k*)
  for (int k = 0; k < C; ++k) {
    if (k == s.arg) continue;
    const acc_t gk = acc_t(a[k]) - (k == label ? bl : acc_t(0));
    gbar += xexp(static_cast<acc_t>(z[k * cs]) - s.m) * inv_S * (gk - g_star);
  }
  const acc_t tg = kappa != acc_t(0) ? kappa * xpow(s.t, gamma_cross) : acc_t(0);
  const CrossFactors<acc_t> cross = cross_factors(tg, miss, s.t);
  for (int j = 0; j < C; ++j) {
    const acc_t pj = xexp(static_cast<acc_t>(z[j * cs]) - s.m) * inv_S;
    const acc_t gj = acc_t(a[j]) - (j == label ? bl : acc_t(0));
    const acc_t d = logit_grad(pj, j == s.arg ? acc_t(0) : gj - g_star, gbar, j == label, cross.label, cross.other,
                               cross.safe_t);
    g[j * gs] = static_cast<scalar_t>(d);
  }
}

}  // namespace expseg

namespace expseg {

// Backward coefficients of one (sample n, label i) from its statistics st[kStatCols]:
// a = dL/dp_i(x) for every voxel, b = the extra -dL/dp_i(x) where l(x) == i, kappa = the cross
// part's per-voxel scale for voxels labelled i. All scaled by grad = dOutput/dLoss.
EXPSEG_HD void label_coefs(const double* st, double w_i, const LossParams& p, double NC, double NV,
                           double grad, double* a, double* b, double* kappa) {
  const DiceTerm d = dice_term(st[kStatG], st[kStatM], st[kStatQ], p);
  const double s = grad * p.w_dice / NC;
  *a = s * d.coef_all;
  *b = s * d.coef_label;
  *kappa = grad * p.w_cross * w_i * p.gamma_cross / NV;
}

// Loss contribution of one (sample n, label i) from its statistics.
EXPSEG_HD double label_loss(const double* st, double w_i, const LossParams& p, double NC, double NV) {
  double loss = 0.0;
  if (p.w_dice != 0.0) loss += p.w_dice * dice_term(st[kStatG], st[kStatM], st[kStatQ], p).loss / NC;
  if (p.w_cross != 0.0) loss += p.w_cross * w_i * st[kStatT] / NV;
  return loss;
}

}  // namespace expseg
