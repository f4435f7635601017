// CPU implementation of expseg_fast::upsample_trilinear_forward / upsample_trilinear_backward (the math in
// upsample.h) for channels-last x, in x's dtype with sums in its op type (float for bfloat16 / float16).
//   forward:  x (N, C, D, H, W), size (D', H', W') -> y (N, C, D', H', W') channels-last
//   backward: grad_y (N, C, D', H', W'), input_size (N, C, D, H, W) -> grad_x channels-last
// Both separable and threaded with at::parallel_for, each element written once by one thread:
//   forward, per output row (n, d', h'): the four input rows its D and H weights reach, summed into one
//   row of W * C sums, then each output voxel the W lerp of two of them (C contiguous: vector loops);
//   backward, per input plane (n, d): for every output plane d' that reads it and each of its rows h',
//   the W transpose of grad_y's row into W * C sums, added with the D and H weights into the plane's
//   H * W * C sums (in the op type), written once at the end. Each grad_y row is read by the (at most
//   two per axis) input planes it reaches.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "upsample.h"

namespace expseg {
namespace {

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, scalar_t* y, const Resampling<acc_t>& r) {
  const auto &ld = r.d, &lh = r.h, &lw = r.w;
  const int64_t C = r.C, D = r.D, H = r.H, Do = r.Do, Ho = r.Ho, Wo = r.Wo, row = r.row, out_row = r.out_row;
  at::parallel_for(0, r.N * Do * Ho, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(row);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (Do * Ho), od = (i / Ho) % Do, oh = i % Ho;
      const Lerp<acc_t>& a = ld[od];
      const Lerp<acc_t>& b = lh[oh];
      const scalar_t* base = x + n * D * H * row;
      const scalar_t* r00 = base + (a.i0 * H + b.i0) * row;
      const scalar_t* r01 = base + (a.i0 * H + b.i1) * row;
      const scalar_t* r10 = base + (a.i1 * H + b.i0) * row;
      const scalar_t* r11 = base + (a.i1 * H + b.i1) * row;
      const acc_t w00 = a.l0 * b.l0, w01 = a.l0 * b.l1, w10 = a.l1 * b.l0, w11 = a.l1 * b.l1;
      for (int64_t k = 0; k < row; ++k) {
        sums[k] = w00 * acc_t(r00[k]) + w01 * acc_t(r01[k]) + w10 * acc_t(r10[k]) + w11 * acc_t(r11[k]);
      }
      scalar_t* out = y + i * out_row;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const Lerp<acc_t>& c = lw[ow];
        const acc_t* s0 = sums.data() + c.i0 * C;
        const acc_t* s1 = sums.data() + c.i1 * C;
        scalar_t* o = out + ow * C;
        for (int64_t ch = 0; ch < C; ++ch) o[ch] = scalar_t(c.l0 * s0[ch] + c.l1 * s1[ch]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* gy, scalar_t* gx, const Resampling<acc_t>& r) {
  const auto &ld = r.d, &lh = r.h, &lw = r.w;
  const int64_t C = r.C, D = r.D, H = r.H, Do = r.Do, Ho = r.Ho, Wo = r.Wo, row = r.row, out_row = r.out_row;
  at::parallel_for(0, r.N * D, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane(H * row), sums(row);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / D, d = p % D;
      std::fill(plane.begin(), plane.end(), acc_t(0));
      for (int64_t od = 0; od < Do; ++od) {
        if (ld[od].i0 != d && ld[od].i1 != d) continue;  // the output plane does not read this one
        const acc_t wd = (ld[od].i0 == d ? ld[od].l0 : acc_t(0)) + (ld[od].i1 == d ? ld[od].l1 : acc_t(0));
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const scalar_t* g = gy + ((n * Do + od) * Ho + oh) * out_row;
          std::fill(sums.begin(), sums.end(), acc_t(0));
          for (int64_t ow = 0; ow < Wo; ++ow) {
            const Lerp<acc_t>& c = lw[ow];
            acc_t* s0 = sums.data() + c.i0 * C;
            acc_t* s1 = sums.data() + c.i1 * C;
            const scalar_t* gv = g + ow * C;
            for (int64_t ch = 0; ch < C; ++ch) {
              const acc_t v = acc_t(gv[ch]);
              s0[ch] += c.l0 * v;
              s1[ch] += c.l1 * v;
            }
          }
          const Lerp<acc_t>& b = lh[oh];
          acc_t* h0 = plane.data() + b.i0 * row;
          acc_t* h1 = plane.data() + b.i1 * row;
          const acc_t w0 = wd * b.l0, w1 = wd * b.l1;
          for (int64_t k = 0; k < row; ++k) h0[k] += w0 * sums[k];
          for (int64_t k = 0; k < row; ++k) h1[k] += w1 * sums[k];
        }
      }
      scalar_t* out = gx + (n * D + d) * H * row;
      for (int64_t k = 0; k < H * row; ++k) out[k] = scalar_t(plane[k]);
    }
  });
}

// src channels-last: x forward, grad_y backward; x_size and y_size (N, C, D, H, W) and (N, C, Do, Ho, Wo).
template <bool kBackward>
at::Tensor resample(const at::Tensor& src_in, at::IntArrayRef x_size, at::IntArrayRef y_size) {
  const at::Tensor src = src_in.contiguous(at::MemoryFormat::ChannelsLast3d);
  at::Tensor dst = at::empty(kBackward ? x_size : y_size, src.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (dst.numel() == 0) return dst;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "upsample_trilinear_cpu", [&] {
    const Resampling<at::opmath_type<scalar_t>> r(x_size, y_size);
    if constexpr (kBackward) {
      backward_kernel(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), r);
    } else {
      forward_kernel(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), r);
    }
  });
  return dst;
}

at::Tensor upsample_trilinear_forward_cpu(const at::Tensor& x, at::IntArrayRef size) {
  check_upsample_input(x, size);
  return resample<false>(x, x.sizes(), {x.size(0), x.size(1), size[0], size[1], size[2]});
}

at::Tensor upsample_trilinear_backward_cpu(const at::Tensor& grad_y, at::IntArrayRef input_size) {
  TORCH_CHECK_VALUE(input_size.size() == 5, "input_size must be (N, C, D, H, W), got ", input_size);
  check_upsample_input(grad_y, grad_y.sizes().slice(2));
  TORCH_CHECK_VALUE(grad_y.size(0) == input_size[0] && grad_y.size(1) == input_size[1],
                    "grad_y's N and C must be input_size's, got ", grad_y.sizes(), " and ", input_size);
  return resample<true>(grad_y, input_size, grad_y.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expseg_fast, m) {
  m.def("upsample_trilinear_forward(Tensor x, int[] size) -> Tensor");
  m.def("upsample_trilinear_backward(Tensor grad_y, int[] input_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(expseg_fast, CPU, m) {
  m.impl("upsample_trilinear_forward", &upsample_trilinear_forward_cpu);
  m.impl("upsample_trilinear_backward", &upsample_trilinear_backward_cpu);
}

}  // namespace expseg
