// Python entries of fastvideo_grpo._C: the fused SDE step reached from Python with as little host work
// as one ATen call's worth (the operator itself is registered in sde_step_op.cpp).
//
//   sde_step(...)  the operator through the dispatcher, without torch.ops' per-call argument matching;
//   StepTable      a schedule's coefficient table, cached, and its step: the schedules' hot path
//                  (fastvideo_grpo.sde.ops.CoefficientTable wraps it); one call from Python does the
//                  eligibility test, the table look-up, the rollout's noise draw, the operator and the
//                  step contract (prev, log_prob, mean or None, std).
#include "fused_sde_step.h"

#include <torch/csrc/DynamicTypes.h>
#include <torch/extension.h>

#include <utility>
#include <vector>

namespace fvg {
namespace {

using at::Tensor;

bool served(const Tensor& t) {
#ifdef FVG_WITH_CUDA
  return t.is_cpu() || t.is_cuda();
#else
  return t.is_cpu();
#endif
}

bool float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf;
}

at::ScalarType compute_type(const Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// One step with a coefficient table, Python objects in and out: None when the kernel does not serve
// these tensors (model_output not a float tensor of the sample's shape and device, a sample without a
// batch dim, or a device without the kernel) -- decided before any draw, so that the caller's plain
// path then draws the same noise. Otherwise the rollout's noise comes from
// draw(shape, generator, device=, dtype=) (fastvideo_grpo.utils.rng.randn), the operator runs, and the step
// contract (prev, log_prob, mean or None, std) is returned, prev being the stored prev_sample itself (in
// the compute dtype) when re-scoring. `index` is an int or an integer tensor ((B,) or 0-d).
py::object table_step(py::handle u_obj, const Tensor& z, const Tensor& coefs, py::handle index_obj,
                      py::handle prev_obj, py::handle generator, py::handle draw, bool return_mean) {
  if (!THPVariable_Check(u_obj.ptr())) return py::none();
  const Tensor& u = THPVariable_Unpack(u_obj.ptr());
  if (z.dim() < 1 || !served(z) || u.device() != z.device() || !float_type(u.scalar_type()) ||
      !float_type(z.scalar_type()) || u.sizes() != z.sizes())
    return py::none();
  OptTensor index;
  int64_t step = 0;
  if (THPVariable_Check(index_obj.ptr())) {
    const Tensor& t = THPVariable_Unpack(index_obj.ptr());
    index = t.dim() == 0 ? t.expand({z.size(0)}) : t;
  } else {
    step = py::cast<int64_t>(index_obj);
    TORCH_CHECK_VALUE(step >= 0, "step index ", step, " is out of range");
  }
  const auto cd = compute_type(z);
  OptTensor noise, prev;
  if (prev_obj.is_none()) {
    const auto dtype = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(cd)));
    noise = py::cast<Tensor>(draw(py::cast(z.sizes().vec()), generator, py::arg("device") = py::cast(z.device()),
                                  py::arg("dtype") = dtype));
  } else {
    prev = py::cast<Tensor>(prev_obj);
  }
  auto [p, lp, mean, sd] = call_sde_step(u, z, coefs, index, step, noise, prev, return_mean);
  if (prev) p = prev->scalar_type() == cd ? *prev : prev->to(cd);
  return py::make_tuple(std::move(p), std::move(lp), return_mean ? py::cast(std::move(mean)) : py::none(),
                        std::move(sd));
}

// A schedule's (T, 3) coefficient table, made by make(*sources) on first use and again only when a source
// tensor is replaced or edited in place (identity and version counter, as sde._DeviceTables keys its
// copies); plus one copy per device for step indices that live on a GPU.
class StepTable {
 public:
  Tensor get(py::handle make, const py::tuple& sources, py::handle index) {
    bool fresh = table_.defined() && sources.size() == sources_.size();
    for (size_t i = 0; fresh && i < sources.size(); ++i) {
      PyObject* o = sources[i].ptr();
      fresh = o == sources_[i].ptr() && THPVariable_Check(o) && THPVariable_Unpack(o)._version() == versions_[i];
    }
    if (!fresh) remake(make, sources);
    if (!THPVariable_Check(index.ptr())) return table_;
    const Tensor& idx = THPVariable_Unpack(index.ptr());
    if (idx.is_cpu()) return table_;
    for (const auto& [dev, copy] : copies_)
      if (dev == idx.device()) return copy;
    copies_.emplace_back(idx.device(), table_.to(idx.device()));
    return copies_.back().second;
  }

  py::object step(py::handle make, const py::tuple& sources, py::handle index, py::handle u, const Tensor& z,
                  py::handle prev, py::handle generator, py::handle draw, bool return_mean) {
    return table_step(u, z, get(make, sources, index), index, prev, generator, draw, return_mean);
  }

 private:
  void remake(py::handle make, const py::tuple& sources) {
    table_ = py::cast<Tensor>(make(*sources));
    sources_.clear();
    versions_.clear();
    copies_.clear();
    for (auto s : sources) {
      TORCH_CHECK_VALUE(THPVariable_Check(s.ptr()), "coefficient table sources must be tensors");
      sources_.push_back(py::reinterpret_borrow<py::object>(s));
      versions_.push_back(THPVariable_Unpack(s.ptr())._version());
    }
  }

  std::vector<py::object> sources_;
  std::vector<int64_t> versions_;
  Tensor table_;
  std::vector<std::pair<c10::Device, Tensor>> copies_;
};

bool has_cuda() {
#ifdef FVG_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fvg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvideo_grpo compiled kernels (fused SDE step + Gaussian log-likelihood)";
  m.def("sde_step", &fvg::call_sde_step,
        "fastvideo_grpo::sde_step through the dispatcher -> (prev|empty, log_prob, mean|empty, std)",
        py::arg("model_output"), py::arg("sample"), py::arg("coefs"), py::arg("index"), py::arg("step"),
        py::arg("noise"), py::arg("prev_sample"), py::arg("return_mean"));
  m.def("table_step", &fvg::table_step,
        "sde_step at a table's step -> (prev, log_prob, mean or None, std), or None where the kernel does not serve",
        py::arg("model_output"), py::arg("sample"), py::arg("coefs"), py::arg("index"), py::arg("prev_sample"),
        py::arg("generator"), py::arg("draw"), py::arg("return_mean"));
  py::class_<fvg::StepTable>(m, "StepTable", "a schedule's cached coefficient table and its fused step")
      .def(py::init<>())
      .def("get", &fvg::StepTable::get, py::arg("make"), py::arg("sources"), py::arg("index") = py::none())
      .def("step", &fvg::StepTable::step, py::arg("make"), py::arg("sources"), py::arg("index"),
           py::arg("model_output"), py::arg("sample"), py::arg("prev_sample"), py::arg("generator"), py::arg("draw"),
           py::arg("return_mean"));
  m.def("has_cuda", &fvg::has_cuda, "whether the CUDA kernels were compiled in");
  m.attr("chunk") = py::int_(fvg::kChunk);
  m.attr("max_inline_samples") = py::int_(fvg::kMaxInlineSamples);
}
