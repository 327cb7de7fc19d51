// CUDA kernels of the fused SDE step + Gaussian log-likelihood (built only with FVG_WITH_CUDA).
//
// Forward: one block per (sample, chunk of kChunk elements); each thread handles groups of kVec
// consecutive elements (one 16-byte load for fp32, 8 bytes for bf16/fp16 when every pointer is
// aligned, element loads otherwise: the thread -> element map, and hence the summation order, is
// the same either way), accumulates (prev - mean)^2 in the compute type (fp32, fp64 for fp64
// samples), and the block writes one partial sum; a second tiny kernel adds each sample's partials
// in a fixed order in double and forms the log-prob (and writes std_B). Explicitly rounded fma/mul keep
// the rollout and re-scoring calls bit-identical. Backward is one elementwise pass with the same layout;
// each block forms its sample's weight w_b = grad_log_prob_b / (std_b^2 N) itself.
//
// The per-sample coefficients travel by value in the kernel parameters (CoefArg, looked up on the host
// from the schedule's table: no host-to-device copy, so the host never waits for the GPU), or as a
// (B, 3) device array when the step index lives on the device or the batch exceeds kMaxInlineSamples.
#ifdef FVG_WITH_CUDA

#include "fused_sde_step.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fvg {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// (A, C, std) of every sample of a launch, in float64 (1.5 KiB of kernel parameters). The kernels take
// it as `const __grid_constant__` (sm_70 or newer: every CUDA 13 target) so that a per-sample read
// indexes the parameter space directly instead of copying the struct into each thread's stack.
struct CoefArg {
  const double* rows;  // (B, 3) on the device, or nullptr: then `v` holds them
  double v[3 * kMaxInlineSamples];
};

__device__ __forceinline__ const double* coef_of(const CoefArg& k, int64_t b) {
  return k.rows ? k.rows + 3 * b : k.v + 3 * b;
}

CoefArg make_coef_arg(const CoefRows& rows, const at::Device& dev) {
  CoefArg k;
  if (rows.device.defined()) {
    TORCH_CHECK(rows.device.device() == dev && rows.device.is_contiguous() && rows.device.size(0) == rows.batch,
                "internal: coefficient rows on the wrong device");
    k.rows = rows.device.data_ptr<double>();
  } else {
    TORCH_CHECK(rows.batch <= kMaxInlineSamples && static_cast<int64_t>(rows.host.size()) == 3 * rows.batch,
                "internal: too many samples to pass their coefficients by value");
    k.rows = nullptr;
    for (int64_t i = 0; i < 3 * rows.batch; ++i) k.v[i] = rows.host[i];
  }
  return k;
}

template <typename Tc, typename T>
__device__ __forceinline__ Tc cvt(T x) {
  return static_cast<Tc>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(x));
}

template <typename T>
__device__ __forceinline__ bool aligned(const T* p) {
  return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec)) == 0;
}

// Loads kVec elements starting at i (i is a multiple of kVec); element-wise past n or when unaligned.
template <bool VEC, typename T, typename Tc>
__device__ __forceinline__ void load(const T* p, int64_t i, int64_t n, Tc (&out)[kVec]) {
  if (VEC && i + kVec <= n) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = cvt<Tc>(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = i + j < n ? cvt<Tc>(p[i + j]) : Tc(0);
  }
}

template <bool VEC, typename T, typename Tc>
__device__ __forceinline__ void store(T* p, int64_t i, int64_t n, const Tc (&in)[kVec]) {
  if (VEC && i + kVec <= n) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < kVec; ++j) pk.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (i + j < n) p[i + j] = static_cast<T>(in[j]);
  }
}

template <typename Tc>
__device__ __forceinline__ Tc block_sum(Tc v) {
  __shared__ Tc warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  Tc total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;  // valid in thread 0 only
}

template <typename Tu, typename Tz, typename Tp, typename Tc, bool ROLLOUT, bool MEAN, bool VEC>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Tu* __restrict__ u, const Tz* __restrict__ z,
                                                       const Tp* __restrict__ p_in, Tc* __restrict__ p_out,
                                                       Tc* __restrict__ m_out, const __grid_constant__ CoefArg k,
                                                       double* __restrict__ partial, int64_t N, int64_t chunk,
                                                       int64_t nch) {
  const int64_t t = blockIdx.x;
  const int64_t b = t / nch, lo = (t % nch) * chunk, off = b * N + lo;
  const int64_t n = min(chunk, N - lo);
  const double* kb = coef_of(k, b);
  const Tc a = static_cast<Tc>(kb[0]), c = static_cast<Tc>(kb[1]), s = static_cast<Tc>(kb[2]);
  Tc acc = 0;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < n; i += int64_t(kThreads) * kVec) {
    Tc zv[kVec], uv[kVec], pv[kVec], mv[kVec];
    load<VEC>(z + off, i, n, zv);
    load<VEC>(u + off, i, n, uv);
    load<VEC>(p_in + off, i, n, pv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      mv[j] = fma_rn(a, zv[j], mul_rn(c, uv[j]));
      if (ROLLOUT) pv[j] = fma_rn(s, pv[j], mv[j]);
      const Tc d = sub_rn(pv[j], mv[j]);
      if (i + j < n) acc = fma_rn(d, d, acc);
    }
    if (ROLLOUT) store<VEC>(p_out + off, i, n, pv);
    if (MEAN) store<VEC>(m_out + off, i, n, mv);
  }
  const Tc total = block_sum(acc);
  if (threadIdx.x == 0) partial[t] = static_cast<double>(total);
}

