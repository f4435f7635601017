// CUDA kernels of expseg_fast::explog_forward / explog_backward (schema in explog_loss.cpp).
//
// Forward: a thread per voxel (grid-stride, blockIdx.y = sample). Each block sums its voxels'
// statistics in shared memory (float32; the false-positive mass Q through warp reductions, one
// shuffle tree per label), then adds them to the float64 statistics with one atomic per value: the
// order of those additions varies, so under torch.use_deterministic_algorithms(True) the op raises
// PyTorch's non-determinism alert (the Triton backend reduces in a fixed order then).
// A one-block kernel turns the statistics into the loss without leaving the device.
// Backward: a one-block kernel computes the per-(sample, label) coefficients (scaled by the
// incoming gradient read on the device), then a thread per voxel recomputes the softmax and writes
// the gradient once.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../explog_loss.h"

namespace expseg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

int blocks_per_sample(int64_t V, int64_t N) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (V + kThreads - 1) / kThreads;
  const int64_t cap = std::max<int64_t>(1, (int64_t)sms * 8 / std::max<int64_t>(N, 1));
  return (int)std::max<int64_t>(1, std::min(wanted, cap));
}

template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ z, const label_t* __restrict__ lab,
                                                           Geometry g, bool need_cross, float gamma_cross,
                                                           double* __restrict__ stats, unsigned long long* __restrict__ bad) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ float smem[];  // C * kStatCols block partials
  __shared__ unsigned int s_bad[2];
  const int C = (int)g.C;
  const int64_t n = blockIdx.y;
  for (int k = threadIdx.x; k < C * kStatCols; k += blockDim.x) smem[k] = 0.f;
  if (threadIdx.x < 2) s_bad[threadIdx.x] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x; base < g.V; base += stride) {
    const int64_t v = base + threadIdx.x;
    int l = -1;
    if (v < g.V) {
      const int64_t label = (int64_t)lab[g.offset(g.ts, n, v)];
      if (label >= 0 && label < C) {
        l = (int)label;
      } else {
        atomicAdd(&s_bad[0], 1u);
      }
    }
    const scalar_t* zv = z + (l >= 0 ? g.offset(g.zs, n, v) : 0);
    VoxelSoftmax<acc_t> s{};
    acc_t inv_S = 0;
    if (l >= 0) {
      s = voxel_softmax<acc_t>(zv, g.zs[1], C, l);
      inv_S = acc_t(1) / s.S;
      float* sl = smem + l * kStatCols;
      atomicAdd(sl + kStatG, 1.f);
      atomicAdd(sl + kStatM, (float)(s.R * inv_S));
      if (!s.finite) {  // a non-finite logit poisons the statistics: the loss is NaN
        atomicAdd(&s_bad[1], 1u);
        atomicAdd(sl + kStatM, __int_as_float(0x7fc00000));
        if (need_cross) atomicAdd(sl + kStatT, __int_as_float(0x7fc00000));
      }
      if (need_cross) atomicAdd(sl + kStatT, (float)xpow(s.t, (acc_t)gamma_cross));
    }
    // Whole warps take this loop together (the voxel loop bound is uniform per block).
    for (int j = 0; j < C; ++j) {
      float q = 0.f;
      if (l >= 0 && j != l) q = (float)(xexp((acc_t)zv[j * g.zs[1]] - s.m) * inv_S);
      q = warp_sum(q);
      if (lane == 0 && q != 0.f) atomicAdd(smem + j * kStatCols + kStatQ, q);
    }
  }
  __syncthreads();
  double* st = stats + n * C * kStatCols;
  for (int k = threadIdx.x; k < C * kStatCols; k += blockDim.x) {
    if (smem[k] != 0.f) atomicAdd(st + k, (double)smem[k]);  // NaN != 0 too
  }
  if (threadIdx.x < 2 && s_bad[threadIdx.x]) atomicAdd(bad + threadIdx.x, (unsigned long long)s_bad[threadIdx.x]);
}

