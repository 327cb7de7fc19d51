// The operator fastvideo_grpo::sde_step (fused SDE step + Gaussian log-likelihood) and its backward,
// registered with the dispatcher: schema, CPU / CUDA / Meta kernels, and the autograd formula as a C++
// torch::autograd::Function, so that neither the forward nor the backward runs Python on the hot
// path. python_entry.cpp calls the operator through the dispatcher (call_sde_step: autograd included)
// without the per-call argument matching of `torch.ops`; torch.compile traces the same operator through
// `torch.ops.fastvideo_grpo.sde_step` and its Meta kernels.
//
//   sde_step(model_output, sample, coefs, index, step, noise, prev_sample, return_mean)
//       -> (prev or empty, log_prob_B, mean or empty, std_B)          all in the compute dtype
//   sde_step_backward(grad_log_prob, model_output, sample, prev_sample, coefs, index, step,
//                     need_output, need_sample, need_prev) -> (grad_u or empty, grad_z or empty, grad_prev or empty)
//
// coefs is the (T, 3) float64 table of (A, C, std) rows made once per schedule; index a (B,) integer
// step per sample or None, then `step` for the whole batch (step = -1: row b for sample b).
#include "fused_sde_step.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <tuple>

namespace fvg {

using at::Tensor;
using Bwd = std::tuple<Tensor, Tensor, Tensor>;

namespace {

at::ScalarType compute_type(const Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

template <typename I>
void copy_rows(const Tensor& coefs, const I* idx, int64_t idx_stride, int64_t step, CoefRows& out) {
  const double* tp = coefs.data_ptr<double>();
  const int64_t T = coefs.size(0), s0 = coefs.stride(0), s1 = coefs.stride(1);
  for (int64_t b = 0; b < out.batch; ++b) {
    const int64_t row = idx ? static_cast<int64_t>(idx[b * idx_stride]) : (step < 0 ? b : step);
    TORCH_CHECK_VALUE(row >= 0 && row < T, "step index ", row, " is out of range for a coefficient table of ", T,
                      " steps");
    for (int k = 0; k < 3; ++k) out.host[3 * b + k] = tp[row * s0 + k * s1];
  }
}

}  // namespace

CoefRows lookup_coefs(const Tensor& coefs, const OptTensor& index, int64_t step, int64_t batch,
                      const at::Device& sample_device) {
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(1) == 3 && coefs.scalar_type() == at::kDouble,
                    "coefs must be a (T, 3) float64 table of (A, C, std) rows; got shape ", coefs.sizes(), " and ",
                    coefs.scalar_type());
  const int64_t T = coefs.size(0);
  const bool has_index = defined(index);
  if (has_index) {
    TORCH_CHECK_VALUE(index->dim() == 1 && index->size(0) == batch, "the step index must have shape (", batch,
                      ",) to match the batch; got ", index->sizes());
    TORCH_CHECK_VALUE(at::isIntegralType(index->scalar_type(), /*includeBool=*/false),
                      "the step index must be an integer tensor; got ", index->scalar_type());
  } else if (step < 0) {
    TORCH_CHECK_VALUE(step == -1 && T == batch, "per-sample coefficients (step -1) need one row per sample: ",
                      batch, " samples, ", T, " rows");
  } else {
    TORCH_CHECK_VALUE(step < T, "step ", step, " is out of range for a coefficient table of ", T, " steps");
  }
  CoefRows out;
  out.batch = batch;
  const bool on_host = coefs.device().is_cpu() && (!has_index || index->device().is_cpu());
  if (!on_host) {  // the table or the index lives on the device: gather the rows there
    TORCH_CHECK_VALUE(sample_device.is_cuda(), "the coefficient table and the step index must be CPU tensors for a ",
                      sample_device, " sample");
    const Tensor t = coefs.to(sample_device);
    if (has_index) out.device = t.index_select(0, index->to(sample_device, at::kLong)).contiguous();
    else if (step < 0) out.device = t.contiguous();
    else out.device = t.narrow(0, step, 1).expand({batch, 3}).contiguous();
    return out;
  }
  out.host.resize(3 * batch);
  if (has_index) {
    AT_DISPATCH_INTEGRAL_TYPES(index->scalar_type(), "sde_step_index", [&] {
      copy_rows<scalar_t>(coefs, index->data_ptr<scalar_t>(), index->stride(0), step, out);
    });
  } else {
    copy_rows<int64_t>(coefs, nullptr, 0, step, out);
  }
  if (sample_device.is_cuda() && batch > kMaxInlineSamples) {  // too many to pass by value: one copy
    out.device = at::from_blob(out.host.data(), {batch, 3}, at::kDouble).to(sample_device);
    out.host.clear();
  }
  return out;
}

namespace {

// ----------------------------------------------------------------------------- device kernels

Fwd sde_step_cpu(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index, int64_t step,
                 const OptTensor& noise, const OptTensor& prev_sample, bool return_mean) {
  check_step_args(u, z);
  const CoefRows rows = lookup_coefs(coefs, index, step, z.size(0), z.device());
  auto v = sde_step_forward_cpu(u, z, rows, noise, prev_sample, return_mean);
  return {std::move(v[0]), std::move(v[1]), std::move(v[2]), std::move(v[3])};
}

Bwd sde_step_backward_cpu_op(const Tensor& g, const Tensor& u, const Tensor& z, const Tensor& prev,
                             const Tensor& coefs, const OptTensor& index, int64_t step, bool need_u, bool need_z,
                             bool need_prev) {
  check_step_args(u, z);
  const CoefRows rows = lookup_coefs(coefs, index, step, z.size(0), z.device());
  auto v = sde_step_backward_cpu(g, u, z, prev, rows, need_u, need_z, need_prev);
  if (need_prev && v[2].scalar_type() != prev.scalar_type()) v[2] = v[2].to(prev.scalar_type());
  return {std::move(v[0]), std::move(v[1]), std::move(v[2])};
}

#ifdef FVG_WITH_CUDA
Fwd sde_step_cuda(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index, int64_t step,
                  const OptTensor& noise, const OptTensor& prev_sample, bool return_mean) {
  check_step_args(u, z);
  const CoefRows rows = lookup_coefs(coefs, index, step, z.size(0), z.device());
  auto v = sde_step_forward_cuda(u, z, rows, noise, prev_sample, return_mean);
  return {std::move(v[0]), std::move(v[1]), std::move(v[2]), std::move(v[3])};
}

Bwd sde_step_backward_cuda_op(const Tensor& g, const Tensor& u, const Tensor& z, const Tensor& prev,
                              const Tensor& coefs, const OptTensor& index, int64_t step, bool need_u, bool need_z,
                              bool need_prev) {
  check_step_args(u, z);
  const CoefRows rows = lookup_coefs(coefs, index, step, z.size(0), z.device());
  auto v = sde_step_backward_cuda(g, u, z, prev, rows, need_u, need_z, need_prev);
  if (need_prev && v[2].scalar_type() != prev.scalar_type()) v[2] = v[2].to(prev.scalar_type());
  return {std::move(v[0]), std::move(v[1]), std::move(v[2])};
}
#endif

// Shapes and dtypes only (FakeTensor / torch.compile): symbolic sizes stay symbolic.
Fwd sde_step_meta(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index, int64_t step,
                  const OptTensor& noise, const OptTensor& prev_sample, bool return_mean) {
  TORCH_CHECK_VALUE(z.dim() >= 1, "sample must have a leading batch dimension");
  TORCH_CHECK_VALUE(defined(noise) != defined(prev_sample), "pass exactly one of noise and prev_sample");
  const auto opts = z.options().dtype(compute_type(z));
  const std::vector<c10::SymInt> batch{z.sym_size(0)};
  auto full = [&] { return at::empty_symint(z.sym_sizes(), opts); };
  auto none = [&] { return at::empty({0}, opts); };
  return {defined(noise) ? full() : none(), at::empty_symint(batch, opts), return_mean ? full() : none(),
          at::empty_symint(batch, opts)};
}

Bwd sde_step_backward_meta(const Tensor& g, const Tensor& u, const Tensor& z, const Tensor& prev,
                           const Tensor& coefs, const OptTensor& index, int64_t step, bool need_u, bool need_z,
                           bool need_prev) {
  return {need_u ? at::empty_like(u) : at::empty({0}, u.options()),
          need_z ? at::empty_like(z) : at::empty({0}, z.options()),
          need_prev ? at::empty_like(prev) : at::empty({0}, prev.options())};
}

// ----------------------------------------------------------------------------- dispatcher calls

Fwd call_forward_below_autograd(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index,
                                int64_t step, const OptTensor& noise, const OptTensor& prev, bool return_mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastvideo_grpo::sde_step", "")
                       .typed<Fwd(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                  const OptTensor&, const OptTensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(u, z, coefs, index, step, noise, prev, return_mean);
}

Bwd call_backward(const Tensor& g, const Tensor& u, const Tensor& z, const Tensor& prev, const Tensor& coefs,
                  const OptTensor& index, int64_t step, bool need_u, bool need_z, bool need_prev) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastvideo_grpo::sde_step_backward", "")
                       .typed<Bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const OptTensor&, int64_t, bool, bool, bool)>();
  return op.call(g, u, z, prev, coefs, index, step, need_u, need_z, need_prev);
}

// (B, 3) float64 rows of this call as a tensor on `device` (rare backward paths only; traceable ATen ops).
Tensor coef_rows_tensor(const Tensor& coefs, const OptTensor& index, int64_t step, int64_t batch,
                        const at::Device& device) {
  Tensor rows;
  if (defined(index)) rows = coefs.index_select(0, index->to(coefs.device(), at::kLong));
  else if (step < 0) rows = coefs;
  else rows = coefs.narrow(0, step, 1).expand({batch, 3});
  return rows.to(device);
}

// ----------------------------------------------------------------------------- autograd

// Gradients: the log-prob of a re-scored step is differentiated w.r.t. model_output, sample and
// prev_sample in one fused pass (sde_step_backward); gradients flowing into the returned prev / mean go
// through the affine map mean = A z + C u. In a rollout the log-prob depends on (prev - mean) =
// std * noise only: no gradient to u or z, d lp_b / d noise = -noise / N where std_b > 0, and
// d prev / d noise = std. The coefficient table is a constant.
struct SdeStepFunction : public torch::autograd::Function<SdeStepFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& u,
                                                const Tensor& z, const Tensor& coefs, const OptTensor& index,
                                                int64_t step, const OptTensor& noise, const OptTensor& prev,
                                                bool return_mean) {
    auto [p, lp, mean, sd] = call_forward_below_autograd(u, z, coefs, index, step, noise, prev, return_mean);
    const bool rollout = defined(noise);
    ctx->save_for_backward({u, z, rollout ? *noise : *prev});
    ctx->saved_data["coefs"] = coefs;
    ctx->saved_data["index"] = index;
    ctx->saved_data["step"] = step;
    ctx->saved_data["rollout"] = rollout;
    ctx->saved_data["return_mean"] = return_mean;
    // edge positions of the variable inputs (undefined optionals have no edge)
    ctx->saved_data["side_edge"] = static_cast<int64_t>(3 + (defined(index) ? 1 : 0));
    ctx->set_materialize_grads(false);  // unused outputs (prev / mean) then cost nothing in backward
    torch::autograd::variable_list constant{sd};
    if (!rollout) constant.push_back(p);
    if (!return_mean) constant.push_back(mean);
    ctx->mark_non_differentiable(constant);
    return {p, lp, mean, sd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &u = saved[0], &z = saved[1], &side = saved[2];
    const Tensor coefs = ctx->saved_data["coefs"].toTensor();
    const OptTensor index = ctx->saved_data["index"].toOptional<Tensor>();
    const int64_t step = ctx->saved_data["step"].toInt();
    const bool rollout = ctx->saved_data["rollout"].toBool();
    const bool return_mean = ctx->saved_data["return_mean"].toBool();
    const auto side_edge = static_cast<size_t>(ctx->saved_data["side_edge"].toInt());
    const Tensor &g_prev = grads[0], &g_lp = grads[1], &g_mean = grads[2];
    const bool need_u = ctx->needs_input_grad(0), need_z = ctx->needs_input_grad(1);
    const bool need_side = ctx->needs_input_grad(side_edge);
    const auto cd = compute_type(z);
    const int64_t B = z.size(0);
    Tensor gu, gz, g_side;
    if (!rollout && g_lp.defined() && (need_u || need_z || need_side)) {
      auto [a, b, c] = call_backward(g_lp, u, z, side, coefs, index, step, need_u, need_z, need_side);
      if (need_u) gu = a;
      if (need_z) gz = b;
      if (need_side) g_side = c;
    }
    Tensor extra;  // gradient reaching the mean through the prev (rollout) and mean outputs
    if (rollout && g_prev.defined()) extra = g_prev;
    if (return_mean && g_mean.defined()) extra = extra.defined() ? extra + g_mean : g_mean;
    const bool noise_grad = rollout && need_side && (g_lp.defined() || g_prev.defined());
    if ((extra.defined() && (need_u || need_z)) || noise_grad) {
      const Tensor rows = coef_rows_tensor(coefs, index, step, B, z.device()).to(cd);
      std::vector<int64_t> shape(z.dim(), 1);
      shape[0] = -1;
      const Tensor A = rows.select(1, 0).reshape(shape), C = rows.select(1, 1).reshape(shape);
      const Tensor S = rows.select(1, 2);
      if (extra.defined() && need_u) {
        const Tensor t = (C * extra).to(u.scalar_type());
        gu = gu.defined() ? gu + t : t;
      }
      if (extra.defined() && need_z) {
        const Tensor t = (A * extra).to(z.scalar_type());
        gz = gz.defined() ? gz + t : t;
      }
      if (noise_grad) {
        const int64_t n = B ? z.numel() / B : 1;
        if (g_lp.defined()) {
          g_side = -(at::where(S > 0, g_lp.to(cd) / n, at::zeros_like(S)).reshape(shape) * side);
        }
        if (g_prev.defined()) {
          const Tensor t = g_prev * S.reshape(shape);
          g_side = g_side.defined() ? g_side + t : t;
        }
      }
    }
    // one entry per forward argument: u, z, coefs, index, step, noise, prev_sample, return_mean
    return {gu, gz, Tensor(), Tensor(), Tensor(), rollout ? g_side : Tensor(), rollout ? Tensor() : g_side, Tensor()};
  }
};

