// CPU implementation of expseg_fast::instance_norm_forward / instance_norm_backward (instance norm with
// a learned scale and shift, then optionally ReLU; the math in instance_norm.h), threaded with
// at::parallel_for over (sample, chunk of voxels) for channels-last and (sample, channel, chunk) for
// contiguous x; each chunk's inner loop is a "run" (below): explicit vectors of 16 floats, compiled for
// AVX-512, AVX2 and the baseline and chosen at load time, in the op type (float for bfloat16 / float16).
//   forward:  x, weight (C,), bias (C,) -> y (x's dtype and layout), dmean and rstd (N, C) float32
//   backward: grad_y, x, y, weight, dmean, rstd -> grad_x (x's dtype and layout), grad_weight, grad_bias
// Two passes each way (sums, then the elements), each chunk's sums in float64 at the end.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_vectors.h"
#include "instance_norm.h"

namespace expseg {
namespace {

constexpr int64_t kNormChunk = 2048;  // voxels per work item

// Element reads and writes in the op type. bfloat16 by its bits, branch-free (rounding to nearest even,
// NaN kept); the runs below do the same on whole vectors.
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

// ---- Runs: the four passes' inner loops ----
// A run is `length` consecutive elements of x (and grad_y, y, grad_x at the same offsets) whose element j
// takes its per-(n, c) values from lane j % P of tiles of P values, P a multiple of kW: channels-last, a
// chunk of whole voxels with P = lcm(C, kW) and lane j holding channel j % C; contiguous, a chunk of one
// (n, c)'s voxels with P = kW and every lane the same value. Sums go to P running lanes. Whole vectors of
// kW floats are written with GCC's vector extensions, so they do not depend on the auto-vectoriser (which
// left a run scalar and branchy whenever it was inlined into a caller without OpenMP's outlining); the
// tail runs the same math per element. Each run for float and bfloat16 is compiled for AVX-512, AVX2 and
// the baseline, the best chosen at load time (target_clones); other dtypes run the per-element code.
constexpr int64_t kW = 16;
typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kW * sizeof(int32_t))));
typedef uint32_t vbits __attribute__((vector_size(kW * sizeof(uint32_t))));
typedef uint16_t vhalfbits __attribute__((vector_size(kW * sizeof(uint16_t))));

// Vector helpers (EXPSEG_VEC, EXPSEG_CLONES: cpu_vectors.h).

EXPSEG_VEC vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
EXPSEG_VEC vfloat vload(const c10::BFloat16* p) {
  vhalfbits h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vbits) << 16);
}
EXPSEG_VEC void vstore(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
EXPSEG_VEC void vstore(c10::BFloat16* p, vfloat v) {  // as put(): nearest even, NaN kept
  const vbits bits = reinterpret_cast<vbits>(v);
  const vbits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vbits nan = reinterpret_cast<vbits>((bits & 0x7FFFFFFFu) > 0x7F800000u);
  const vhalfbits h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), vhalfbits);
  std::memcpy(p, &h, sizeof(h));
}
// v where keep is all ones, 0 where it is 0.
EXPSEG_VEC vfloat vkeep(vfloat v, vint keep) {
  return reinterpret_cast<vfloat>(reinterpret_cast<vint>(v) & keep);
}
// All ones where ReLU lets v through (as torch's: v <= 0 -> 0, NaN kept); every lane without ReLU.
EXPSEG_VEC vint vpass(vfloat v, bool relu) {
  const vfloat zero = {};
  return relu ? ~(v <= zero) : ~vint{};
}
template <typename T>
constexpr bool kVectorRuns = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// The loop of a run: vector(j, t) for each whole vector (element j, its lanes' values at t; float and
// bfloat16 only), then element(j, t) for the tail (every element for other dtypes). The bodies are
// always-inlined lambdas, compiled with the calling clone's instructions.
template <typename T, typename V, typename E>
EXPSEG_VEC void run_loop(int64_t length, int64_t P, V vector, E element) {
  int64_t j = 0;
  if constexpr (kVectorRuns<T>) {
    for (; j + kW <= length; j += kW) vector(j, j % P);
  }
  for (; j < length; ++j) element(j, j % P);
}
#define EXPSEG_BODY [&](int64_t j, int64_t t) __attribute__((always_inline))
// The vector body: generic (auto j, t), so that it is compiled only where run_loop calls it (float, bfloat16).
#define EXPSEG_VECTOR_BODY [&](auto j, auto t) __attribute__((always_inline))

