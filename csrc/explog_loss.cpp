// expseg_fast::explog_forward / explog_backward: schema, CPU kernels (OpenMP through
// at::parallel_for) and the Python module stub. The CUDA kernels live in explog_loss.cu.
//
// explog_forward(logits, target, weights, w_dice, w_cross, gamma_dice, gamma_cross, linear_dice,
//                eps) -> (loss, stats, bad)
//   loss  () float32      the scalar loss (float64 for float64 logits)
//   stats (N, C, 4) f64   G, M, Q, T per (sample, label), see explog_math.h
//   bad   (2,) int64      [#voxels whose label is outside [0, C), #voxels with a non-finite logit]
// explog_backward(grad, logits, target, weights, stats, ...) -> grad_logits (logits' dtype and
//   memory format), computed in one pass that recomputes the softmax.
// Voxels with an out-of-range label contribute nothing and get a zero gradient; a non-finite logit
// (NaN or +-Inf) makes the loss NaN. The Python wrapper turns `bad` into a ValueError.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "explog_loss.h"

extern "C" {
// `import expseg_fast._C` loads this library, whose static initializers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace expseg {
namespace {

constexpr int64_t kChunk = 4096;  // voxels per partial sum; partials are reduced in a fixed order
constexpr int kTile = 64;         // voxels processed together, channel by channel (SIMD over voxels)

// Float32 e^x, ln x and x^y written so that loops over a tile vectorise (no libm call, no branch).
// e^x: Cody-Waite range reduction, a degree-6 polynomial on |r| <= ln2 / 2 (relative error ~1e-7),
// the scale 2^n applied in two halves so subnormal results come out right; x is clamped to
// [-104, 88] (so e^x < -104 gives 0). A NaN x gives a finite value: non-finite logits are flagged
// separately and poison the statistics.
inline float exp_clamped(float x) {
  x = x > -104.0f ? x : -104.0f;  // NaN -> -104
  x = x < 88.0f ? x : 88.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int ni = static_cast<int>(n);  // in [-150, 127]
  const int n1 = ni >> 1, n2 = ni - n1;
  const int i1 = (n1 + 127) << 23, i2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &i1, sizeof(float));
  std::memcpy(&s2, &i2, sizeof(float));
  return p * s1 * s2;
}
inline double exp_clamped(double x) { return exp(x); }

// ln x for x > 0, subnormal x included: x = 2^e m with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), by its series to s^9 (|s| <= 0.172: error ~4e-10).
inline float log_positive(float x) {
  const bool tiny = x < 1.17549435e-38f;
  x = tiny ? x * 18446744073709551616.0f : x;  // * 2^64 makes a subnormal normal
  int bits;
  std::memcpy(&bits, &x, sizeof(float));
  int e = ((bits >> 23) & 0xff) - 127;
  const int mbits = (bits & 0x7fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, sizeof(float));
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float q = 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 0.2f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  return 2.0f * s * q + (static_cast<float>(e) - (tiny ? 64.0f : 0.0f)) * 0.693147180559945f;
}

// ln(1 + x) for x >= 0, accurate for small x (Kahan: ln(u) x / (u - 1) with u = 1 + x).
inline float log1p_nonnegative(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  return d == 0.0f ? x : log_positive(u) * (x / d);
}
inline double log1p_nonnegative(double x) { return log1p(x); }

// x^y for x >= 0 (0 for x = 0).
inline float pow_nonnegative(float x, float y) { return x > 0.0f ? exp_clamped(y * log_positive(x)) : 0.0f; }
inline double pow_nonnegative(double x, double y) { return pow(x, y); }

// Softmax of a tile held in buf (C, kTile): on return buf holds exp(z - m); m, arg, S, R and t are
// those of VoxelSoftmax. lab holds labels in [0, C); bad[k] is NaN when a logit is not finite.
template <typename acc_t>
__attribute__((target_clones("avx512f", "avx2", "default"))) void tile_softmax(
    acc_t* __restrict__ buf, int C, const int* __restrict__ lab, acc_t* __restrict__ m, int* __restrict__ arg,
    acc_t* __restrict__ S, acc_t* __restrict__ R, acc_t* __restrict__ t, acc_t* __restrict__ bad) {
  acc_t zl[kTile], S1[kTile];
  for (int k = 0; k < kTile; ++k) {
    m[k] = buf[k];
    arg[k] = 0;
    bad[k] = 0;
    zl[k] = buf[lab[k] * kTile + k];
    S1[k] = 0;
    R[k] = 0;
  }
  for (int c = 0; c < C; ++c) {
    const acc_t* __restrict__ x = buf + c * kTile;
#pragma omp simd
    for (int k = 0; k < kTile; ++k) {
      bad[k] += x[k] - x[k];  // 0 for finite logits, NaN otherwise
      const bool more = x[k] > m[k];
      arg[k] = more ? c : arg[k];
      m[k] = more ? x[k] : m[k];
    }
  }
  for (int c = 0; c < C; ++c) {
    acc_t* __restrict__ x = buf + c * kTile;
#pragma omp simd
    for (int k = 0; k < kTile; ++k) {
      const acc_t e = exp_clamped(x[k] - m[k]);
      x[k] = e;
      S1[k] += e * acc_t(c != arg[k]);  // masks as factors: no branch in the loop
      R[k] += e * acc_t(c != lab[k]);
    }
  }
#pragma omp simd
  for (int k = 0; k < kTile; ++k) {
    S[k] = acc_t(1) + S1[k];
    t[k] = (m[k] - zl[k]) + log1p_nonnegative(S1[k]);
  }
}

// Loads the labels and logits of voxels [v0, v0 + count) of sample n into lab / buf (C, kTile).
// Labels outside [0, C) become 0 with valid = false; the tile's tail is padded with zeros.
template <typename scalar_t, typename label_t, typename acc_t>
void load_tile(const scalar_t* z, const label_t* lab_in, const Geometry& g, int64_t n, int64_t v0, int count,
               acc_t* __restrict__ buf, int* __restrict__ lab, bool* __restrict__ valid) {
  const int C = static_cast<int>(g.C);
  const bool flat_labels = g.flat(g.ts);
  for (int k = 0; k < kTile; ++k) {
    const int64_t at = flat_labels ? n * g.ts[0] + (v0 + k) * g.ts[4] : g.offset(g.ts, n, v0 + k);
    const int64_t label = k < count ? static_cast<int64_t>(lab_in[at]) : -1;
    valid[k] = label >= 0 && label < C;
    lab[k] = valid[k] ? static_cast<int>(label) : 0;
  }
  const int64_t cs = g.zs[1];
  if (g.flat(g.zs)) {  // voxel v at n * zs[0] + v * zs[4]: no index arithmetic per voxel
    const int64_t vs = g.zs[4];
    const scalar_t* base = z + n * g.zs[0] + v0 * vs;
    if (vs == 1) {
      for (int c = 0; c < C; ++c) {
        const scalar_t* __restrict__ row = base + c * cs;
        acc_t* __restrict__ dst = buf + c * kTile;
#pragma omp simd
        for (int k = 0; k < count; ++k) dst[k] = static_cast<acc_t>(row[k]);
      }
    } else {
      for (int k = 0; k < count; ++k)
        for (int c = 0; c < C; ++c) buf[c * kTile + k] = static_cast<acc_t>(base[k * vs + c * cs]);
    }
  } else {
    for (int k = 0; k < count; ++k) {
      const scalar_t* zv = z + g.offset(g.zs, n, v0 + k);
      for (int c = 0; c < C; ++c) buf[c * kTile + k] = static_cast<acc_t>(zv[c * cs]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int k = count; k < kTile; ++k) buf[c * kTile + k] = acc_t(0);
}

// Writes the gradient tile buf (C, kTile) of voxels [v0, v0 + count) of sample n; ignored voxels get 0.
template <typename scalar_t, typename acc_t>
void store_tile(scalar_t* grad, const Geometry& g, int64_t n, int64_t v0, int count, const acc_t* __restrict__ buf,
                const bool* __restrict__ valid) {
  const int C = static_cast<int>(g.C);
  const int64_t cs = g.gz[1];
  if (g.flat(g.gz)) {
    const int64_t vs = g.gz[4];
    scalar_t* base = grad + n * g.gz[0] + v0 * vs;
    if (vs == 1) {
      for (int c = 0; c < C; ++c) {
        scalar_t* __restrict__ row = base + c * cs;
        const acc_t* __restrict__ src = buf + c * kTile;
#pragma omp simd
        for (int k = 0; k < count; ++k) row[k] = static_cast<scalar_t>(valid[k] ? src[k] : acc_t(0));
      }
    } else {
      for (int k = 0; k < count; ++k)
        for (int c = 0; c < C; ++c)
          base[k * vs + c * cs] = static_cast<scalar_t>(valid[k] ? buf[c * kTile + k] : acc_t(0));
    }
  } else {
    for (int k = 0; k < count; ++k) {
      scalar_t* gv = grad + g.offset(g.gz, n, v0 + k);
      for (int c = 0; c < C; ++c) gv[c * cs] = static_cast<scalar_t>(valid[k] ? buf[c * kTile + k] : acc_t(0));
    }
  }
}

template <typename scalar_t, typename label_t>
void forward_chunks(const scalar_t* z, const label_t* lab_in, const Geometry& g, bool need_cross,
                    double gamma_cross, double* partial, int64_t* bad_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_sample = (g.V + kChunk - 1) / kChunk;
  const int C = static_cast<int>(g.C);
  at::parallel_for(0, g.N * per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(C) * kTile);
    acc_t m[kTile], S[kTile], R[kTile], t[kTile], tp[kTile], w[kTile], nonfinite[kTile];
    int lab[kTile], arg[kTile];
    bool valid[kTile];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n = chunk / per_sample;
      const int64_t c0 = (chunk % per_sample) * kChunk;
      const int64_t c1 = std::min(c0 + kChunk, g.V);
      double* st = partial + chunk * C * kStatCols;
      int64_t* bad = bad_partial + chunk * 2;
      for (int64_t v0 = c0; v0 < c1; v0 += kTile) {
        const int count = static_cast<int>(std::min<int64_t>(kTile, c1 - v0));
        load_tile(z, lab_in, g, n, v0, count, buf.data(), lab, valid);
        tile_softmax(buf.data(), C, lab, m, arg, S, R, t, nonfinite);
        for (int k = 0; k < kTile; ++k) w[k] = valid[k] ? acc_t(1) / S[k] : acc_t(0);  // 1/S, 0 if ignored
        for (int c = 0; c < C; ++c) {
          const acc_t* e = buf.data() + c * kTile;
          acc_t q = 0;
#pragma omp simd reduction(+ : q)
          for (int k = 0; k < kTile; ++k) q += e[k] * w[k] * acc_t(c != lab[k]);
          st[c * kStatCols + kStatQ] += q;
        }
        if (need_cross) {
          const acc_t gc = static_cast<acc_t>(gamma_cross);
#pragma omp simd
          for (int k = 0; k < kTile; ++k) tp[k] = pow_nonnegative(t[k], gc);  // t^gamma_cross
        }
        for (int k = 0; k < count; ++k) {
          if (!valid[k]) {
            ++bad[0];
            continue;
          }
          if (nonfinite[k] != nonfinite[k]) ++bad[1];
          double* sl = st + lab[k] * kStatCols;
          sl[kStatG] += 1.0;
          sl[kStatM] += R[k] * w[k] + nonfinite[k];  // NaN for a non-finite logit: the loss is NaN
          if (need_cross) sl[kStatT] += tp[k] + nonfinite[k];
        }
      }
    }
  });
}

