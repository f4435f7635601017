// Shapes and checks of expseg_fast::conv3d_weight_grad: the weight gradient of a 3D convolution with
// stride 1, dilation 1, one group and zero padding k // 2 along each axis (odd kernel edges: the "same"
// convolution of the network's blocks and skips),
//   y[n, o, v] = sum_i sum_t w[o, i, t] x[n, i, v + t - k // 2]   (x zero outside its grid)
//   dL/dw[o, i, t] = sum_n sum_v g[n, o, v] x[n, i, v + t - k // 2],  g = dL/dy,
// for x (N, C, D, H, W) and g (N, O, D, H, W); the result (O, C, kD, kH, kW) is contiguous.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>

namespace expseg {

// The tap offsets of a kernel: tap t = (a, b, c) (row-major over kD, kH, kW) reads x at v + (a, b, c) - k // 2.
struct Taps {
  int64_t kd, kh, kw;
  int64_t count() const { return kd * kh * kw; }
  std::array<int64_t, 3> offset(int64_t t) const {
    return {t / (kh * kw) - kd / 2, (t / kw) % kh - kh / 2, t % kw - kw / 2};
  }
};

inline Taps check_weight_grad_input(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef kernel) {
  TORCH_CHECK_VALUE(x.dim() == 5 && grad_y.dim() == 5, "x and grad_y must be (N, C, D, H, W), got ", x.sizes(),
                    " and ", grad_y.sizes());
  TORCH_CHECK_VALUE(x.size(0) == grad_y.size(0) && x.sizes().slice(2) == grad_y.sizes().slice(2),
                    "grad_y must have x's batch and grid (a stride-1 'same' convolution), got ", grad_y.sizes(),
                    " for x ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == grad_y.scalar_type(), "x and grad_y must have one dtype, got ",
                    x.scalar_type(), " and ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(kernel.size() == 3 && kernel[0] > 0 && kernel[1] > 0 && kernel[2] > 0 && kernel[0] % 2 == 1 &&
                        kernel[1] % 2 == 1 && kernel[2] % 2 == 1,
                    "kernel must be three odd positive edges (kD, kH, kW), got ", kernel);
  return {kernel[0], kernel[1], kernel[2]};
}

}  // namespace expseg