// Sums of x - s and (x - s)^2 into sum and sq (P lanes each).
template <typename T, typename A>
EXPSEG_VEC void stat_run_impl(const T* x, int64_t length, int64_t P, const A* s, A* sum, A* sq) {
  run_loop<T>(
      length, P,
      EXPSEG_VECTOR_BODY {
        const vfloat d = vload(x + j) - vload(s + t);
        vstore(sum + t, vload(sum + t) + d);
        vstore(sq + t, vload(sq + t) + d * d);
      },
      EXPSEG_BODY {
        const A d = to_acc(x[j]) - s[t];
        sum[t] += d;
        sq[t] += d * d;
      });
}

// y = relu(((x - s) - d) * scale + bias).
template <typename T, typename A>
EXPSEG_VEC void forward_run_impl(const T* x, T* y, int64_t length, int64_t P, const A* s, const A* d,
                                 const A* scale, const A* bias, bool relu) {
  run_loop<T>(
      length, P,
      EXPSEG_VECTOR_BODY {
        const vfloat v = ((vload(x + j) - vload(s + t)) - vload(d + t)) * vload(scale + t) + vload(bias + t);
        vstore(y + j, vkeep(v, vpass(v, relu)));
      },
      EXPSEG_BODY { put(&y[j], norm_out(to_acc(x[j]), s[t], d[t], scale[t], bias[t], relu)); });
}

// The backward's two vectors at element j (lanes' values at t): g = grad_y where y passes the ReLU, and
// xhat = ((x - s) - d) * r.
template <typename T>
EXPSEG_VEC void vgrad_and_xhat(const T* gy, const T* x, const T* y, const float* s, const float* d, const float* r,
                               int64_t j, int64_t t, bool relu, vfloat& g, vfloat& xhat) {
  g = vkeep(vload(gy + j), vpass(vload(y + j), relu));
  xhat = ((vload(x + j) - vload(s + t)) - vload(d + t)) * vload(r + t);
}

// A += g and B += g * xhat, g = grad_y where y passes the ReLU, xhat = ((x - s) - d) * r.
template <typename T, typename A>
EXPSEG_VEC void grad_run_impl(const T* gy, const T* x, const T* y, int64_t length, int64_t P, const A* s,
                              const A* d, const A* r, A* sa, A* sb, bool relu) {
  run_loop<T>(
      length, P,
      EXPSEG_VECTOR_BODY {
        vfloat g, xhat;
        vgrad_and_xhat(gy, x, y, s, d, r, j, t, relu, g, xhat);
        vstore(sa + t, vload(sa + t) + g);
        vstore(sb + t, vload(sb + t) + g * xhat);
      },
      EXPSEG_BODY {
        const A grad = relu_grad(to_acc(gy[j]), to_acc(y[j]), relu);
        sa[t] += grad;
        sb[t] += grad * centred(to_acc(x[j]), s[t], d[t]) * r[t];
      });
}

// grad_x = k (g - a_v - xhat b_v).
template <typename T, typename A>
EXPSEG_VEC void backward_run_impl(const T* gy, const T* x, const T* y, T* gx, int64_t length, int64_t P,
                                  const A* s, const A* d, const A* r, const A* k, const A* av, const A* bv,
                                  bool relu) {
  run_loop<T>(
      length, P,
      EXPSEG_VECTOR_BODY {
        vfloat g, xhat;
        vgrad_and_xhat(gy, x, y, s, d, r, j, t, relu, g, xhat);
        vstore(gx + j, vload(k + t) * (g - vload(av + t) - xhat * vload(bv + t)));
      },
      EXPSEG_BODY {
        const A grad = relu_grad(to_acc(gy[j]), to_acc(y[j]), relu);
        put(&gx[j], norm_grad(grad, centred(to_acc(x[j]), s[t], d[t]) * r[t], k[t], av[t], bv[t]));
      });
}
#undef EXPSEG_BODY
#undef EXPSEG_VECTOR_BODY

