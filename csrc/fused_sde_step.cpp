// CPU kernels of the fused SDE step + Gaussian log-likelihood (the operator is in sde_step_op.cpp).
//
// One pass over memory per call instead of the ~15 elementwise passes of the eager formula:
// forward reads u, z (and noise or prev), writes prev (and optionally mean) and a per-chunk sum of
// squared residuals; backward reads u, z, prev and writes the requested gradients. Arithmetic runs in
// float32 (float64 for float64 samples) whatever the storage dtype (fp32/fp64/bf16/fp16). The
// per-sample coefficients arrive looked up already (three doubles per sample, CoefRows) and are
// rounded to the compute type here, exactly as a float64 -> float32 tensor conversion rounds them.
#include "fused_sde_step.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace fvg {
namespace {

template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, what, " must be float32, float64, bfloat16 or float16; got ", st);
  }
}

constexpr int kLanes = 8;  // independent accumulators so the compiler can keep SIMD lanes busy

// Sum of squared residuals of one chunk of one sample; writes prev (rollout) and mean on request.
template <typename Tu, typename Tz, typename Tp, typename Tc, bool ROLLOUT, bool MEAN>
double fwd_chunk(const Tu* __restrict__ u, const Tz* __restrict__ z, const Tp* __restrict__ p_in,
                 Tc* __restrict__ p_out, Tc* __restrict__ m_out, Tc a, Tc c, Tc s, int64_t n) {
  Tc acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const Tc m = a * static_cast<Tc>(z[i + j]) + c * static_cast<Tc>(u[i + j]);
      Tc p;
      if constexpr (ROLLOUT) {
        p = m + s * static_cast<Tc>(p_in[i + j]);
        p_out[i + j] = p;
      } else {
        p = static_cast<Tc>(p_in[i + j]);
      }
      if constexpr (MEAN) m_out[i + j] = m;
      const Tc d = p - m;
      acc[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const Tc m = a * static_cast<Tc>(z[i]) + c * static_cast<Tc>(u[i]);
    Tc p;
    if constexpr (ROLLOUT) {
      p = m + s * static_cast<Tc>(p_in[i]);
      p_out[i] = p;
    } else {
      p = static_cast<Tc>(p_in[i]);
    }
    if constexpr (MEAN) m_out[i] = m;
    const Tc d = p - m;
    acc[j] += d * d;
  }
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(acc[j]);
  return total;
}

template <typename Tu, typename Tz, typename Tp, typename Tc, bool ROLLOUT, bool MEAN>
void fwd_all(const Tu* u, const Tz* z, const Tp* p_in, Tc* p_out, Tc* m_out, const Tc* A, const Tc* C,
             const Tc* S, double* partial, int64_t B, int64_t N) {
  const int64_t chunk = std::min<int64_t>(N, kChunk);
  const int64_t nch = (N + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / chunk);
  at::parallel_for(0, B * nch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nch, lo = (t % nch) * chunk, off = b * N + lo;
      const int64_t n = std::min(chunk, N - lo);
      partial[t] = fwd_chunk<Tu, Tz, Tp, Tc, ROLLOUT, MEAN>(
          u + off, z + off, p_in + off, ROLLOUT ? p_out + off : nullptr, MEAN ? m_out + off : nullptr, A[b], C[b],
          S[b], n);
    }
  });
}

template <typename Tu, typename Tz, typename Tp, typename Tc, bool GU, bool GZ, bool GP>
void bwd_chunk(const Tu* __restrict__ u, const Tz* __restrict__ z, const Tp* __restrict__ p, Tu* __restrict__ gu,
               Tz* __restrict__ gz, Tp* __restrict__ gp, Tc a, Tc c, Tc w, int64_t n) {
  const Tc aw = a * w, cw = c * w;
  for (int64_t i = 0; i < n; ++i) {
    const Tc m = a * static_cast<Tc>(z[i]) + c * static_cast<Tc>(u[i]);
    const Tc d = static_cast<Tc>(p[i]) - m;
    if constexpr (GU) gu[i] = static_cast<Tu>(cw * d);
    if constexpr (GZ) gz[i] = static_cast<Tz>(aw * d);
    if constexpr (GP) gp[i] = static_cast<Tp>(-w * d);
  }
}

template <typename Tu, typename Tz, typename Tp, typename Tc, bool GU, bool GZ, bool GP>
void bwd_all(const Tu* u, const Tz* z, const Tp* p, Tu* gu, Tz* gz, Tp* gp, const Tc* A, const Tc* C, const Tc* W,
             int64_t B, int64_t N) {
  const int64_t chunk = std::min<int64_t>(N, kChunk);
  const int64_t nch = (N + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / chunk);
  at::parallel_for(0, B * nch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nch, lo = (t % nch) * chunk, off = b * N + lo;
      const int64_t n = std::min(chunk, N - lo);
      bwd_chunk<Tu, Tz, Tp, Tc, GU, GZ, GP>(u + off, z + off, p + off, GU ? gu + off : nullptr,
                                            GZ ? gz + off : nullptr, GP ? gp + off : nullptr, A[b], C[b], W[b], n);
    }
  });
}

