// CUDA implementation of expseg_fast::instance_norm_forward / instance_norm_backward (the math in
// ../instance_norm.h). Deterministic: every sum has a fixed order.
//   partial sums: one block per (row, chunk of kChunk voxels); a row is a sample (channels-last, all C
//     channels at once: the block is a multiple of C threads, so each thread keeps one channel) or a
//     (sample, channel) (contiguous); per-thread sums in the op type, then per channel in order, written
//     as float64 chunk partials;
//   per (n, c): the chunk partials summed in float64 (statistics, or A and B backward);
//   elementwise: y forward, dL/dx backward, a thread per element;
//   per channel: dL/dw and dL/db summed over the samples.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../instance_norm.h"

namespace expseg {
namespace {

constexpr int64_t kChunk = 4096;  // voxels per block of the partial sums
constexpr int kThreads = 256;

// Threads per block of the partial sums: the most multiples of C that fit kThreads (C itself above it).
int sum_threads(const NormGeometry& g) {
  return g.channels_last ? int(g.C * std::max<int64_t>(1, kThreads / g.C)) : kThreads;
}

// (x - s, (x - s)^2) of element i of (n, c): the forward statistics.
template <typename scalar_t, typename acc_t>
struct StatTerms {
  const scalar_t* x;
  NormGeometry g;
  __device__ void operator()(int64_t n, int64_t c, int64_t i, acc_t* a, acc_t* b) const {
    const acc_t d = acc_t(x[i]) - acc_t(x[g.at(n, c, 0)]);
    *a = d;
    *b = d * d;
  }
};

// (g, g * xhat) of element i of (n, c): the backward sums A and B.
template <typename scalar_t, typename acc_t>
struct GradTerms {
  const scalar_t *gy, *x, *y;
  const acc_t *dmean, *rstd;
  NormGeometry g;
  bool relu;
  __device__ void operator()(int64_t n, int64_t c, int64_t i, acc_t* a, acc_t* b) const {
    const int64_t nc = n * g.C + c;
    const acc_t grad = relu_grad(acc_t(gy[i]), acc_t(y[i]), relu);
    *a = grad;
    *b = grad * centred(acc_t(x[i]), acc_t(x[g.at(n, c, 0)]), dmean[nc]) * rstd[nc];
  }
};

// Block (row, chunk k): the chunk's sums of terms, per channel, into parts[((n C + c) chunks + k) 2 + col].
template <typename acc_t, typename Terms>
__global__ void chunk_sums(Terms terms, NormGeometry g, int64_t chunks, double* parts) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* sa = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* sb = sa + blockDim.x;
  const int64_t row = blockIdx.x / chunks, k = blockIdx.x % chunks;
  const int64_t v0 = k * kChunk, v1 = min(g.V, v0 + kChunk);
  const int t = threadIdx.x;
  acc_t a = 0, b = 0;
  if (g.channels_last) {  // row = n; thread t keeps channel t % C, voxels v0 + t / C + j * lanes
    const int64_t c = t % g.C, lanes = blockDim.x / g.C;
    for (int64_t v = v0 + t / g.C; v < v1; v += lanes) {
      acc_t da, db;
      terms(row, c, g.at(row, c, v), &da, &db);
      a += da;
      b += db;
    }
  } else {  // row = n C + c
    for (int64_t v = v0 + t; v < v1; v += blockDim.x) {
      acc_t da, db;
      terms(row / g.C, row % g.C, row * g.V + v, &da, &db);
      a += da;
      b += db;
    }
  }
  sa[t] = a;
  sb[t] = b;
  __syncthreads();
  if (g.channels_last) {
    if (t < g.C) {
      double ta = 0.0, tb = 0.0;
      for (int j = t; j < blockDim.x; j += g.C) {
        ta += double(sa[j]);
        tb += double(sb[j]);
      }
      double* out = parts + ((row * g.C + t) * chunks + k) * kPartCols;
      out[kPartSum] = ta;
      out[kPartSq] = tb;
    }
    return;
  }
  for (int half = blockDim.x / 2; half > 0; half /= 2) {  // blockDim.x: a power of two here
    if (t < half) {
      sa[t] += sa[t + half];
      sb[t] += sb[t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    parts[(row * chunks + k) * kPartCols + kPartSum] = double(sa[0]);
    parts[(row * chunks + k) * kPartCols + kPartSq] = double(sb[0]);
  }
}

template <typename acc_t>
__global__ void finish_stats_kernel(const double* parts, int64_t count, int64_t chunks, int64_t V, double eps,
                                    acc_t* dmean, acc_t* rstd) {
  const int64_t nc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (nc < count) finish_stats(parts + nc * chunks * kPartCols, chunks, double(V), eps, dmean + nc, rstd + nc);
}

// Per (n, c): k = r w_c, A / V, B / V into coef[nc * 3 ...]; A and B kept in sums[nc * 2 ...].
template <typename acc_t>
__global__ void finish_grad_kernel(const double* parts, NormGeometry g, int64_t chunks, const acc_t* rstd,
                                   const acc_t* weight, acc_t* coef, double* sums) {
  const int64_t nc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (nc >= g.N * g.C) return;
  double a, b;
  finish_grad_sums(parts + nc * chunks * kPartCols, chunks, &a, &b);
  coef[nc * 3] = rstd[nc] * weight[nc % g.C];
  coef[nc * 3 + 1] = acc_t(a / double(g.V));
  coef[nc * 3 + 2] = acc_t(b / double(g.V));
  sums[nc * 2] = a;
  sums[nc * 2 + 1] = b;
}

template <typename acc_t>
__global__ void affine_grad_kernel(const double* sums, NormGeometry g, acc_t* grad_w, acc_t* grad_b) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= g.C) return;
  double a = 0.0, b = 0.0;
  for (int64_t n = 0; n < g.N; ++n) {
    a += sums[(n * g.C + c) * 2];
    b += sums[(n * g.C + c) * 2 + 1];
  }
  grad_w[c] = acc_t(b);
  grad_b[c] = acc_t(a);
}

// (n, c) of the element at memory offset i.
__device__ __forceinline__ void element_nc(const NormGeometry& g, int64_t i, int64_t* n, int64_t* c) {
  if (g.channels_last) {
    *c = i % g.C;
    *n = i / (g.V * g.C);
  } else {
    *c = (i / g.V) % g.C;
    *n = i / (g.V * g.C);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(const scalar_t* x, NormGeometry g, const acc_t* dmean, const acc_t* rstd,
                                 const acc_t* weight, const acc_t* bias, bool relu, scalar_t* y) {
  const int64_t total = g.N * g.C * g.V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c;
    element_nc(g, i, &n, &c);
    const int64_t nc = n * g.C + c;
    y[i] = scalar_t(norm_out(acc_t(x[i]), acc_t(x[g.at(n, c, 0)]), dmean[nc], rstd[nc] * weight[c], bias[c], relu));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* y, NormGeometry g,
                                  const acc_t* dmean, const acc_t* rstd, const acc_t* coef, bool relu,
                                  scalar_t* gx) {
  const int64_t total = g.N * g.C * g.V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c;
    element_nc(g, i, &n, &c);
    const int64_t nc = n * g.C + c;
    const acc_t grad = relu_grad(acc_t(gy[i]), acc_t(y[i]), relu);
    const acc_t xhat = centred(acc_t(x[i]), acc_t(x[g.at(n, c, 0)]), dmean[nc]) * rstd[nc];
    gx[i] = scalar_t(norm_grad(grad, xhat, coef[nc * 3], coef[nc * 3 + 1], coef[nc * 3 + 2]));
  }
}

int elementwise_blocks(const NormGeometry& g) {
  const int64_t blocks = (g.N * g.C * g.V + kThreads - 1) / kThreads;
  return int(std::min<int64_t>(blocks, 65535 * 8));
}

template <typename acc_t, typename Terms>
void launch_sums(const Terms& terms, const NormGeometry& g, double* parts, cudaStream_t stream) {
  const int64_t chunks = g.chunks(kChunk);
  const int64_t rows = g.channels_last ? g.N : g.N * g.C;
  const int threads = sum_threads(g);
  chunk_sums<acc_t><<<rows * chunks, threads, 2 * threads * sizeof(acc_t), stream>>>(terms, g, chunks, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                          const at::Tensor& bias, double eps,
                                                                          bool relu) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be on a CUDA device");
  const NormGeometry g = norm_geometry(x);
  check_affine(weight, bias, x);
  TORCH_CHECK_VALUE(!g.channels_last || g.C <= 1024, "channels-last x takes at most 1024 channels on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y = at::empty_like(x);
  at::Tensor dmean = at::empty({g.N, g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = at::empty({g.N, g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor parts = at::empty({g.N * g.C * g.chunks(kChunk) * kPartCols}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "instance_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    launch_sums<acc_t>(StatTerms<scalar_t, acc_t>{xp, g}, g, parts.data_ptr<double>(), stream);
    const int64_t count = g.N * g.C;
    finish_stats_kernel<acc_t><<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        parts.const_data_ptr<double>(), count, g.chunks(kChunk), g.V, eps, dmean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor w = weight.to(stat_dtype(x)).contiguous(), b = bias.to(stat_dtype(x)).contiguous();
    normalize_kernel<scalar_t, acc_t><<<elementwise_blocks(g), kThreads, 0, stream>>>(
        xp, g, dmean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), relu, y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, dmean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& y_in, const at::Tensor& weight,
    const at::Tensor& dmean, const at::Tensor& rstd, bool relu) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be on a CUDA device");
  const NormGeometry g = norm_geometry(x);
  check_stats(dmean, rstd, g, x);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad_y = like_x(grad_y_in, x), y = like_x(y_in, x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty({g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor grad_b = at::empty({g.C}, x.options().dtype(stat_dtype(x)));
  at::Tensor parts = at::empty({g.N * g.C * g.chunks(kChunk) * kPartCols}, x.options().dtype(at::kDouble));
  at::Tensor coef = at::empty({g.N * g.C * 3}, x.options().dtype(stat_dtype(x)));
  at::Tensor sums = at::empty({g.N * g.C * 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "instance_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* dp = dmean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    launch_sums<acc_t>(GradTerms<scalar_t, acc_t>{gyp, xp, yp, dp, rp, g, relu}, g, parts.data_ptr<double>(), stream);
    const at::Tensor w = weight.to(stat_dtype(x)).contiguous();
    const int64_t count = g.N * g.C;
    finish_grad_kernel<acc_t><<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        parts.const_data_ptr<double>(), g, g.chunks(kChunk), rp, w.const_data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
        sums.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    affine_grad_kernel<acc_t><<<(g.C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        sums.const_data_ptr<double>(), g, grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    input_grad_kernel<scalar_t, acc_t><<<elementwise_blocks(g), kThreads, 0, stream>>>(
        gyp, xp, yp, g, dp, rp, coef.const_data_ptr<acc_t>(), relu, grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(expseg_fast, CUDA, m) {
  m.impl("instance_norm_forward", &instance_norm_forward_cuda);
  m.impl("instance_norm_backward", &instance_norm_backward_cuda);
}

}  // namespace expseg