// The runs for one dtype: float and bfloat16 through their clones, others per element.
#define EXPSEG_RUNS(T, A, ATTR)                                                                               \
  ATTR void stat_run(const T* x, int64_t n, int64_t P, const A* s, A* sum, A* sq) {                         \
    stat_run_impl(x, n, P, s, sum, sq);                                                                     \
  }                                                                                                         \
  ATTR void forward_run(const T* x, T* y, int64_t n, int64_t P, const A* s, const A* d, const A* sc,        \
                        const A* b, bool relu) {                                                            \
    forward_run_impl(x, y, n, P, s, d, sc, b, relu);                                                        \
  }                                                                                                         \
  ATTR void grad_run(const T* gy, const T* x, const T* y, int64_t n, int64_t P, const A* s, const A* d,    \
                     const A* r, A* sa, A* sb, bool relu) {                                                 \
    grad_run_impl(gy, x, y, n, P, s, d, r, sa, sb, relu);                                                   \
  }                                                                                                         \
  ATTR void backward_run(const T* gy, const T* x, const T* y, T* gx, int64_t n, int64_t P, const A* s,     \
                         const A* d, const A* r, const A* k, const A* av, const A* bv, bool relu) {         \
    backward_run_impl(gy, x, y, gx, n, P, s, d, r, k, av, bv, relu);                                        \
  }
EXPSEG_RUNS(float, float, EXPSEG_CLONES)
EXPSEG_RUNS(c10::BFloat16, float, EXPSEG_CLONES)
EXPSEG_RUNS(c10::Half, float, inline)
EXPSEG_RUNS(double, double, inline)
#undef EXPSEG_RUNS

// Per-channel values tiled over P lanes: channels-last, per sample n, lane j holds per_nc[n * C + j % C]
// (N * P values); contiguous, per (n, c), every one of kW lanes holds per_nc[n * C + c] (N * C * kW).
template <typename acc_t>
std::vector<acc_t> tiled(const acc_t* per_nc, const NormGeometry& g) {
  const int64_t P = g.channels_last ? std::lcm(g.C, kW) : kW;
  const int64_t rows = g.channels_last ? g.N : g.N * g.C;
  std::vector<acc_t> lanes(rows * P);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < P; ++j) lanes[row * P + j] = per_nc[g.channels_last ? row * g.C + j % g.C : row];
  return lanes;
}

// A chunk of work: `row` (channels-last: sample n; contiguous: (n, c)), voxels [v0, v1), chunk index k.
struct Chunk {
  int64_t row, k, offset, length;  // offset and length in elements
};

// f(chunk, P) for every chunk of kNormChunk voxels (all channels of it for channels-last), over threads.
template <typename F>
void for_chunks(const NormGeometry& g, F f) {
  const int64_t chunks = g.chunks(kNormChunk);
  const int64_t rows = g.channels_last ? g.N : g.N * g.C;
  const int64_t P = g.channels_last ? std::lcm(g.C, kW) : kW;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks, k = item % chunks;
      const int64_t v0 = k * kNormChunk, v1 = std::min(g.V, v0 + kNormChunk);
      const int64_t offset = g.channels_last ? g.at(row, 0, v0) : g.at(row / g.C, row % g.C, v0);
      f(Chunk{row, k, offset, (v1 - v0) * (g.channels_last ? g.C : 1)}, P);
    }
  });
}

