// Index math of expseg_fast::upsample_trilinear_forward / upsample_trilinear_backward: trilinear
// resampling of channels-last x (N, C, D, H, W) to (N, C, D', H', W'), align_corners=False, as
// F.interpolate(x, size, mode="trilinear", align_corners=False) computes it (ATen's UpSample.h):
// per axis, output index o reads the input at s = max((o + 1/2) in / out - 1/2, 0), between
// i0 = min(floor(s), in - 1) and i1 = i0 + (i0 < in - 1) with weights 1 - l and l = clamp(s - i0, 0, 1);
// an axis of equal sizes is the identity. The value is the product of the three axes' weights summed
// over the 8 corners; the backward is its transpose.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace expseg {

// One output index's two input indices and weights along an axis.
template <typename acc_t>
struct Lerp {
  int64_t i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
std::vector<Lerp<acc_t>> axis_lerps(int64_t in, int64_t out) {
  std::vector<Lerp<acc_t>> lerps(out);
  const acc_t scale = acc_t(in) / acc_t(out);
  for (int64_t o = 0; o < out; ++o) {
    if (in == out) {
      lerps[o] = {o, o, acc_t(1), acc_t(0)};
      continue;
    }
    const acc_t s = std::max(scale * (acc_t(o) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(s)), in - 1);
    const acc_t l1 = std::min(std::max(s - acc_t(i0), acc_t(0)), acc_t(1));
    lerps[o] = {i0, i0 + (i0 < in - 1 ? 1 : 0), acc_t(1) - l1, l1};
  }
  return lerps;
}

// The resampling of channels-last x (N, C, D, H, W) to (N, C, Do, Ho, Wo): its sizes, the three axes'
// lerps, and the lengths of an input row (W * C) and an output row (Wo * C).
template <typename acc_t>
struct Resampling {
  int64_t N, C, D, H, W, Do, Ho, Wo;
  std::vector<Lerp<acc_t>> d, h, w;
  int64_t row, out_row;

  Resampling(at::IntArrayRef x_size, at::IntArrayRef y_size)
      : N(x_size[0]), C(x_size[1]), D(x_size[2]), H(x_size[3]), W(x_size[4]), Do(y_size[2]), Ho(y_size[3]),
        Wo(y_size[4]), d(axis_lerps<acc_t>(D, Do)), h(axis_lerps<acc_t>(H, Ho)), w(axis_lerps<acc_t>(W, Wo)),
        row(W * C), out_row(Wo * C) {}
};

inline void check_upsample_input(const at::Tensor& x, at::IntArrayRef size) {
  TORCH_CHECK_VALUE(x.dim() == 5, "x must be (N, C, D, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(size.size() == 3 && size[0] > 0 && size[1] > 0 && size[2] > 0,
                    "size must be three positive edges (D, H, W), got ", size);
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0 && x.size(4) > 0, "x must have voxels, got ", x.sizes());
}

}  // namespace expseg