// Gradient of a tile (voxel_grad of explog_math.h, vectorised over the tile: the same cross_factors,
// logit_grad spelled out, the softmax from tile_softmax); buf holds
// exp(z - m) on entry and the gradient (C, kTile) on return.
template <typename acc_t>
__attribute__((target_clones("avx512f", "avx2", "default"))) void tile_grad(
    acc_t* __restrict__ buf, int C, const int* __restrict__ lab, const int* __restrict__ arg,
    const acc_t* __restrict__ S, const acc_t* __restrict__ R, const acc_t* __restrict__ t,
    const acc_t* __restrict__ a, const acc_t* __restrict__ b, const acc_t* __restrict__ kappa, acc_t gamma_cross) {
  // Per voxel: the cross part's factors (cross_factors of explog_math.h).
  acc_t inv_S[kTile], g_star[kTile], gbar[kTile] = {}, tg_miss[kTile], tg_pos[kTile], safe_t[kTile];
  acc_t tp[kTile];
#pragma omp simd
  for (int k = 0; k < kTile; ++k) tp[k] = pow_nonnegative(t[k], gamma_cross);  // t^gamma_cross
  for (int k = 0; k < kTile; ++k) {
    inv_S[k] = acc_t(1) / S[k];
    const int l = lab[k];
    g_star[k] = a[arg[k]] - (arg[k] == l ? b[l] : acc_t(0));
    const CrossFactors<acc_t> cross = cross_factors(kappa[l] * tp[k], R[k] * inv_S[k], t[k]);
    tg_miss[k] = cross.label;
    tg_pos[k] = cross.other;
    safe_t[k] = cross.safe_t;
  }
  for (int c = 0; c < C; ++c) {
    acc_t* __restrict__ e = buf + c * kTile;
    const acc_t ac = a[c], bc = b[c];
#pragma omp simd
    for (int k = 0; k < kTile; ++k) {
      const acc_t p = e[k] * inv_S[k];
      e[k] = p;
      const acc_t gc = ac - bc * acc_t(c == lab[k]);
      gbar[k] += p * (gc - g_star[k]) * acc_t(c != arg[k]);
    }
  }
  for (int c = 0; c < C; ++c) {
    acc_t* __restrict__ e = buf + c * kTile;
    const acc_t ac = a[c], bc = b[c];
#pragma omp simd
    for (int k = 0; k < kTile; ++k) {
      const acc_t p = e[k];
      const acc_t lf = acc_t(c == lab[k]), af = acc_t(c == arg[k]);
      const acc_t gc = ac - bc * lf;
      const acc_t dice = p * ((gc - g_star[k]) * (acc_t(1) - af) - gbar[k]);
      // logit_grad of explog_math.h, spelled out: called here, GCC contracts the sum into FMAs
      // differently and the gradient moves by an ulp, which Table 1's exact re-runs would notice.
      e[k] = dice + (c == lab[k] ? -tg_miss[k] : tg_pos[k] * (p / safe_t[k]));
    }
  }
}

