// Shapes and checks shared by the CPU and CUDA implementations of expseg_fast::explog_forward /
// expseg_fast::explog_backward. Logits and target are read through their strides (any memory
// format, no copies); the gradient is written through its own strides.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "explog_math.h"

// Label dtypes the kernels read directly (the Python side converts any other integer dtype).
#define EXPSEG_DISPATCH_LABEL_TYPES(TYPE, NAME, ...)        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kShort, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kLong, __VA_ARGS__))

namespace expseg {

// Geometry of a (N, C, D, H, W) tensor and a (N, D, H, W) target, voxel v = (d * H + h) * W + w.
struct Geometry {
  int64_t N, C, D, H, W, V;
  int64_t zs[5];  // logits strides (n, c, d, h, w)
  int64_t ts[5];  // target strides as (n, 0, d, h, w)
  int64_t gz[5];  // gradient strides (n, c, d, h, w), set by the backward pass

  // Whether the spatial strides s (5-d) make voxel v of a sample sit at v * s[4].
  EXPSEG_HD bool flat(const int64_t* s) const {
    return (H == 1 || s[3] == W * s[4]) && (D == 1 || s[2] == H * W * s[4]);
  }

  // Offset of channel 0 of voxel v of sample n in a 5-d tensor with strides s.
  EXPSEG_HD int64_t offset(const int64_t* s, int64_t n, int64_t v) const {
    const int64_t w = v % W, h = (v / W) % H, d = v / (W * H);
    return n * s[0] + d * s[2] + h * s[3] + w * s[4];
  }
};

inline Geometry make_geometry(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK_VALUE(logits.dim() == 5, "logits must be (N, C, D, H, W), got ", logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 4, "target must be (N, D, H, W), got ", target.sizes());
  TORCH_CHECK_VALUE(target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                        target.size(2) == logits.size(3) && target.size(3) == logits.size(4),
                    "target shape ", target.sizes(), " does not match logits ", logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "logits must be floating point");
  TORCH_CHECK_VALUE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                    "target must hold integer labels, got ", target.scalar_type());
  TORCH_CHECK_VALUE(logits.device() == target.device(), "logits and target on different devices");
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(1) <= 1024, "logits must have 1..1024 labels");
  Geometry g;
  g.N = logits.size(0);
  g.C = logits.size(1);
  g.D = logits.size(2);
  g.H = logits.size(3);
  g.W = logits.size(4);
  g.V = g.D * g.H * g.W;
  for (int k = 0; k < 5; ++k) g.zs[k] = logits.stride(k);
  g.ts[0] = target.stride(0);
  g.ts[1] = 0;
  for (int k = 1; k < 4; ++k) g.ts[k + 1] = target.stride(k);
  for (int k = 0; k < 5; ++k) g.gz[k] = g.zs[k];
  return g;
}

inline void check_weights(const at::Tensor& weights, const Geometry& g, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == g.C, "weights must be (C,) with C = ",
                    g.C, ", got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == logits.device(), "weights on a different device than logits");
}

inline void check_stats(const at::Tensor& stats, const Geometry& g) {
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({g.N, g.C, kStatCols}) && stats.scalar_type() == at::kDouble,
                    "stats must be (N, C, 4) float64");
}

inline void check_coefs(const at::Tensor& coefs, const Geometry& g, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(coefs.sizes() == at::IntArrayRef({3, g.N, g.C}) && coefs.scalar_type() == at::kDouble,
                    "coefs must be (3, N, C) float64");
  TORCH_CHECK_VALUE(coefs.device() == logits.device(), "coefs on a different device than logits");
}

// The loss is float32, or float64 for float64 logits.
inline at::ScalarType loss_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline LossParams make_params(double w_dice, double w_cross, double gamma_dice, double gamma_cross,
                              bool linear_dice, double eps) {
  return {w_dice, w_cross, gamma_dice, gamma_cross, eps, linear_dice};
}

}  // namespace expseg