template <typename Tc>
__global__ void finalize_kernel(const double* __restrict__ partial, const __grid_constant__ CoefArg k,
                                Tc* __restrict__ lp, Tc* __restrict__ std_out, int64_t B, int64_t N, int64_t nch) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const Tc s = static_cast<Tc>(coef_of(k, b)[2]);
  std_out[b] = s;
  if (N == 0) {
    lp[b] = Tc(0);
    return;
  }
  double ss = 0.0;
  for (int64_t q = 0; q < nch; ++q) ss += partial[b * nch + q];
  const double sd = static_cast<double>(s);
  lp[b] = sd > 0.0 ? static_cast<Tc>(-ss / (2.0 * sd * sd * static_cast<double>(N)) - log(sd) - kHalfLog2Pi)
                   : Tc(0);
}

template <typename Tu, typename Tz, typename Tp, typename Tc, bool GU, bool GZ, bool GP, bool VEC>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const Tu* __restrict__ u, const Tz* __restrict__ z,
                                                       const Tp* __restrict__ p, Tu* __restrict__ gu,
                                                       Tz* __restrict__ gz, Tp* __restrict__ gp,
                                                       const __grid_constant__ CoefArg k, const Tc* __restrict__ g,
                                                       int64_t g_stride, int64_t N, int64_t chunk, int64_t nch) {
  const int64_t t = blockIdx.x;
  const int64_t b = t / nch, lo = (t % nch) * chunk, off = b * N + lo;
  const int64_t n = min(chunk, N - lo);
  const double* kb = coef_of(k, b);
  const Tc a = static_cast<Tc>(kb[0]), c = static_cast<Tc>(kb[1]), sd = static_cast<Tc>(kb[2]);
  // w_b = grad_log_prob_b / (std_b^2 N), 0 where std_b == 0 (rounded as the eager formula rounds it)
  const Tc w = sd > Tc(0) ? div_rn(g[b * g_stride], mul_rn(mul_rn(sd, sd), static_cast<Tc>(N))) : Tc(0);
  const Tc aw = a * w, cw = c * w;
  for (int64_t i = int64_t(threadIdx.x) * kVec; i < n; i += int64_t(kThreads) * kVec) {
    Tc zv[kVec], uv[kVec], pv[kVec], o[kVec];
    load<VEC>(z + off, i, n, zv);
    load<VEC>(u + off, i, n, uv);
    load<VEC>(p + off, i, n, pv);
#pragma unroll
    for (int j = 0; j < kVec; ++j) pv[j] = sub_rn(pv[j], fma_rn(a, zv[j], mul_rn(c, uv[j])));  // d
    if (GU) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = cw * pv[j];
      store<VEC>(gu + off, i, n, o);
    }
    if (GZ) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = aw * pv[j];
      store<VEC>(gz + off, i, n, o);
    }
    if (GP) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = -w * pv[j];
      store<VEC>(gp + off, i, n, o);
    }
  }
}

// (model_output, sample) storage pairs compiled for CUDA: equal dtypes, or a half-precision model
// output with a float32 sample (autocast). Other pairs are upcast to the compute dtype first, which
// is exact, so the device binary stays small (6 pairs instead of 16).
bool native_pair(at::ScalarType su, at::ScalarType sz) {
  return su == sz || (sz == at::kFloat && (su == at::kBFloat16 || su == at::kHalf));
}

template <typename F>
void dispatch_pair(at::ScalarType su, at::ScalarType sz, F&& f) {
  TORCH_CHECK(native_pair(su, sz), "internal: unsupported dtype pair reached the CUDA dispatch");
  if (su != sz) {
    if (su == at::kBFloat16) f(c10::BFloat16{}, float{});
    else f(c10::Half{}, float{});
    return;
  }
  switch (sz) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}, c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "sample must be float32, float64, bfloat16 or float16; got ", sz);
  }
}