at::ScalarType compute_type(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The looked-up float64 coefficients rounded to the compute type: A, C, std of sample b at [b], [B + b], [2B + b].
template <typename Tc>
c10::SmallVector<Tc, 3 * 16> rounded_coefs(const CoefRows& coefs) {
  const int64_t B = coefs.batch;
  c10::SmallVector<Tc, 3 * 16> out(3 * B);
  for (int64_t b = 0; b < B; ++b)
    for (int k = 0; k < 3; ++k) out[k * B + b] = static_cast<Tc>(coefs.host[3 * b + k]);
  return out;
}

}  // namespace

void check_step_args(const at::Tensor& u, const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.dim() >= 1, "sample must have a leading batch dimension");
  TORCH_CHECK_VALUE(u.sizes() == z.sizes(), "model_output shape ", u.sizes(), " must equal sample shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(u.device() == z.device(), "model_output and sample must be on the same device");
}

std::vector<at::Tensor> sde_step_forward_cpu(const at::Tensor& u_in, const at::Tensor& z_in, const CoefRows& coefs,
                                             const c10::optional<at::Tensor>& noise,
                                             const c10::optional<at::Tensor>& prev_sample, bool return_mean) {
  check_step_args(u_in, z_in);
  TORCH_CHECK_VALUE(noise.has_value() != prev_sample.has_value(), "pass exactly one of noise and prev_sample");
  TORCH_CHECK(coefs.batch == z_in.size(0) && !coefs.device.defined(), "internal: CPU coefficient rows expected");
  const auto ct = compute_type(z_in);
  const at::Tensor u = u_in.contiguous(), z = z_in.contiguous();
  const int64_t B = z.size(0), N = B ? z.numel() / B : 0;
  const auto opts = z.options().dtype(ct);
  at::Tensor prev_out = noise ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
  at::Tensor mean_out = return_mean ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
  at::Tensor lp = at::empty({B}, opts), std_out = at::empty({B}, opts);
  at::Tensor side;  // noise (rollout) or prev (re-scoring), same shape as z
  if (noise) {
    TORCH_CHECK_VALUE(noise->sizes() == z.sizes(), "noise shape ", noise->sizes(), " must equal sample shape");
    side = noise->to(ct).contiguous();
  } else {
    TORCH_CHECK_VALUE(prev_sample->sizes() == z.sizes(), "prev_sample has shape ", prev_sample->sizes(),
                      ", expected ", z.sizes());
    side = prev_sample->scalar_type() == z.scalar_type() ? prev_sample->contiguous()
                                                         : prev_sample->to(ct).contiguous();
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunk)), nch = (N + chunk - 1) / chunk;
  c10::SmallVector<double, 64> partial(static_cast<size_t>(B * nch));

  dispatch_float(u.scalar_type(), "model_output", [&](auto tu) {
    using Tu = decltype(tu);
    dispatch_float(z.scalar_type(), "sample", [&](auto tz) {
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      const auto k = rounded_coefs<Tc>(coefs);
      const Tc *a = k.data(), *c = k.data() + B, *s = k.data() + 2 * B;
      Tc* lpp = lp.data_ptr<Tc>();
      Tc* sp = std_out.data_ptr<Tc>();
      for (int64_t b = 0; b < B; ++b) sp[b] = s[b];
      if (N == 0) {
        for (int64_t b = 0; b < B; ++b) lpp[b] = Tc(0);
        return;
      }
      const Tu* up = u.data_ptr<Tu>();
      const Tz* zp = z.data_ptr<Tz>();
      Tc* mp = return_mean ? mean_out.data_ptr<Tc>() : nullptr;
      if (noise) {
        const Tc* np = side.data_ptr<Tc>();
        Tc* pp = prev_out.data_ptr<Tc>();
        if (return_mean) fwd_all<Tu, Tz, Tc, Tc, true, true>(up, zp, np, pp, mp, a, c, s, partial.data(), B, N);
        else fwd_all<Tu, Tz, Tc, Tc, true, false>(up, zp, np, pp, mp, a, c, s, partial.data(), B, N);
      } else if (side.scalar_type() == z.scalar_type()) {
        const Tz* pp = side.data_ptr<Tz>();
        if (return_mean) fwd_all<Tu, Tz, Tz, Tc, false, true>(up, zp, pp, nullptr, mp, a, c, s, partial.data(), B, N);
        else fwd_all<Tu, Tz, Tz, Tc, false, false>(up, zp, pp, nullptr, mp, a, c, s, partial.data(), B, N);
      } else {
        const Tc* pp = side.data_ptr<Tc>();
        if (return_mean) fwd_all<Tu, Tz, Tc, Tc, false, true>(up, zp, pp, nullptr, mp, a, c, s, partial.data(), B, N);
        else fwd_all<Tu, Tz, Tc, Tc, false, false>(up, zp, pp, nullptr, mp, a, c, s, partial.data(), B, N);
      }
      // Finalise in double: lp_b = -SS_b / (2 std_b^2 N) - log std_b - 0.5 log(2 pi); 0 where std_b == 0.
      for (int64_t b = 0; b < B; ++b) {
        double ss = 0.0;
        for (int64_t q = 0; q < nch; ++q) ss += partial[b * nch + q];
        const double sd = static_cast<double>(s[b]);
        lpp[b] = sd > 0.0 ? static_cast<Tc>(-ss / (2.0 * sd * sd * static_cast<double>(N)) - std::log(sd) - kHalfLog2Pi)
                          : Tc(0);
      }
    });
  });
  return {prev_out, lp, mean_out, std_out};
}