// Each (n, c)'s sum over its P running lanes (in double) into the chunk's column of the partials.
template <typename acc_t>
void fold_lanes(const acc_t* lanes, const NormGeometry& g, const Chunk& ch, int64_t P, double* parts, int col) {
  const int64_t chunks = g.chunks(kNormChunk);
  const int64_t per_row = g.channels_last ? g.C : 1;
  for (int64_t c = 0; c < per_row; ++c) {
    double sum = 0.0;
    for (int64_t j = c; j < P; j += per_row) sum += double(lanes[j]);
    parts[((ch.row * per_row + c) * chunks + ch.k) * kPartCols + col] = sum;
  }
}

// Forward partials: per (n, c, chunk), sums of x - s and (x - s)^2, s = x[n, c, 0].
template <typename scalar_t, typename acc_t>
void stat_partials(const scalar_t* x, const acc_t* first, const NormGeometry& g, double* parts) {
  const std::vector<acc_t> shifts = tiled(first, g);
  for_chunks(g, [&](const Chunk& ch, int64_t P) {
    std::vector<acc_t> sum(P, acc_t(0)), sq(P, acc_t(0));
    stat_run(x + ch.offset, ch.length, P, shifts.data() + ch.row * P, sum.data(), sq.data());
    fold_lanes(sum.data(), g, ch, P, parts, kPartSum);
    fold_lanes(sq.data(), g, ch, P, parts, kPartSq);
  });
}

// Backward partials: per (n, c, chunk), A = sum g and B = sum g * xhat (g masked by y > 0 for ReLU).
template <typename scalar_t, typename acc_t>
void grad_partials(const scalar_t* gy, const scalar_t* x, const scalar_t* y, const acc_t* first, const acc_t* dmean,
                   const acc_t* rstd, const NormGeometry& g, bool relu, double* parts) {
  const std::vector<acc_t> ls = tiled(first, g), ld = tiled(dmean, g), lr = tiled(rstd, g);
  for_chunks(g, [&](const Chunk& ch, int64_t P) {
    std::vector<acc_t> sa(P, acc_t(0)), sb(P, acc_t(0));
    const int64_t t = ch.row * P;
    grad_run(gy + ch.offset, x + ch.offset, y + ch.offset, ch.length, P, ls.data() + t, ld.data() + t,
             lr.data() + t, sa.data(), sb.data(), relu);
    fold_lanes(sa.data(), g, ch, P, parts, kPartSum);
    fold_lanes(sb.data(), g, ch, P, parts, kPartSq);
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
    const std::vector<acc_t> first = first_voxels<scalar_t, acc_t>(xp, g);
    stat_partials(xp, first.data(), g, parts.data());
    const at::Tensor w = weight.to(stat_dtype(x)).contiguous(), b = bias.to(stat_dtype(x)).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    acc_t* dp = dmean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    std::vector<acc_t> scale(g.N * g.C), shift(g.N * g.C);
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
      finish_stats(parts.data() + nc * chunks * kPartCols, chunks, double(g.V), eps, dp + nc, rp + nc);
      scale[nc] = rp[nc] * wp[nc % g.C];
      shift[nc] = bp[nc % g.C];
    }
    const std::vector<acc_t> ls = tiled(first.data(), g), ld = tiled(static_cast<const acc_t*>(dp), g);
    const std::vector<acc_t> lsc = tiled(scale.data(), g), lb = tiled(shift.data(), g);
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_chunks(g, [&](const Chunk& ch, int64_t P) {
      const int64_t t = ch.row * P;
      forward_run(xp + ch.offset, yp + ch.offset, ch.length, P, ls.data() + t, ld.data() + t, lsc.data() + t,
                  lb.data() + t, relu);
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
    const std::vector<acc_t> ls = tiled(first.data(), g), ld = tiled(dp, g), lr = tiled(rp, g);
    const std::vector<acc_t> lk = tiled(k.data(), g), la = tiled(a_v.data(), g), lb = tiled(b_v.data(), g);
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    for_chunks(g, [&](const Chunk& ch, int64_t P) {
      const int64_t t = ch.row * P, o = ch.offset;
      backward_run(gyp + o, xp + o, yp + o, gxp + o, ch.length, P, ls.data() + t, ld.data() + t, lr.data() + t,
                   lk.data() + t, la.data() + t, lb.data() + t, relu);
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
