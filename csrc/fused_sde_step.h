// Shared declarations of the fused SDE-step + Gaussian log-likelihood kernels.
//
// One stochastic sampler step whose mean is affine in the sample z and the model output u,
//     mean = A_b * z + C_b * u,   prev = mean + std_b * noise   (rollout)
// or re-scoring a stored prev, together with the per-sample log-density of prev under
// N(mean, std_b^2 I) averaged over the non-batch elements (see fastvideo_grpo/sde/ops/reference.py).
//
// The coefficients come from a table made once per schedule: coefs is (T, 3) float64, row t =
// (A, C, std) of step t, and each call names the rows by a step index (a (B,) int64 tensor or one
// int for the whole batch; step = -1 with no index means row b for sample b, i.e. per-sample
// coefficients). sde_step_op.cpp looks the rows up on the host (CoefRows) and registers the operator
// fastvideo_grpo::sde_step with its autograd and meta kernels; the CPU kernels live in
// fused_sde_step.cpp, the CUDA ones in fused_sde_step_cuda.cu (compiled only with FVG_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace fvg {

// Fixed reduction chunk (elements of one sample): the per-sample sum of squares is accumulated per
// chunk and the chunk partials are added in a fixed order, so a result never depends on the number
// of threads or the device's occupancy (re-scoring a rollout reproduces its log-prob bit for bit).
constexpr int64_t kChunk = 8192;

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

// Samples whose coefficients a CUDA launch carries by value (kernel parameters): no host-to-device
// copy, hence no wait for the GPU. Larger batches copy their rows to the device once per call.
constexpr int kMaxInlineSamples = 64;

// (A_b, C_b, std_b) of every sample of one call, in float64: three doubles per sample on the host,
// or (B, 3) rows on the sample's device when the step index lives there.
struct CoefRows {
  c10::SmallVector<double, 3 * 16> host;  // empty when `device` holds the rows
  at::Tensor device;                      // undefined unless the lookup ran on the device
  int64_t batch = 0;
};

// Looks up the rows of one call: checks the table (T, 3) float64, the index (B,) integer or the step,
// and the devices; raises c10::ValueError (Python ValueError) on misuse.
CoefRows lookup_coefs(const at::Tensor& coefs, const c10::optional<at::Tensor>& index, int64_t step, int64_t batch,
                      const at::Device& sample_device);

// Forward: returns {prev (compute dtype, or empty when prev_sample is given), log_prob (B,), mean (or empty),
// std (B,)}, all in the compute dtype (float32; float64 for float64 samples).
std::vector<at::Tensor> sde_step_forward_cpu(const at::Tensor& u, const at::Tensor& z, const CoefRows& coefs,
                                             const c10::optional<at::Tensor>& noise,
                                             const c10::optional<at::Tensor>& prev_sample, bool return_mean);

// Backward of the log-prob of a re-scored step: with d = prev - (A z + C u) and
// w_b = grad_log_prob_b / (std_b^2 N) (0 where std_b = 0), grad_u = C w d, grad_z = A w d, grad_prev = -w d.
// Returns {grad_u or empty, grad_z or empty, grad_prev or empty}, each in its input's dtype.
std::vector<at::Tensor> sde_step_backward_cpu(const at::Tensor& grad_log_prob, const at::Tensor& u,
                                              const at::Tensor& z, const at::Tensor& prev, const CoefRows& coefs,
                                              bool need_u, bool need_z, bool need_prev);

#ifdef FVG_WITH_CUDA
std::vector<at::Tensor> sde_step_forward_cuda(const at::Tensor& u, const at::Tensor& z, const CoefRows& coefs,
                                              const c10::optional<at::Tensor>& noise,
                                              const c10::optional<at::Tensor>& prev_sample, bool return_mean);

std::vector<at::Tensor> sde_step_backward_cuda(const at::Tensor& grad_log_prob, const at::Tensor& u,
                                               const at::Tensor& z, const at::Tensor& prev, const CoefRows& coefs,
                                               bool need_u, bool need_z, bool need_prev);
#endif

using OptTensor = c10::optional<at::Tensor>;
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fastvideo_grpo::sde_step through the dispatcher (autograd, then the device kernel): the compiled callers'
// entry, without the per-call argument matching of torch.ops.
Fwd call_sde_step(const at::Tensor& u, const at::Tensor& z, const at::Tensor& coefs, const OptTensor& index,
                  int64_t step, const OptTensor& noise, const OptTensor& prev_sample, bool return_mean);

// Argument checks shared by both devices; raise c10::ValueError (Python ValueError) on misuse.
void check_step_args(const at::Tensor& u, const at::Tensor& z);

}  // namespace fvg
