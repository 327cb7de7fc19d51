// CPU kernels and Python bindings of the fused SDE step + Gaussian log-likelihood (fastvideo_grpo._C).
//
// One pass over memory per call instead of the ~15 elementwise passes of the eager formula:
// forward reads u, z (and noise or prev), writes prev (and optionally mean) and a per-chunk sum of
// squared residuals; backward reads u, z, prev and writes the requested gradients. Arithmetic runs in
// float32 (float64 for float64 samples) whatever the storage dtype (fp32/fp64/bf16/fp16).
#include "fused_sde_step.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

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

}  // namespace

void check_step_args(const at::Tensor& u, const at::Tensor& z, const at::Tensor& A, const at::Tensor& C,
                     const at::Tensor& std_) {
  TORCH_CHECK_VALUE(z.dim() >= 1, "sample must have a leading batch dimension");
  TORCH_CHECK_VALUE(u.sizes() == z.sizes(), "model_output shape ", u.sizes(), " must equal sample shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(u.device() == z.device(), "model_output and sample must be on the same device");
  const int64_t B = z.size(0);
  for (const at::Tensor* t : {&A, &C, &std_}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, "per-sample coefficients must have shape (", B,
                      ",); got ", t->sizes());
  }
}

std::vector<at::Tensor> sde_step_forward_cpu(const at::Tensor& u_in, const at::Tensor& z_in, const at::Tensor& A_in,
                                             const at::Tensor& C_in, const at::Tensor& std_in,
                                             const c10::optional<at::Tensor>& noise,
                                             const c10::optional<at::Tensor>& prev_sample, bool return_mean) {
  check_step_args(u_in, z_in, A_in, C_in, std_in);
  TORCH_CHECK_VALUE(noise.has_value() != prev_sample.has_value(), "pass exactly one of noise and prev_sample");
  const auto ct = compute_type(z_in);
  const at::Tensor u = u_in.contiguous(), z = z_in.contiguous();
  const at::Tensor A = A_in.to(ct).contiguous(), C = C_in.to(ct).contiguous(), S = std_in.to(ct).contiguous();
  const int64_t B = z.size(0), N = B ? z.numel() / B : 0;
  const auto opts = z.options().dtype(ct);
  at::Tensor prev_out = noise ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
  at::Tensor mean_out = return_mean ? at::empty(z.sizes(), opts) : at::empty({0}, opts);
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
  if (N == 0) {
    at::Tensor lp = at::zeros({B}, opts);
    return {prev_out, lp, mean_out};
  }
  const int64_t chunk = std::min<int64_t>(N, kChunk), nch = (N + chunk - 1) / chunk;
  std::vector<double> partial(static_cast<size_t>(B * nch));

  dispatch_float(u.scalar_type(), "model_output", [&](auto tu) {
    using Tu = decltype(tu);
    dispatch_float(z.scalar_type(), "sample", [&](auto tz) {
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      const Tc *a = A.data_ptr<Tc>(), *c = C.data_ptr<Tc>(), *s = S.data_ptr<Tc>();
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
    });
  });

  // Finalise in double: lp_b = -SS_b / (2 std_b^2 N) - log std_b - 0.5 log(2 pi); 0 where std_b == 0.
  at::Tensor lp64 = at::empty({B}, at::kDouble);
  at::Tensor S64 = S.to(at::kDouble);
  double* lpp = lp64.data_ptr<double>();
  const double* sp = S64.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0.0;
    for (int64_t k = 0; k < nch; ++k) ss += partial[b * nch + k];
    const double sd = sp[b];
    lpp[b] = sd > 0.0 ? -ss / (2.0 * sd * sd * static_cast<double>(N)) - std::log(sd) - kHalfLog2Pi : 0.0;
  }
  return {prev_out, lp64.to(ct), mean_out};
}