void check_float(const at::Tensor& t, const char* what) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, what,
                    " must be float32, float64, bfloat16 or float16; got ", st);
}

at::ScalarType compute_type(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename... Ptrs>
bool all_aligned(const Ptrs*... ps) {
  auto ok = [](auto* p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(p)>>;
    return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) == 0;
  };
  return (ok(ps) && ...);
}

}  // namespace

std::vector<at::Tensor> sde_step_forward_cuda(const at::Tensor& u_in, const at::Tensor& z_in, const CoefRows& coefs,
                                              const c10::optional<at::Tensor>& noise,
                                              const c10::optional<at::Tensor>& prev_sample, bool return_mean) {
  check_step_args(u_in, z_in);
  TORCH_CHECK_VALUE(noise.has_value() != prev_sample.has_value(), "pass exactly one of noise and prev_sample");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto ct = compute_type(z_in);
  const auto dev = z_in.device();
  check_float(u_in, "model_output");
  check_float(z_in, "sample");
  const CoefArg karg = make_coef_arg(coefs, dev);
  const bool native = native_pair(u_in.scalar_type(), z_in.scalar_type());
  const at::Tensor u = native ? u_in.contiguous() : u_in.to(ct).contiguous();
  const at::Tensor z = native ? z_in.contiguous() : z_in.to(ct).contiguous();
  const int64_t B = z.size(0), N = B ? z.numel() / B : 0;
  const auto opts = z.options().dtype(ct);
  at::Tensor prev_out = noise ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
  at::Tensor mean_out = return_mean ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
  at::Tensor side;
  if (noise) {
    TORCH_CHECK_VALUE(noise->sizes() == z.sizes(), "noise shape ", noise->sizes(), " must equal sample shape");
    side = noise->to(dev, ct).contiguous();
  } else {
    TORCH_CHECK_VALUE(prev_sample->sizes() == z.sizes(), "prev_sample has shape ", prev_sample->sizes(),
                      ", expected ", z.sizes());
    side = prev_sample->scalar_type() == z_in.scalar_type() && native ? prev_sample->to(dev).contiguous()
                                                         : prev_sample->to(dev, ct).contiguous();
  }
  at::Tensor lp = at::empty({B}, opts), std_out = at::empty({B}, opts);
  if (B == 0) return {prev_out, lp, mean_out, std_out};
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunk)), nch = N ? (N + chunk - 1) / chunk : 0;
  at::Tensor partial = at::empty({B * nch}, z.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool chunk_vec = N % kVec == 0;  // every chunk then starts on a kVec boundary

  dispatch_pair(u.scalar_type(), z.scalar_type(), [&](auto tu, auto tz) {
      using Tu = decltype(tu);
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      const Tu* up = u.data_ptr<Tu>();
      const Tz* zp = z.data_ptr<Tz>();
      Tc* mp = return_mean ? mean_out.data_ptr<Tc>() : nullptr;
      double* part = partial.data_ptr<double>();
      auto launch = [&](auto tp, auto rollout_c, auto mean_c, const void* pin_raw, Tc* pp_out) {
        using Tp = decltype(tp);
        constexpr bool R = decltype(rollout_c)::value, M = decltype(mean_c)::value;
        const Tp* pin = static_cast<const Tp*>(pin_raw);
        const bool vec = chunk_vec && all_aligned(up, zp, pin, pp_out, mp);
        if (vec) {
          fwd_kernel<Tu, Tz, Tp, Tc, R, M, true><<<B * nch, kThreads, 0, stream>>>(up, zp, pin, pp_out, mp, karg,
                                                                                   part, N, chunk, nch);
        } else {
          fwd_kernel<Tu, Tz, Tp, Tc, R, M, false><<<B * nch, kThreads, 0, stream>>>(up, zp, pin, pp_out, mp, karg,
                                                                                    part, N, chunk, nch);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using T_ = std::true_type;
      using F_ = std::false_type;
      if (N > 0) {
        if (noise) {
          Tc* po = prev_out.data_ptr<Tc>();
          if (return_mean) launch(Tc{}, T_{}, T_{}, side.data_ptr(), po);
          else launch(Tc{}, T_{}, F_{}, side.data_ptr(), po);
        } else if (side.scalar_type() == z.scalar_type()) {
          if (return_mean) launch(Tz{}, F_{}, T_{}, side.data_ptr(), nullptr);
          else launch(Tz{}, F_{}, F_{}, side.data_ptr(), nullptr);
        } else {
          if (return_mean) launch(Tc{}, F_{}, T_{}, side.data_ptr(), nullptr);
          else launch(Tc{}, F_{}, F_{}, side.data_ptr(), nullptr);
        }
      }
      const int fin_threads = 128;
      finalize_kernel<Tc><<<(B + fin_threads - 1) / fin_threads, fin_threads, 0, stream>>>(
          part, karg, lp.data_ptr<Tc>(), std_out.data_ptr<Tc>(), B, N, nch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {prev_out, lp, mean_out, std_out};
}

std::vector<at::Tensor> sde_step_backward_cuda(const at::Tensor& g_in, const at::Tensor& u_in,
                                               const at::Tensor& z_in, const at::Tensor& p_in, const CoefRows& coefs,
                                               bool need_u, bool need_z, bool need_prev) {
  check_step_args(u_in, z_in);
  TORCH_CHECK_VALUE(p_in.sizes() == z_in.sizes(), "prev_sample has shape ", p_in.sizes(), ", expected ",
                    z_in.sizes());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto ct = compute_type(z_in);
  const auto dev = z_in.device();
  check_float(u_in, "model_output");
  check_float(z_in, "sample");
  const int64_t B = z_in.size(0), N = B ? z_in.numel() / B : 0;
  TORCH_CHECK_VALUE(g_in.dim() == 1 && g_in.size(0) == B, "grad_log_prob must have shape (", B, ",); got ",
                    g_in.sizes());
  const CoefArg karg = make_coef_arg(coefs, dev);
  const bool native = native_pair(u_in.scalar_type(), z_in.scalar_type());
  const at::Tensor u = native ? u_in.contiguous() : u_in.to(ct).contiguous();
  const at::Tensor z = native ? z_in.contiguous() : z_in.to(ct).contiguous();
  const at::Tensor p = (p_in.scalar_type() == z.scalar_type() || p_in.scalar_type() == ct)
                           ? p_in.to(dev).contiguous()
                           : p_in.to(dev, ct).contiguous();
  const at::Tensor g = g_in.to(dev, ct);
  // Rare combinations write every gradient into scratch buffers; the hot paths write only what is asked.
  const bool general = !(need_u && !need_prev);
  at::Tensor gu = (need_u || general) ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor gz = (need_z || general) ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gp = (need_prev || general) ? at::empty_like(p) : at::empty({0}, p.options());
  auto trim = [&]() -> std::vector<at::Tensor> {
    return {need_u ? gu.to(u_in.scalar_type()) : at::empty({0}, u_in.options()),
            need_z ? gz.to(z_in.scalar_type()) : at::empty({0}, z_in.options()),
            need_prev ? gp : at::empty({0}, p.options())};
  };
  if (N == 0 || B == 0 || !(need_u || need_z || need_prev)) return trim();
  const int64_t chunk = std::min<int64_t>(N, kChunk), nch = (N + chunk - 1) / chunk;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool chunk_vec = N % kVec == 0;

  dispatch_pair(u.scalar_type(), z.scalar_type(), [&](auto tu, auto tz) {
      using Tu = decltype(tu);
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      const Tc* gl = g.data_ptr<Tc>();
      const int64_t gs = g.stride(0);
      const Tu* up = u.data_ptr<Tu>();
      const Tz* zp = z.data_ptr<Tz>();
      auto run = [&](auto tp) {
        using Tp = decltype(tp);
        const Tp* pp = p.data_ptr<Tp>();
        Tu* gup = gu.numel() ? gu.data_ptr<Tu>() : nullptr;
        Tz* gzp = gz.numel() ? gz.data_ptr<Tz>() : nullptr;
        Tp* gpp = gp.numel() ? gp.data_ptr<Tp>() : nullptr;
        const bool vec = chunk_vec && all_aligned(up, zp, pp, gup, gzp, gpp);
#define FVG_BWD(GU, GZ, GP)                                                                                    \
  do {                                                                                                         \
    if (vec)                                                                                                   \
      bwd_kernel<Tu, Tz, Tp, Tc, GU, GZ, GP, true>                                                             \
          <<<B * nch, kThreads, 0, stream>>>(up, zp, pp, gup, gzp, gpp, karg, gl, gs, N, chunk, nch);         \
    else                                                                                                       \
      bwd_kernel<Tu, Tz, Tp, Tc, GU, GZ, GP, false>                                                            \
          <<<B * nch, kThreads, 0, stream>>>(up, zp, pp, gup, gzp, gpp, karg, gl, gs, N, chunk, nch);         \
  } while (0)
        if (!general && !need_z) FVG_BWD(true, false, false);
        else if (!general) FVG_BWD(true, true, false);
        else FVG_BWD(true, true, true);
#undef FVG_BWD
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (p.scalar_type() == z.scalar_type()) run(Tz{});
      else run(Tc{});
  });
  return trim();
}

}  // namespace fvg

#endif  // FVG_WITH_CUDA