template <typename scalar_t, typename label_t>
void backward_tiles(const scalar_t* z, const label_t* lab_in, scalar_t* grad, const Geometry& g,
                    const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                    const at::opmath_type<scalar_t>* kappa, double gamma_cross) {
  using acc_t = at::opmath_type<scalar_t>;
  const int C = static_cast<int>(g.C);
  const int64_t per_sample = (g.V + kTile - 1) / kTile;
  at::parallel_for(0, g.N * per_sample, kChunk / kTile, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(C) * kTile);
    acc_t m[kTile], S[kTile], R[kTile], t[kTile], nonfinite[kTile];
    int lab[kTile], arg[kTile];
    bool valid[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / per_sample, v0 = (tile % per_sample) * kTile;
      const int count = static_cast<int>(std::min<int64_t>(kTile, g.V - v0));
      load_tile(z, lab_in, g, n, v0, count, buf.data(), lab, valid);
      tile_softmax(buf.data(), C, lab, m, arg, S, R, t, nonfinite);
      tile_grad(buf.data(), C, lab, arg, S, R, t, a + n * C, b + n * C, kappa + n * C, static_cast<acc_t>(gamma_cross));
      store_tile(grad, g, n, v0, count, buf.data(), valid);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> explog_forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weights, double w_dice,
    double w_cross, double gamma_dice, double gamma_cross, bool linear_dice, double eps) {
  const Geometry g = make_geometry(logits, target);
  check_weights(weights, g, logits);
  const LossParams p = make_params(w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps);
  const int64_t per_sample = (g.V + kChunk - 1) / kChunk;
  auto partial = at::zeros({g.N, per_sample, g.C, kStatCols}, logits.options().dtype(at::kDouble));
  auto bad_partial = at::zeros({g.N * per_sample, 2}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_forward_cpu", [&] {
    using logit_t = scalar_t;
    EXPSEG_DISPATCH_LABEL_TYPES(target.scalar_type(), "explog_forward_cpu", [&] {
      forward_chunks<logit_t, scalar_t>(logits.const_data_ptr<logit_t>(), target.const_data_ptr<scalar_t>(), g,
                                        w_cross != 0.0, gamma_cross, partial.data_ptr<double>(),
                                        bad_partial.data_ptr<int64_t>());
    });
  });
  // Sum the chunks of each sample in chunk order: the result does not depend on the thread count.
  auto stats = at::zeros({g.N, g.C, kStatCols}, partial.options());
  const double* pp = partial.const_data_ptr<double>();
  double* st = stats.data_ptr<double>();
  const int64_t row = g.C * kStatCols;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < per_sample; ++c)
      for (int64_t k = 0; k < row; ++k) st[n * row + k] += pp[(n * per_sample + c) * row + k];
  auto bad = bad_partial.sum(0);
  auto w = weights.to(at::kDouble).contiguous();
  const double* wp = w.const_data_ptr<double>();
  const double NC = double(g.N * g.C), NV = double(g.N * g.V);
  double loss = 0.0;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t i = 0; i < g.C; ++i) loss += label_loss(st + (n * g.C + i) * kStatCols, wp[i], p, NC, NV);
  return {at::scalar_tensor(loss, logits.options().dtype(loss_dtype(logits))), stats, bad};
}

