// Shapes, checks and math shared by the CPU (.cpp) and CUDA (.cu) implementations of
// expseg_fast::instance_norm_forward / expseg_fast::instance_norm_backward: instance norm with a learned
// scale and shift, then (optionally) ReLU, of x (N, C, D, H, W), contiguous or channels-last.
//
// Notation: V = D*H*W voxels; per (sample n, channel c) mean m and rstd r = 1 / sqrt(var + eps) over
// the V voxels (biased variance, as GroupNorm / InstanceNorm); xhat = (x - m) * r;
//   forward:  y = relu(xhat * w_c + b_c) = relu(((x - s) - d) * scale + b_c), scale = r w_c
//   backward: g = dL/dy where y > 0 (all of it without ReLU), A = sum_v g, B = sum_v g * xhat,
//             dL/dx = r w_c (g - A / V - xhat * B / V), dL/dw_c = sum_n B, dL/db_c = sum_n A.
// The statistics are sums of (x - s) and (x - s)^2 with s the first voxel of each (n, c) (a shifted
// sum: exact for large means such as an offset of 1e4), accumulated in the op type within a chunk of
// voxels and in float64 across chunks, in a fixed order (deterministic on both devices). The op keeps
// the mean as d = m - s ("dmean", (N, C)) and forms x - m as (x - s) - d, where x - s is exact: a mean
// of 1e4 rounded to float32 would cost xhat a few 1e-4.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#ifndef EXPSEG_HD
#if defined(__CUDACC__)
#define EXPSEG_HD __host__ __device__ __forceinline__
#else
#define EXPSEG_HD inline
#endif
#endif

namespace expseg {

// Columns of the chunk partials (N * C * chunks, kPartCols), float64.
constexpr int kPartSum = 0;  // forward: sum (x - s); backward: A
constexpr int kPartSq = 1;   // forward: sum (x - s)^2; backward: B
constexpr int kPartCols = 2;

// A (N, C, V) volume stored contiguous (x[n, c, v]) or channels-last (x[n, v, c]).
struct NormGeometry {
  int64_t N, C, V;
  bool channels_last;

  EXPSEG_HD int64_t at(int64_t n, int64_t c, int64_t v) const {
    return channels_last ? (n * V + v) * C + c : (n * C + c) * V + v;
  }
  EXPSEG_HD int64_t chunks(int64_t chunk) const { return (V + chunk - 1) / chunk; }
};

inline NormGeometry norm_geometry(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 5, "x must be (N, C, D, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  TORCH_CHECK_VALUE(cl || x.is_contiguous(), "x must be contiguous or channels-last 3d");
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) * x.size(3) * x.size(4) >= 1, "x must have channels and voxels");
  return {x.size(0), x.size(1), x.size(2) * x.size(3) * x.size(4), cl && !x.is_contiguous()};
}

inline void check_affine(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& x) {
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), "weight and bias must be (C,) with C = ",
                      x.size(1), ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == x.device(), "weight and bias must be on x's device");
  }
}

// Statistics dtype: float32, float64 for float64 x.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_stats(const at::Tensor& dmean, const at::Tensor& rstd, const NormGeometry& g, const at::Tensor& x) {
  TORCH_CHECK_VALUE(dmean.sizes() == at::IntArrayRef({g.N, g.C}) && rstd.sizes() == dmean.sizes() &&
                        dmean.scalar_type() == stat_dtype(x) && rstd.scalar_type() == stat_dtype(x),
                    "dmean and rstd must be (N, C) of the statistics dtype");
}

// t with x's dtype, shape and strides (t itself when it has them, else a copy): what the kernels index.
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "expected shape ", x.sizes(), ", got ", t.sizes());
  if (t.strides() == x.strides() && t.scalar_type() == x.scalar_type()) return t;
  return at::empty_like(x).copy_(t);
}

// d = mean - s and rstd of one (n, c) from its chunk partials (sum and sum of squares of x - s).
template <typename acc_t>
EXPSEG_HD void finish_stats(const double* parts, int64_t chunks, double count, double eps, acc_t* dmean,
                            acc_t* rstd) {
  double sum = 0.0, sq = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {
    sum += parts[k * kPartCols + kPartSum];
    sq += parts[k * kPartCols + kPartSq];
  }
  const double d = sum / count;
  const double var = sq / count - d * d;
  *dmean = acc_t(d);
  *rstd = acc_t(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));
}

// (A, B) of one (n, c) from its chunk partials.
EXPSEG_HD void finish_grad_sums(const double* parts, int64_t chunks, double* a, double* b) {
  double sa = 0.0, sb = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {
    sa += parts[k * kPartCols + kPartSum];
    sb += parts[k * kPartCols + kPartSq];
  }
  *a = sa;
  *b = sb;
}

// x - m of one element, from its (n, c)'s first voxel s and d = m - s.
template <typename acc_t>
EXPSEG_HD acc_t centred(acc_t x, acc_t s, acc_t d) {
  return (x - s) - d;
}

// y of one element from its (n, c)'s s, d, scale = r w_c and b_c; ReLU as torch's (y <= 0 -> 0, NaN kept).
template <typename acc_t>
EXPSEG_HD acc_t norm_out(acc_t x, acc_t s, acc_t d, acc_t scale, acc_t bias, bool relu) {
  const acc_t y = centred(x, s, d) * scale + bias;
  return (relu & (y <= acc_t(0))) ? acc_t(0) : y;  // & not &&: no branch, so the loops vectorise
}

// g = dL/dy through the ReLU, from its output y (as torch's: zero where y <= 0).
template <typename acc_t>
EXPSEG_HD acc_t relu_grad(acc_t grad_y, acc_t y, bool relu) {
  return (relu & (y <= acc_t(0))) ? acc_t(0) : grad_y;
}

// dL/dx of one element: k (g - a_v - xhat * b_v) with k = r w_c, a_v = A / V, b_v = B / V.
template <typename acc_t>
EXPSEG_HD acc_t norm_grad(acc_t g, acc_t xhat, acc_t k, acc_t a_v, acc_t b_v) {
  return k * (g - a_v - xhat * b_v);
}

}  // namespace expseg
