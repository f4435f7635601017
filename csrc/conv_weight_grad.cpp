// CPU implementation of expseg_fast::conv3d_weight_grad (the math in conv_weight_grad.h), float32 (explicit
// vectors) and float64 (per element), for x and grad_y taken channels-last (copied if they are not).
//   grad_y (N, O, D, H, W), x (N, C, D, H, W), kernel (kD, kH, kW) -> grad_w (O, C, kD, kH, kW)
// oneDNN's backward-weights ran at a quarter of this CPU's FMA rate for the network's shapes (36 -> 12
// channels at 64^3: 48 GFLOP/s against 195 for a forward; bench/NOTES.md). Here each tap's gradient is a
// sum over rows of a GEMM with a short inner dimension, out_t (a x b) += A_row^T B_row, where A is one
// tensor and B the other shifted by the tap's offset along the row: a tile of 4 of A's channels by up to
// 24 of B's lives in registers while a row's voxels stream through (per voxel 3 vector loads of B and 4
// broadcasts of A for 12 vector multiply-adds). B is the tensor with more channels (x, or grad_y with the offset
// negated where O > C), so its channels fill the vectors. Threads take whole (n, d) planes; a float32 partial
// sums planes until it holds 4096 voxels or more (one 64^2 plane, 16 of 16^2), then is added to the thread's
// float64 total, and the threads' totals are summed in a fixed order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "conv_weight_grad.h"
#include "cpu_vectors.h"

#pragma GCC optimize("fp-contract=fast")  // a * b + c as one multiply-add (off under -std=c++20)

namespace expseg {
namespace {

// The tiles (conv_weight_grad_tiles.h) compiled twice: for AVX2 with FMA (the clone this project's CPUs
// take: GCC's target_clones lowered the inlined vector helpers for the baseline, a broadcast then took
// seven instructions) and for the baseline, chosen once at load time.
#if defined(__x86_64__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_fma {
#include "conv_weight_grad_tiles.h"
}  // namespace avx2_fma
#pragma GCC pop_options
const bool kAvx2Fma = [] {
  __builtin_cpu_init();  // this runs among the library's constructors, perhaps before libgcc's
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#else
const bool kAvx2Fma = false;
#endif
namespace baseline {
#include "conv_weight_grad_tiles.h"
}  // namespace baseline

// out (ca x cb, rows cb apart) += A^T B over `count` voxels: A's rows ca apart, B's cb apart.
template <typename S>
void accumulate(const S* A, int64_t ca, const S* B, int64_t cb, int64_t count, S* out) {
#if defined(__x86_64__) && !defined(__clang__)
  if (kAvx2Fma) return avx2_fma::accumulate_rows(A, ca, B, cb, count, out);
#endif
  baseline::accumulate_rows(A, ca, B, cb, count, out);
}

constexpr int64_t kPartVoxels = 4096;  // the most voxels (planes' worth) summed in S before float64

// grad_w (O, C, taps) of channels-last gy (N, O, D, H, W) and x (N, C, D, H, W).
template <typename S>
void weight_grad_kernel(const S* gy, const S* x, S* grad_w, int64_t N, int64_t O, int64_t C, int64_t D,
                        int64_t H, int64_t W, const Taps& k) {
  const bool swap = O > C;  // B, whose channels fill the vectors, is the tensor with more of them
  const S* A = swap ? x : gy;
  const S* B = swap ? gy : x;
  const int64_t ca = swap ? C : O, cb = swap ? O : C, sign = swap ? -1 : 1;
  const int64_t T = k.count(), block = ca * cb;
  const bool plane_rows = k.kh == 1 && k.kw == 1;  // no offset within a plane: a whole plane is one row
  const int64_t rows = plane_rows ? 1 : H, row_voxels = plane_rows ? H * W : W;
  std::vector<std::array<int64_t, 3>> offsets(T);
  for (int64_t t = 0; t < T; ++t) {
    const auto o = k.offset(t);
    offsets[t] = {sign * o[0], sign * o[1], sign * o[2]};
  }
  const int threads = at::get_num_threads();
  std::vector<double> totals(static_cast<size_t>(threads) * T * block, 0.0);
  at::parallel_for(0, N * D, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> part(T * block, S(0));
    double* total = totals.data() + static_cast<size_t>(at::get_thread_num()) * T * block;
    int64_t in_part = 0;  // voxels summed into part since it was last added to total
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / D, d = p % D;
      for (int64_t h = 0; h < rows; ++h) {
        const S* a_row = A + ((n * D + d) * H + h) * W * ca;
        for (int64_t t = 0; t < T; ++t) {
          const auto& o = offsets[t];
          const int64_t dd = d + o[0], hh = h + o[1];
          if (dd < 0 || dd >= D || hh < 0 || hh >= H) continue;
          const int64_t w0 = std::max<int64_t>(0, -o[2]), w1 = std::min<int64_t>(row_voxels, row_voxels - o[2]);
          if (w1 <= w0) continue;
          const S* b_row = B + ((n * D + dd) * H + hh) * W * cb;
          accumulate(a_row + w0 * ca, ca, b_row + (w0 + o[2]) * cb, cb, w1 - w0, part.data() + t * block);
        }
      }
      in_part += H * W;
      if (in_part >= kPartVoxels || p + 1 == end) {
        for (int64_t i = 0; i < T * block; ++i) total[i] += static_cast<double>(part[i]);
        std::fill(part.begin(), part.end(), S(0));
        in_part = 0;
      }
    }
  });
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t a = 0; a < ca; ++a) {
      for (int64_t b = 0; b < cb; ++b) {
        double sum = 0.0;
        for (int th = 0; th < threads; ++th) sum += totals[(static_cast<size_t>(th) * T + t) * block + a * cb + b];
        const int64_t o = swap ? b : a, c = swap ? a : b;
        grad_w[(o * C + c) * T + t] = static_cast<S>(sum);
      }
    }
  }
}

at::Tensor conv3d_weight_grad_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in, at::IntArrayRef kernel) {
  const Taps k = check_weight_grad_input(grad_y_in, x_in, kernel);
  const at::Tensor gy = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast3d);
  const int64_t N = x.size(0), C = x.size(1), O = gy.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  at::Tensor grad_w = at::empty({O, C, k.kd, k.kh, k.kw}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_w.numel() == 0) return grad_w;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3d_weight_grad_cpu", [&] {
    weight_grad_kernel(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), N, O, C, D, H,
                       W, k);
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expseg_fast, m) {
  m.def("conv3d_weight_grad(Tensor grad_y, Tensor x, int[] kernel) -> Tensor");
}

TORCH_LIBRARY_IMPL(expseg_fast, CPU, m) { m.impl("conv3d_weight_grad", &conv3d_weight_grad_cpu); }

}  // namespace expseg