std::vector<at::Tensor> sde_step_backward_cpu(const at::Tensor& u_in, const at::Tensor& z_in,
                                              const at::Tensor& p_in, const at::Tensor& A_in, const at::Tensor& C_in,
                                              const at::Tensor& W_in, bool need_u, bool need_z, bool need_prev) {
  check_step_args(u_in, z_in, A_in, C_in, W_in);
  TORCH_CHECK_VALUE(p_in.sizes() == z_in.sizes(), "prev_sample has shape ", p_in.sizes(), ", expected ",
                    z_in.sizes());
  const auto ct = compute_type(z_in);
  const at::Tensor u = u_in.contiguous(), z = z_in.contiguous();
  const at::Tensor p = (p_in.scalar_type() == z.scalar_type() || p_in.scalar_type() == ct) ? p_in.contiguous()
                                                                                          : p_in.to(ct).contiguous();
  const at::Tensor A = A_in.to(ct).contiguous(), C = C_in.to(ct).contiguous(), W = W_in.to(ct).contiguous();
  at::Tensor gu = need_u ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor gz = need_z ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gp = need_prev ? at::empty_like(p) : at::empty({0}, p.options());
  const int64_t B = z.size(0), N = B ? z.numel() / B : 0;
  if (N == 0 || !(need_u || need_z || need_prev)) return {gu, gz, gp};

  dispatch_float(u.scalar_type(), "model_output", [&](auto tu) {
    using Tu = decltype(tu);
    dispatch_float(z.scalar_type(), "sample", [&](auto tz) {
      using Tz = decltype(tz);
      using Tc = std::conditional_t<std::is_same_v<Tz, double>, double, float>;
      const Tc *a = A.data_ptr<Tc>(), *c = C.data_ptr<Tc>(), *w = W.data_ptr<Tc>();
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

// ----------------------------------------------------------------------------- device dispatch

std::vector<at::Tensor> sde_step_forward(const at::Tensor& u, const at::Tensor& z, const at::Tensor& A,
                                         const at::Tensor& C, const at::Tensor& std_,
                                         const c10::optional<at::Tensor>& noise,
                                         const c10::optional<at::Tensor>& prev_sample, bool return_mean) {
  if (z.is_cuda()) {
#ifdef FVG_WITH_CUDA
    return sde_step_forward_cuda(u, z, A, C, std_, noise, prev_sample, return_mean);
#else
    TORCH_CHECK_VALUE(false, "fastvideo_grpo._C was built without CUDA; rebuild with a CUDA torch and nvcc");
#endif
  }
  TORCH_CHECK_VALUE(z.device().is_cpu(), "fused SDE step supports CPU and CUDA tensors; got ", z.device());
  return sde_step_forward_cpu(u, z, A, C, std_, noise, prev_sample, return_mean);
}

std::vector<at::Tensor> sde_step_backward(const at::Tensor& u, const at::Tensor& z, const at::Tensor& prev,
                                          const at::Tensor& A, const at::Tensor& C, const at::Tensor& w, bool need_u,
                                          bool need_z, bool need_prev) {
  if (z.is_cuda()) {
#ifdef FVG_WITH_CUDA
    return sde_step_backward_cuda(u, z, prev, A, C, w, need_u, need_z, need_prev);
#else
    TORCH_CHECK_VALUE(false, "fastvideo_grpo._C was built without CUDA; rebuild with a CUDA torch and nvcc");
#endif
  }
  TORCH_CHECK_VALUE(z.device().is_cpu(), "fused SDE step supports CPU and CUDA tensors; got ", z.device());
  return sde_step_backward_cpu(u, z, prev, A, C, w, need_u, need_z, need_prev);
}

bool has_cuda() {
#ifdef FVG_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace fvg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvideo_grpo compiled kernels (fused SDE step + Gaussian log-likelihood)";
  m.def("sde_step_forward", &fvg::sde_step_forward, "fused SDE step forward -> [prev|empty, log_prob, mean|empty]",
        py::arg("model_output"), py::arg("sample"), py::arg("coef_sample"), py::arg("coef_output"), py::arg("std"),
        py::arg("noise") = py::none(), py::arg("prev_sample") = py::none(), py::arg("return_mean") = false);
  m.def("sde_step_backward", &fvg::sde_step_backward, "fused SDE step log-prob backward -> [gu, gz, gprev]",
        py::arg("model_output"), py::arg("sample"), py::arg("prev_sample"), py::arg("coef_sample"),
        py::arg("coef_output"), py::arg("weight"), py::arg("need_output"), py::arg("need_sample"),
        py::arg("need_prev"));
  m.def("has_cuda", &fvg::has_cuda, "whether the CUDA kernels were compiled in");
  m.attr("chunk") = py::int_(fvg::kChunk);
}
