// CPU implementation of expseg_fast::instance_norm_forward / instance_norm_backward (instance norm with
// a learned scale and shift, then optionally ReLU; the math in instance_norm.h), threaded with
// at::parallel_for over (sample, chunk of voxels) for channels-last and (sample, channel, chunk) for
// contiguous x; the inner loops run over blocks of lcm(C, 16) elements (channels-last: see lane_period)
// or voxels (contiguous), unit stride, in the op type (float for bfloat16 / float16) so that GCC
// vectorises them.
//   forward:  x, weight (C,), bias (C,) -> y (x's dtype and layout), dmean and rstd (N, C) float32
//   backward: grad_y, x, y, weight, dmean, rstd -> grad_x (x's dtype and layout), grad_weight, grad_bias
// Three passes forward (statistics, then y) and two backward, each chunk's sums in float64 at the end.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "instance_norm.h"

namespace expseg {
namespace {

constexpr int64_t kNormChunk = 2048;  // voxels per work item
constexpr int64_t kLanes = 16;        // running sums of a contiguous reduction

// Element reads and writes in the op type. bfloat16 by its bits, branch-free (rounding to nearest even,
// NaN kept), so that GCC vectorises the loops: c10::BFloat16's own conversion does not vectorise.
template <typename T>
inline at::opmath_type<T> to_acc(T v) {
  return at::opmath_type<T>(v);
}
inline float to_acc(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename A>
inline void put(T* p, A v) {
  *p = T(v);
}
inline void put(c10::BFloat16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p->x = uint16_t((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// s of every (n, c): its first voxel, in the op type.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> first_voxels(const scalar_t* x, const NormGeometry& g) {
  std::vector<acc_t> first(g.N * g.C);
  for (int64_t nc = 0; nc < g.N * g.C; ++nc) first[nc] = to_acc(x[g.at(nc / g.C, nc % g.C, 0)]);
  return first;
}

// Channels-last chunks as long flat runs: a chunk of voxels [v0, v1) of sample n is (v1 - v0) * C
// contiguous elements, walked in blocks of P = lcm(C, 16) elements (whole voxels, whole 16-float
// vectors), lane j of a block holding channel j % C. Per-channel values are tiled over the P lanes once,
// so every inner loop is unit-stride and P long whatever C is (rows of 12 or 24 channels were too short
// for GCC's vectoriser).
inline int64_t lane_period(int64_t C) {
  return std::lcm(C, int64_t(16));
}

// (N * P) lanes: per sample n, lane j holds per_nc[n * C + j % C].
template <typename acc_t>
std::vector<acc_t> tiled(const acc_t* per_nc, const NormGeometry& g, int64_t P) {
  std::vector<acc_t> lanes(g.N * P);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t j = 0; j < P; ++j) lanes[n * P + j] = per_nc[n * g.C + j % g.C];
  return lanes;
}

// Each channel's lanes summed (in double) into out[c * stride].
template <typename acc_t>
void fold_lanes(const acc_t* lanes, int64_t P, int64_t C, double* out, int64_t stride) {
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0.0;
    for (int64_t j = c; j < P; j += C) sum += double(lanes[j]);
    out[c * stride] = sum;
  }
}

// f(offset, count) for the blocks of P lanes of a channels-last chunk of `length` elements.
template <typename F>
inline void for_blocks(int64_t length, int64_t P, F f) {
  for (int64_t b = 0; b < length; b += P) f(b, std::min(P, length - b));
}

// Forward partials: per (n, c, chunk), sums of d = x - s and d^2, s = x[n, c, 0].
template <typename scalar_t, typename acc_t>
void stat_partials(const scalar_t* x, const NormGeometry& g, double* parts) {
  const int64_t chunks = g.chunks(kNormChunk);
  if (g.channels_last) {
    const int64_t P = lane_period(g.C);
    const std::vector<acc_t> shifts = tiled(first_voxels<scalar_t, acc_t>(x, g).data(), g, P);
    at::parallel_for(0, g.N * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(P), sq(P);
      acc_t* su = sum.data();
      acc_t* sqr = sq.data();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, k = item % chunks;
        const int64_t v0 = k * kNormChunk, v1 = std::min(g.V, v0 + kNormChunk);
        const acc_t* shift = shifts.data() + n * P;
        const scalar_t* base = x + g.at(n, 0, v0);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        std::fill(sq.begin(), sq.end(), acc_t(0));
        for_blocks((v1 - v0) * g.C, P, [&](int64_t b, int64_t count) {
#pragma omp simd
          for (int64_t j = 0; j < count; ++j) {
            const acc_t d = to_acc(base[b + j]) - shift[j];
            su[j] += d;
            sqr[j] += d * d;
          }
        });
        double* out = parts + (n * g.C * chunks + k) * kPartCols;
        fold_lanes(su, P, g.C, out + kPartSum, chunks * kPartCols);
        fold_lanes(sqr, P, g.C, out + kPartSq, chunks * kPartCols);
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.C * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nc = item / chunks, k = item % chunks;
      const int64_t v0 = k * kNormChunk, v1 = std::min(g.V, v0 + kNormChunk);
      const scalar_t* row = x + nc * g.V;
      const acc_t shift = to_acc(row[0]);
      acc_t sum = 0, sq = 0;
#pragma omp simd reduction(+ : sum, sq)
      for (int64_t v = v0; v < v1; ++v) {
        const acc_t d = to_acc(row[v]) - shift;
        sum += d;
        sq += d * d;
      }
      parts[item * kPartCols + kPartSum] = double(sum);
      parts[item * kPartCols + kPartSq] = double(sq);
    }
  });
}

// Backward partials: per (n, c, chunk), A = sum g and B = sum g * xhat (g masked by y > 0 for ReLU).
template <typename scalar_t, typename acc_t>
void grad_partials(const scalar_t* gy, const scalar_t* x, const scalar_t* y, const acc_t* first, const acc_t* dmean,
                   const acc_t* rstd, const NormGeometry& g, bool relu, double* parts) {
  const int64_t chunks = g.chunks(kNormChunk);
  if (g.channels_last) {
    const int64_t P = lane_period(g.C);
    const std::vector<acc_t> ls = tiled(first, g, P), ld = tiled(dmean, g, P), lr = tiled(rstd, g, P);
    at::parallel_for(0, g.N * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum_a(P), sum_b(P);
      acc_t* sa = sum_a.data();
      acc_t* sb = sum_b.data();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, k = item % chunks;
        const int64_t v0 = k * kNormChunk, v1 = std::min(g.V, v0 + kNormChunk);
        const acc_t* s = ls.data() + n * P;
        const acc_t* d = ld.data() + n * P;
        const acc_t* r = lr.data() + n * P;
        const int64_t o = g.at(n, 0, v0);
        std::fill(sum_a.begin(), sum_a.end(), acc_t(0));
        std::fill(sum_b.begin(), sum_b.end(), acc_t(0));
        for_blocks((v1 - v0) * g.C, P, [&](int64_t b, int64_t count) {
#pragma omp simd
          for (int64_t j = 0; j < count; ++j) {
            const acc_t grad = relu_grad(to_acc(gy[o + b + j]), to_acc(y[o + b + j]), relu);
            sa[j] += grad;
            sb[j] += grad * centred(to_acc(x[o + b + j]), s[j], d[j]) * r[j];
          }
        });
        double* out = parts + (n * g.C * chunks + k) * kPartCols;
        fold_lanes(sa, P, g.C, out + kPartSum, chunks * kPartCols);
        fold_lanes(sb, P, g.C, out + kPartSq, chunks * kPartCols);
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.C * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nc = item / chunks, k = item % chunks;
      const int64_t v0 = k * kNormChunk, v1 = std::min(g.V, v0 + kNormChunk);
      const int64_t o = nc * g.V;
      const acc_t s = first[nc], d = dmean[nc], r = rstd[nc];
      // kLanes running sums, not an omp simd reduction: GCC leaves a reduction over a select (the ReLU
      // mask) scalar, and vectorises lanes as it does the channels-last loops
      acc_t sa[kLanes] = {}, sb[kLanes] = {};
      int64_t v = v0;
      for (; v + kLanes <= v1; v += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const acc_t grad = relu_grad(to_acc(gy[o + v + j]), to_acc(y[o + v + j]), relu);
          sa[j] += grad;
          sb[j] += grad * centred(to_acc(x[o + v + j]), s, d) * r;
        }
      }
      for (; v < v1; ++v) {
        const acc_t grad = relu_grad(to_acc(gy[o + v]), to_acc(y[o + v]), relu);
        sa[0] += grad;
        sb[0] += grad * centred(to_acc(x[o + v]), s, d) * r;
      }
      double ta = 0.0, tb = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) {
        ta += double(sa[j]);
        tb += double(sb[j]);
      }
      parts[item * kPartCols + kPartSum] = ta;
      parts[item * kPartCols + kPartSq] = tb;
    }
  });
}