template <typename out_t>
__global__ void loss_kernel(const double* __restrict__ stats, const float* __restrict__ weights, Geometry g,
                            LossParams p, out_t* __restrict__ loss) {
  __shared__ double partial[kThreads];
  const double NC = double(g.N * g.C), NV = double(g.N * g.V);
  double sum = 0.0;
  for (int64_t k = threadIdx.x; k < g.N * g.C; k += blockDim.x)
    sum += label_loss(stats + k * kStatCols, (double)weights[k % g.C], p, NC, NV);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = (out_t)partial[0];
}

template <typename coef_t>
__global__ void coef_kernel(const double* __restrict__ stats, const float* __restrict__ weights, Geometry g,
                            LossParams p, const double* __restrict__ grad, coef_t* __restrict__ coefs) {
  const int64_t NC = g.N * g.C;
  const double gr = *grad;
  for (int64_t k = threadIdx.x; k < NC; k += blockDim.x) {
    double a, b, kappa;
    label_coefs(stats + k * kStatCols, (double)weights[k % g.C], p, double(NC), double(g.N * g.V), gr, &a, &b, &kappa);
    coefs[k] = (coef_t)a;
    coefs[NC + k] = (coef_t)b;
    coefs[2 * NC + k] = (coef_t)kappa;
  }
}