// Writes d loss / d logits into out from per-(sample, label) coefficients a, b, kappa (N * C each, in
// the logits' op type): the voxel pass shared by explog_backward and explog_coef_backward.
template <typename logit_t>
void backward_from_coefs(const at::Tensor& logits, const at::Tensor& target, at::Tensor& out, const Geometry& g,
                         const at::opmath_type<logit_t>* a, const at::opmath_type<logit_t>* b,
                         const at::opmath_type<logit_t>* kappa, double gamma_cross) {
  EXPSEG_DISPATCH_LABEL_TYPES(target.scalar_type(), "explog_backward_cpu", [&] {
    backward_tiles<logit_t, scalar_t>(logits.const_data_ptr<logit_t>(), target.const_data_ptr<scalar_t>(),
                                       out.data_ptr<logit_t>(), g, a, b, kappa, gamma_cross);
  });
}

at::Tensor explog_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& weights, const at::Tensor& stats, double w_dice, double w_cross,
                               double gamma_dice, double gamma_cross, bool linear_dice, double eps) {
  Geometry g = make_geometry(logits, target);
  check_weights(weights, g, logits);
  check_stats(stats, g);
  const LossParams p = make_params(w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps);
  const double grad = grad_loss.item<double>();
  auto st = stats.contiguous();
  auto w = weights.to(at::kDouble).contiguous();
  auto out = at::empty_like(logits);
  for (int k = 0; k < 5; ++k) g.gz[k] = out.stride(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t NCn = g.N * g.C;
    std::vector<acc_t> a(NCn), b(NCn), kappa(NCn);
    const double* sp = st.const_data_ptr<double>();
    const double* wp = w.const_data_ptr<double>();
    for (int64_t k = 0; k < NCn; ++k) {
      double ak, bk, kk;
      label_coefs(sp + k * kStatCols, wp[k % g.C], p, double(NCn), double(g.N * g.V), grad, &ak, &bk, &kk);
      a[k] = acc_t(ak);
      b[k] = acc_t(bk);
      kappa[k] = acc_t(kk);
    }
    backward_from_coefs<scalar_t>(logits, target, out, g, a.data(), b.data(), kappa.data(), gamma_cross);
  });
  return out;
}

