// Shared declarations of the fused SDE-step + Gaussian log-likelihood kernels.
//
// One stochastic sampler step whose mean is affine in the sample z and the model output u,
//     mean = A_b * z + C_b * u,   prev = mean + std_b * noise   (rollout)
// or re-scoring a stored prev, together with the per-sample log-density of prev under
// N(mean, std_b^2 I) averaged over the non-batch elements (see fastvideo_grpo/ops/reference.py).
// The CPU implementation lives in fused_sde_step.cpp, the CUDA one in fused_sde_step_cuda.cu
// (compiled only with FVG_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace fvg {

// Fixed reduction chunk (elements of one sample): the per-sample sum of squares is accumulated per
// chunk and the chunk partials are added in a fixed order, so a result never depends on the number
// of threads or the device's occupancy (re-scoring a rollout reproduces its log-prob bit for bit).
constexpr int64_t kChunk = 8192;

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// Returns {prev (compute dtype, or empty when prev_sample is given), log_prob (B,), mean (or empty)}.
std::vector<at::Tensor> sde_step_forward_cpu(const at::Tensor& u, const at::Tensor& z, const at::Tensor& A,
                                             const at::Tensor& C, const at::Tensor& std_,
                                             const c10::optional<at::Tensor>& noise,
                                             const c10::optional<at::Tensor>& prev_sample, bool return_mean);

// Backward of the log-prob of a re-scored step: with d = prev - (A z + C u) and
// w_b = grad_logprob_b / (std_b^2 N) (0 where std_b = 0), grad_u = C w d, grad_z = A w d, grad_prev = -w d.
// Returns {grad_u or empty, grad_z or empty, grad_prev or empty}, each in its input's dtype.
std::vector<at::Tensor> sde_step_backward_cpu(const at::Tensor& u, const at::Tensor& z, const at::Tensor& prev,
                                              const at::Tensor& A, const at::Tensor& C, const at::Tensor& w,
                                              bool need_u, bool need_z, bool need_prev);

#ifdef FVG_WITH_CUDA
std::vector<at::Tensor> sde_step_forward_cuda(const at::Tensor& u, const at::Tensor& z, const at::Tensor& A,
                                              const at::Tensor& C, const at::Tensor& std_,
                                              const c10::optional<at::Tensor>& noise,
                                              const c10::optional<at::Tensor>& prev_sample, bool return_mean);

std::vector<at::Tensor> sde_step_backward_cuda(const at::Tensor& u, const at::Tensor& z, const at::Tensor& prev,
                                               const at::Tensor& A, const at::Tensor& C, const at::Tensor& w,
                                               bool need_u, bool need_z, bool need_prev);
#endif

// Argument checks shared by both devices; raise c10::ValueError (Python ValueError) on misuse.
void check_step_args(const at::Tensor& u, const at::Tensor& z, const at::Tensor& A, const at::Tensor& C,
                     const at::Tensor& std_);

}  // namespace fvg