std::vector<at::Tensor> sde_step_backward_cpu(const at::Tensor& g_in, const at::Tensor& u_in, const at::Tensor& z_in,
                                              const at::Tensor& p_in, const CoefRows& coefs, bool need_u, bool need_z,
                                              bool need_prev) {
  check_step_args(u_in, z_in);
  TORCH_CHECK_VALUE(p_in.sizes() == z_in.sizes(), "prev_sample has shape ", p_in.sizes(), ", expected ",
                    z_in.sizes());
  TORCH_CHECK(coefs.batch == z_in.size(0) && !coefs.device.defined(), "internal: CPU coefficient rows expected");
  const auto ct = compute_type(z_in);
  const int64_t B = z_in.size(0), N = B ? z_in.numel() / B : 0;
  TORCH_CHECK_VALUE(g_in.dim() == 1 && g_in.size(0) == B && g_in.device().is_cpu(),
                    "grad_log_prob must have shape (", B, ",) on the sample's device; got ", g_in.sizes());
  const at::Tensor u = u_in.contiguous(), z = z_in.contiguous();
  const at::Tensor p = (p_in.scalar_type() == z.scalar_type() || p_in.scalar_type() == ct) ? p_in.contiguous()
                                                                                          : p_in.to(ct).contiguous();
  const at::Tensor g = g_in.scalar_type() == ct ? g_in : g_in.to(ct);
  at::Tensor gu = need_u ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor gz = need_z ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gp = need_prev ? at::empty_like(p) : at::empty({0}, p.options());
  if (N == 0 || !(need_u || need_z || need_prev)) return {gu, gz, gp};

  dispatch_float(u.scalar_type(), "model_output", [&](auto tu) {
    using Tu = decltype(tu);
    dispatch_float(z.scalar_type(), "sample", [&](auto tz) {
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      auto k = rounded_coefs<Tc>(coefs);
      const Tc *a = k.data(), *c = k.data() + B;
      // w_b = g_b / (std_b^2 N) in the compute type, 0 where std_b == 0 (overwrites the std slots)
      Tc* w = k.data() + 2 * B;
      const Tc* gl = g.data_ptr<Tc>();
      const int64_t gs = g.stride(0);
      for (int64_t b = 0; b < B; ++b) {
        const Tc sd = w[b];
        w[b] = sd > Tc(0) ? gl[b * gs] / (sd * sd * static_cast<Tc>(N)) : Tc(0);
      }
      const Tu* up = u.data_ptr<Tu>();
      const Tz* zp = z.data_ptr<Tz>();
      Tu* gup = need_u ? gu.data_ptr<Tu>() : nullptr;
      Tz* gzp = need_z ? gz.data_ptr<Tz>() : nullptr;
      auto run = [&](auto tp) {
        using Tp = decltype(tp);
        const Tp* pp = p.data_ptr<Tp>();
        Tp* gpp = need_prev ? gp.data_ptr<Tp>() : nullptr;
        if (need_u && !need_z && !need_prev) {  // the training hot path: only the policy output needs a gradient
          bwd_all<Tu, Tz, Tp, Tc, true, false, false>(up, zp, pp, gup, gzp, gpp, a, c, w, B, N);
        } else if (need_u && need_z && !need_prev) {
          bwd_all<Tu, Tz, Tp, Tc, true, true, false>(up, zp, pp, gup, gzp, gpp, a, c, w, B, N);
        } else {  // rare combinations: write every gradient, drop the unrequested ones
          at::Tensor tu_ = need_u ? gu : at::empty_like(u), tz_ = need_z ? gz : at::empty_like(z);
          at::Tensor tp_ = need_prev ? gp : at::empty_like(p);
          bwd_all<Tu, Tz, Tp, Tc, true, true, true>(up, zp, pp, tu_.data_ptr<Tu>(), tz_.data_ptr<Tz>(),
                                                    tp_.data_ptr<Tp>(), a, c, w, B, N);
        }
      };
      if (p.scalar_type() == z.scalar_type()) run(Tz{});
      else run(Tc{});
    });
  });
  return {gu, gz, gp};
}

}  // namespace fvg