at::Tensor explog_coef_backward_cpu(const at::Tensor& coefs, const at::Tensor& logits, const at::Tensor& target,
                                    double gamma_cross) {
  Geometry g = make_geometry(logits, target);
  check_coefs(coefs, g, logits);
  auto out = at::empty_like(logits);
  for (int k = 0; k < 5; ++k) g.gz[k] = out.stride(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_coef_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor c = coefs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* cp = c.const_data_ptr<acc_t>();
    const int64_t NCn = g.N * g.C;
    backward_from_coefs<scalar_t>(logits, target, out, g, cp, cp + NCn, cp + 2 * NCn, gamma_cross);
  });
  return out;
}

TORCH_LIBRARY(expseg_fast, m) {
  m.def(
      "explog_forward(Tensor logits, Tensor target, Tensor weights, float w_dice, float w_cross, "
      "float gamma_dice, float gamma_cross, bool linear_dice, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "explog_backward(Tensor grad, Tensor logits, Tensor target, Tensor weights, Tensor stats, "
      "float w_dice, float w_cross, float gamma_dice, float gamma_cross, bool linear_dice, float eps) -> Tensor");
  // d loss / d logits of any loss of the statistics, from its coefficients (3, N, C) float64: a = dL/dQ,
  // b = dL/dQ + dL/dM, kappa = gamma_cross * dL/dT (expseg_fast/losses/statistics.py)
  m.def("explog_coef_backward(Tensor coefs, Tensor logits, Tensor target, float gamma_cross) -> Tensor");
}

TORCH_LIBRARY_IMPL(expseg_fast, CPU, m) {
  m.impl("explog_forward", &explog_forward_cpu);
  m.impl("explog_backward", &explog_backward_cpu);
  m.impl("explog_coef_backward", &explog_coef_backward_cpu);
}

}  // namespace expseg