Fwd sde_step_autograd(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index, int64_t step,
                      const OptTensor& noise, const OptTensor& prev, bool return_mean) {
  const bool record = torch::autograd::GradMode::is_enabled() &&
                      (u.requires_grad() || z.requires_grad() || (defined(noise) && noise->requires_grad()) ||
                       (defined(prev) && prev->requires_grad()));
  if (!record) return call_forward_below_autograd(u, z, coefs, index, step, noise, prev, return_mean);
  auto out = SdeStepFunction::apply(u, z, coefs, index, step, noise, prev, return_mean);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

Fwd call_sde_step(const Tensor& u, const Tensor& z, const Tensor& coefs, const OptTensor& index, int64_t step,
                  const OptTensor& noise, const OptTensor& prev, bool return_mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastvideo_grpo::sde_step", "")
                       .typed<Fwd(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                  const OptTensor&, const OptTensor&, bool)>();
  return op.call(u, z, coefs, index, step, noise, prev, return_mean);
}

}  // namespace fvg

TORCH_LIBRARY(fastvideo_grpo, m) {
  m.def("sde_step(Tensor model_output, Tensor sample, Tensor coefs, Tensor? index, int step, Tensor? noise, "
        "Tensor? prev_sample, bool return_mean) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sde_step_backward(Tensor grad_log_prob, Tensor model_output, Tensor sample, Tensor prev_sample, "
        "Tensor coefs, Tensor? index, int step, bool need_output, bool need_sample, bool need_prev) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvideo_grpo, CPU, m) {
  m.impl("sde_step", &fvg::sde_step_cpu);
  m.impl("sde_step_backward", &fvg::sde_step_backward_cpu_op);
}

#ifdef FVG_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvideo_grpo, CUDA, m) {
  m.impl("sde_step", &fvg::sde_step_cuda);
  m.impl("sde_step_backward", &fvg::sde_step_backward_cuda_op);
}
#endif

TORCH_LIBRARY_IMPL(fastvideo_grpo, Meta, m) {
  m.impl("sde_step", &fvg::sde_step_meta);
  m.impl("sde_step_backward", &fvg::sde_step_backward_meta);
}

TORCH_LIBRARY_IMPL(fastvideo_grpo, Autograd, m) {
  m.impl("sde_step", &fvg::sde_step_autograd);
  // the backward is not differentiated again: a double backward raises instead of returning zeros
  m.impl("sde_step_backward", torch::autograd::autogradNotImplementedFallback());
}