// Applies f(n, c, v0, v1) to every (n, c, run of voxels), split over threads in chunks of kNormChunk
// voxels (all channels of a chunk at once for channels-last).
template <typename F>
void for_chunks(const NormGeometry& g, F f) {
  const int64_t chunks = g.chunks(kNormChunk);
  const int64_t rows = g.channels_last ? g.N : g.N * g.C;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks, k = item % chunks;
      f(row, k * kNormChunk, std::min(g.V, (k + 1) * kNormChunk));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps, bool relu) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be on the CPU");
  const NormGeometry g = norm_geometry(x);
  check_affine(weight, bias, x);
  at::Tensor y = at::empty_like(x);
  at::Tensor dmean = at::empty({g.N, g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = at::empty({g.N, g.C}, x.options().dtype(stat_dtype(x)));
  const int64_t chunks = g.chunks(kNormChunk);
  std::vector<double> parts(g.N * g.C * chunks * kPartCols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "instance_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    stat_partials<scalar_t, acc_t>(xp, g, parts.data());
    const at::Tensor w = weight.to(stat_dtype(x)).contiguous(), b = bias.to(stat_dtype(x)).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    acc_t* dp = dmean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    const std::vector<acc_t> first = first_voxels<scalar_t, acc_t>(xp, g);
    std::vector<acc_t> scale(g.N * g.C);
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
      finish_stats(parts.data() + nc * chunks * kPartCols, chunks, double(g.V), eps, dp + nc, rp + nc);
      scale[nc] = rp[nc] * wp[nc % g.C];
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t P = lane_period(g.C);
    std::vector<acc_t> biases(g.N * g.C);
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) biases[nc] = bp[nc % g.C];
    std::vector<acc_t> ls, ld, lsc, lb;
    if (g.channels_last) {
      ls = tiled(first.data(), g, P), ld = tiled(static_cast<const acc_t*>(dp), g, P);
      lsc = tiled(scale.data(), g, P), lb = tiled(biases.data(), g, P);
    }
    for_chunks(g, [&](int64_t row, int64_t v0, int64_t v1) {
      if (g.channels_last) {
        const acc_t *s = ls.data() + row * P, *d = ld.data() + row * P;
        const acc_t *sc = lsc.data() + row * P, *bi = lb.data() + row * P;
        const int64_t o = g.at(row, 0, v0);
        for_blocks((v1 - v0) * g.C, P, [&](int64_t b, int64_t count) {
          _Pragma("omp simd")  // (a #pragma cannot stand inside the dispatch macro)
          for (int64_t j = 0; j < count; ++j) {
            put(&yp[o + b + j], norm_out(to_acc(xp[o + b + j]), s[j], d[j], sc[j], bi[j], relu));
          }
        });
        return;
      }
      const acc_t s = first[row], d = dp[row], sc = scale[row], bias = bp[row % g.C];
      const int64_t o = row * g.V;
      _Pragma("omp simd")
      for (int64_t v = v0; v < v1; ++v) put(&yp[o + v], norm_out(to_acc(xp[o + v]), s, d, sc, bias, relu));
    });
  });
  return {y, dmean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& y_in, const at::Tensor& weight,
    const at::Tensor& dmean, const at::Tensor& rstd, bool relu) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be on the CPU");
  const NormGeometry g = norm_geometry(x);
  const at::Tensor y = like_x(y_in, x);
  check_stats(dmean, rstd, g, x);
  const at::Tensor grad_y = like_x(grad_y_in, x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::zeros({g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor grad_b = at::zeros({g.C}, x.options().dtype(stat_dtype(x)));
  const int64_t chunks = g.chunks(kNormChunk);
  std::vector<double> parts(g.N * g.C * chunks * kPartCols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "instance_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* dp = dmean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    const std::vector<acc_t> first = first_voxels<scalar_t, acc_t>(xp, g);
    grad_partials<scalar_t, acc_t>(gyp, xp, yp, first.data(), dp, rp, g, relu, parts.data());
    const at::Tensor w = weight.to(stat_dtype(x)).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* gwp = grad_w.data_ptr<acc_t>();
    acc_t* gbp = grad_b.data_ptr<acc_t>();
    std::vector<acc_t> k(g.N * g.C), a_v(g.N * g.C), b_v(g.N * g.C);
    std::vector<double> sum_a(g.C, 0.0), sum_b(g.C, 0.0);
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
      const int64_t c = nc % g.C;
      double a, b;
      finish_grad_sums(parts.data() + nc * chunks * kPartCols, chunks, &a, &b);
      sum_a[c] += a;
      sum_b[c] += b;
      k[nc] = rp[nc] * wp[c];
      a_v[nc] = acc_t(a / double(g.V));
      b_v[nc] = acc_t(b / double(g.V));
    }
    for (int64_t c = 0; c < g.C; ++c) {
      gwp[c] = acc_t(sum_b[c]);
      gbp[c] = acc_t(sum_a[c]);
    }
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const int64_t P = lane_period(g.C);
    std::vector<acc_t> ls, ld, lr, lk, la, lb;
    if (g.channels_last) {
      ls = tiled(first.data(), g, P), ld = tiled(dp, g, P), lr = tiled(rp, g, P);
      lk = tiled(k.data(), g, P), la = tiled(a_v.data(), g, P), lb = tiled(b_v.data(), g, P);
    }
    for_chunks(g, [&](int64_t row, int64_t v0, int64_t v1) {
      if (g.channels_last) {
        const acc_t *s = ls.data() + row * P, *d = ld.data() + row * P, *r = lr.data() + row * P;
        const acc_t *kk = lk.data() + row * P, *av = la.data() + row * P, *bv = lb.data() + row * P;
        const int64_t o = g.at(row, 0, v0);
        for_blocks((v1 - v0) * g.C, P, [&](int64_t b, int64_t count) {
          _Pragma("omp simd")
          for (int64_t j = 0; j < count; ++j) {
            const acc_t grad = relu_grad(to_acc(gyp[o + b + j]), to_acc(yp[o + b + j]), relu);
            const acc_t xhat = centred(to_acc(xp[o + b + j]), s[j], d[j]) * r[j];
            put(&gxp[o + b + j], norm_grad(grad, xhat, kk[j], av[j], bv[j]));
          }
        });
        return;
      }
      const int64_t o = row * g.V;
      const acc_t s = first[row], d = dp[row], r = rp[row], kk = k[row], av = a_v[row], bv = b_v[row];
      _Pragma("omp simd")
      for (int64_t v = v0; v < v1; ++v) {
        const acc_t grad = relu_grad(to_acc(gyp[o + v]), to_acc(yp[o + v]), relu);
        put(&gxp[o + v], norm_grad(grad, centred(to_acc(xp[o + v]), s, d) * r, kk, av, bv));
      }
    });
  });
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expseg_fast, m) {
  m.def("instance_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "instance_norm_backward(Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor dmean, Tensor rstd, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expseg_fast, CPU, m) {
  m.impl("instance_norm_forward", &instance_norm_forward_cpu);
  m.impl("instance_norm_backward", &instance_norm_backward_cpu);
}

}  // namespace expseg