template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const scalar_t* __restrict__ z, const label_t* __restrict__ lab,
                                                            scalar_t* __restrict__ grad, Geometry g,
                                                            const at::opmath_type<scalar_t>* __restrict__ coefs,
                                                            float gamma_cross) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* s_coef = reinterpret_cast<acc_t*>(smem_raw);  // a, b, kappa of this sample: 3 * C
  const int C = (int)g.C;
  const int64_t n = blockIdx.y, NC = g.N * g.C;
  for (int k = threadIdx.x; k < C; k += blockDim.x) {
    s_coef[k] = coefs[n * C + k];
    s_coef[C + k] = coefs[NC + n * C + k];
    s_coef[2 * C + k] = coefs[2 * NC + n * C + k];
  }
  __syncthreads();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < g.V; v += stride) {
    const int64_t label = (int64_t)lab[g.offset(g.ts, n, v)];
    scalar_t* gv = grad + g.offset(g.gz, n, v);
    if (label < 0 || label >= C) {
      for (int j = 0; j < C; ++j) gv[j * g.gz[1]] = scalar_t(0);
      continue;
    }
    const int l = (int)label;
    voxel_grad<acc_t>(z + g.offset(g.zs, n, v), g.zs[1], gv, g.gz[1], C, l, s_coef, s_coef + C, s_coef[2 * C + l],
                      (acc_t)gamma_cross);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> explog_forward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weights, double w_dice,
    double w_cross, double gamma_dice, double gamma_cross, bool linear_dice, double eps) {
  const Geometry g = make_geometry(logits, target);
  check_weights(weights, g, logits);
  // The blocks' float32 partials reach the float64 statistics through atomics, in no fixed order.
  at::globalContext().alertNotDeterministic(
      "expseg_fast::explog_forward on CUDA (atomic accumulation); backend 'triton' is deterministic then");
  const c10::cuda::CUDAGuard guard(logits.device());
  const LossParams p = make_params(w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps);
  auto stats = at::zeros({g.N, g.C, kStatCols}, logits.options().dtype(at::kDouble));
  auto bad = at::zeros({2}, logits.options().dtype(at::kLong));
  auto loss = at::empty({}, logits.options().dtype(loss_dtype(logits)));
  auto w = weights.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (g.N * g.V > 0) {
    const dim3 grid(blocks_per_sample(g.V, g.N), (unsigned)g.N);
    const size_t shmem = (size_t)g.C * kStatCols * sizeof(float);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_forward_cuda", [&] {
      using logit_t = scalar_t;
      EXPSEG_DISPATCH_LABEL_TYPES(target.scalar_type(), "explog_forward_cuda", [&] {
        forward_kernel<logit_t, scalar_t><<<grid, kThreads, shmem, stream>>>(
            logits.const_data_ptr<logit_t>(), target.const_data_ptr<scalar_t>(), g, w_cross != 0.0, (float)gamma_cross,
            stats.data_ptr<double>(), reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (loss.scalar_type() == at::kDouble) {
    loss_kernel<<<1, kThreads, 0, stream>>>(stats.const_data_ptr<double>(), w.const_data_ptr<float>(), g, p,
                                            loss.data_ptr<double>());
  } else {
    loss_kernel<<<1, kThreads, 0, stream>>>(stats.const_data_ptr<double>(), w.const_data_ptr<float>(), g, p,
                                            loss.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats, bad};
}

namespace {

// Writes d loss / d logits into out from coefs (a, b, kappa: 3 * N * C in the op type acc_t): the voxel
// pass shared by explog_backward and explog_coef_backward.
template <typename logit_t, typename acc_t>
void launch_backward(const at::Tensor& logits, const at::Tensor& target, at::Tensor& out, const Geometry& g,
                     const at::Tensor& coefs, double gamma_cross, cudaStream_t stream) {
  if (g.N * g.V == 0) return;
  const dim3 grid(blocks_per_sample(g.V, g.N), (unsigned)g.N);
  const size_t shmem = (size_t)3 * g.C * sizeof(acc_t);
  EXPSEG_DISPATCH_LABEL_TYPES(target.scalar_type(), "explog_backward_cuda", [&] {
    backward_kernel<logit_t, scalar_t><<<grid, kThreads, shmem, stream>>>(
        logits.const_data_ptr<logit_t>(), target.const_data_ptr<scalar_t>(), out.data_ptr<logit_t>(), g,
        coefs.const_data_ptr<acc_t>(), (float)gamma_cross);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor explog_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& weights, const at::Tensor& stats, double w_dice, double w_cross,
                                double gamma_dice, double gamma_cross, bool linear_dice, double eps) {
  Geometry g = make_geometry(logits, target);
  check_weights(weights, g, logits);
  check_stats(stats, g);
  const c10::cuda::CUDAGuard guard(logits.device());
  const LossParams p = make_params(w_dice, w_cross, gamma_dice, gamma_cross, linear_dice, eps);
  auto st = stats.contiguous();
  auto w = weights.to(at::kFloat).contiguous();
  auto gr = grad_loss.to(at::kDouble).contiguous();
  auto out = at::empty_like(logits);
  for (int k = 0; k < 5; ++k) g.gz[k] = out.stride(k);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto coefs = at::empty({3 * g.N * g.C}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    coef_kernel<acc_t><<<1, kThreads, 0, stream>>>(st.const_data_ptr<double>(), w.const_data_ptr<float>(), g, p,
                                                   gr.const_data_ptr<double>(), coefs.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_backward<scalar_t, acc_t>(logits, target, out, g, coefs, gamma_cross, stream);
  });
  return out;
}

at::Tensor explog_coef_backward_cuda(const at::Tensor& coefs, const at::Tensor& logits, const at::Tensor& target,
                                     double gamma_cross) {
  Geometry g = make_geometry(logits, target);
  check_coefs(coefs, g, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty_like(logits);
  for (int k = 0; k < 5; ++k) g.gz[k] = out.stride(k);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "explog_coef_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor c = coefs.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    launch_backward<scalar_t, acc_t>(logits, target, out, g, c, gamma_cross, stream);
  });
  return out;
}

TORCH_LIBRARY_IMPL(expseg_fast, CUDA, m) {
  m.impl("explog_forward", &explog_forward_cuda);
  m.impl("explog_backward", &explog_backward_cuda);
  m.impl("explog_coef_backward", &explog_coef_backward_cuda);
}

}  // namespace expseg
