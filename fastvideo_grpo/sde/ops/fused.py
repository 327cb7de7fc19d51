"""Dispatch of the fused SDE step + Gaussian log-likelihood op (compiled kernel or PyTorch reference).

Two entry points, one operator (``torch.ops.fastvideo_grpo.sde_step``):

* ``sde_step_at(model_output, sample, coefs, index, ...)``: the schedules' hot path. ``coefs`` is the
  (T, 3) float64 table of (A, C, std) per step that a schedule makes once (``flow_coefficient_table`` over
  its step form's coefficients / ``ddim_coefficient_table``, cached by ``CoefficientTable``); ``index`` names each sample's step (an int
  for the whole batch or a (B,) integer tensor). The kernel looks the rows up itself: no per-call
  coefficient arithmetic.
* ``fused_sde_step(model_output, sample, A, C, std, ...)``: per-sample coefficients given as tensors
  (a (B, 3) table made per call; for tests, benchmarks and callers without a schedule).

With the compiled extension ``fastvideo_grpo._C`` the operator is registered in C++ (schema, CPU / CUDA
/ Meta kernels, and the autograd formula as a C++ ``torch::autograd::Function``; csrc/sde_step_op.cpp).
Eager calls enter the dispatcher from C++ (csrc/python_entry.cpp): the schedules' step is one call to
``_C.StepTable.step`` (table cache, eligibility test, noise draw, operator, result tuple), so neither the
forward nor the backward runs Python beyond that call; under ``torch.compile`` the same operator is
traced through ``torch.ops`` with its Meta kernels (the schedules then take their per-call path).
Without the extension (not built, FVG_SKIP_EXT_BUILD=1, or FVG_DISABLE_EXT=1) the same operator is
defined here with ``torch.library.custom_op`` over the eager reference (reference.py) with the same
closed-form backward and a fake implementation. Tensors on a device the
compiled kernels do not serve take the eager reference.

Gradients: the log-prob of a re-scored step (``prev_sample=`` given) is differentiated w.r.t.
model_output, sample and prev_sample in one fused pass; gradients flowing into the returned prev / mean go
through the affine map mean = A z + C u. The coefficients are constants of the operator; if a per-sample
coefficient tensor given to ``fused_sde_step`` requires grad, the eager reference runs instead.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...utils import rng
from ...utils.transfer import to_device

from .reference import (_FLOAT_DTYPES, compute_dtype, cps_coefficients, ddim_coefficients, flow_coefficients,
                        reference_sde_step, reference_sde_step_backward)

__all__ = ["fused_sde_step", "sde_step_at", "flow_coefficients", "cps_coefficients", "ddim_coefficients",
           "flow_coefficient_table", "ddim_coefficient_table", "CoefficientTable", "extension_available",
           "kernel_supports"]


def _load_extension():
    if os.environ.get("FVG_DISABLE_EXT", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        from fastvideo_grpo import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C if hasattr(_C, "StepTable") else None  # an extension built from older sources: not used


_C = _load_extension()
_HAS_CUDA_KERNEL = bool(_C is not None and _C.has_cuda())


def extension_available() -> bool:
    """True when the compiled ``fastvideo_grpo._C`` kernels were built and imported."""
    return _C is not None


def kernel_supports(t: Tensor) -> bool:
    """Whether the compiled kernel handles a tensor on ``t``'s device (else the reference runs)."""
    if _C is None:
        return False
    kind = t.device.type
    return kind == "cpu" or (kind == "cuda" and _HAS_CUDA_KERNEL)


def _empty(ref: Tensor, dtype: torch.dtype) -> Tensor:
    return ref.new_empty((0,), dtype=dtype)


def coefficient_rows(coefs: Tensor, index: Optional[Tensor], step: int, batch: int, device,
                     check_index: bool = True) -> Tuple[Tensor, ...]:
    """(A_B, C_B, std_B) in float64 on ``device``: rows ``index`` of the (T, 3) table, row ``step`` for every
    sample, or row b for sample b (``step == -1``). What the compiled kernel looks up; checks the arguments
    (the index values too when ``check_index`` and it is on the CPU: not in traced code, where they are unknown)."""
    if coefs.ndim != 2 or coefs.shape[1] != 3 or coefs.dtype != torch.float64:
        raise ValueError(f"coefs must be a (T, 3) float64 table of (A, C, std) rows; got shape "
                         f"{tuple(coefs.shape)} and {coefs.dtype}")
    T = coefs.shape[0]
    if index is not None:
        if index.shape != (batch,):
            raise ValueError(f"the step index must have shape ({batch},) to match the batch; "
                             f"got {tuple(index.shape)}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"the step index must be an integer tensor; got {index.dtype}")
        if (check_index and index.device.type == "cpu" and index.numel()
                and not (0 <= int(index.min()) and int(index.max()) < T)):
            raise ValueError(f"step index {index.tolist()} is out of range for a coefficient table of {T} steps")
        rows = coefs[index.to(coefs.device)]
    elif step < 0:
        if step != -1 or T != batch:
            raise ValueError(f"per-sample coefficients (step -1) need one row per sample: {batch} samples, {T} rows")
        rows = coefs
    else:
        if step >= T:
            raise ValueError(f"step {step} is out of range for a coefficient table of {T} steps")
        rows = coefs[step].expand(batch, 3)
    rows = to_device(rows, device)  # per call without the extension: no host sync for a host table
    return rows[:, 0], rows[:, 1], rows[:, 2]


# ----------------------------------------------------------------------------- operator without the extension


def _define_python_operator():
    """``fastvideo_grpo::sde_step`` (+ backward) over the eager reference, same schema as the C++ one."""

    @torch.library.custom_op("fastvideo_grpo::sde_step", mutates_args=())
    def sde_step_op(
        model_output: Tensor,
        sample: Tensor,
        coefs: Tensor,
        index: Optional[Tensor],
        step: int,
        noise: Optional[Tensor],
        prev_sample: Optional[Tensor],
        return_mean: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prev or empty when re-scoring, log_prob_B, mean or empty, std_B), all in the compute dtype."""
        if (noise is None) == (prev_sample is None):
            raise ValueError("pass exactly one of noise and prev_sample")
        A, C, S = coefficient_rows(coefs, index, step, sample.shape[0], sample.device)
        prev, lp, mean = reference_sde_step(model_output, sample, A, C, S, noise=noise, prev_sample=prev_sample)
        cd = compute_dtype(sample)
        return (prev if noise is not None else _empty(sample, cd), lp,
                mean if return_mean else _empty(sample, cd), S.to(cd, copy=True))

    @sde_step_op.register_fake
    def _(model_output, sample, coefs, index, step, noise, prev_sample, return_mean):
        cd = compute_dtype(sample)
        prev = sample.new_empty(sample.shape, dtype=cd) if noise is not None else _empty(sample, cd)
        mean = sample.new_empty(sample.shape, dtype=cd) if return_mean else _empty(sample, cd)
        B = sample.shape[0]
        return prev, sample.new_empty((B,), dtype=cd), mean, sample.new_empty((B,), dtype=cd)

    @torch.library.custom_op("fastvideo_grpo::sde_step_backward", mutates_args=())
    def sde_step_backward_op(
        grad_log_prob: Tensor,
        model_output: Tensor,
        sample: Tensor,
        prev_sample: Tensor,
        coefs: Tensor,
        index: Optional[Tensor],
        step: int,
        need_output: bool,
        need_sample: bool,
        need_prev: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Log-prob backward of a re-scored step (see ``reference_sde_step_backward``); unrequested grads are empty."""
        cd = compute_dtype(sample)
        A, C, S = coefficient_rows(coefs, index, step, sample.shape[0], sample.device)
        s = S.to(cd)
        n = sample[0].numel() if sample.shape[0] else 1
        w = torch.where(s > 0, grad_log_prob.to(cd) / (torch.where(s > 0, s, torch.ones_like(s)) ** 2 * n),
                        torch.zeros_like(s))
        gu, gz, gp = reference_sde_step_backward(model_output, sample, prev_sample, A.to(cd), C.to(cd), w,
                                                 need_output, need_sample, need_prev)
        return (gu if need_output else _empty(model_output, model_output.dtype),
                gz if need_sample else _empty(sample, sample.dtype),
                gp if need_prev else _empty(prev_sample, prev_sample.dtype))

    @sde_step_backward_op.register_fake
    def _(grad_log_prob, model_output, sample, prev_sample, coefs, index, step, need_output, need_sample, need_prev):
        return (torch.empty_like(model_output) if need_output else _empty(model_output, model_output.dtype),
                torch.empty_like(sample) if need_sample else _empty(sample, sample.dtype),
                torch.empty_like(prev_sample) if need_prev else _empty(prev_sample, prev_sample.dtype))

    def setup_context(ctx, inputs, output):
        model_output, sample, coefs, index, step, noise, prev_sample, return_mean = inputs
        ctx.rollout = noise is not None
        ctx.return_mean = return_mean
        ctx.step = step
        ctx.save_for_backward(model_output, sample, coefs, index, noise if ctx.rollout else prev_sample)
        ctx.set_materialize_grads(False)  # unused outputs (prev / mean) then cost nothing in backward

    def backward(ctx, g_prev, g_lp, g_mean, _g_std):
        model_output, sample, coefs, index, side = ctx.saved_tensors
        need_u, need_z, _, _, _, need_noise, need_prev, _ = ctx.needs_input_grad
        need_side = need_noise if ctx.rollout else need_prev
        cd = compute_dtype(sample)
        gu = gz = g_side = None
        if not ctx.rollout and g_lp is not None and (need_u or need_z or need_side):
            gu, gz, g_side = torch.ops.fastvideo_grpo.sde_step_backward(
                g_lp, model_output, sample, side, coefs, index, ctx.step, need_u, need_z, need_side)
            gu = gu if need_u else None
            gz = gz if need_z else None
            g_side = g_side if need_side else None
        extra = g_prev if ctx.rollout else None
        if ctx.return_mean and g_mean is not None:
            extra = g_mean if extra is None else extra + g_mean
        noise_grad = ctx.rollout and need_side and (g_lp is not None or g_prev is not None)
        if (extra is not None and (need_u or need_z)) or noise_grad:
            rows = coefficient_rows(coefs, index, ctx.step, sample.shape[0], sample.device, check_index=False)
            A, C, S = (t.to(cd) for t in rows)
            shape = (-1,) + (1,) * (sample.ndim - 1)
            if extra is not None and need_u:
                t = (C.reshape(shape) * extra).to(model_output.dtype)
                gu = t if gu is None else gu + t
            if extra is not None and need_z:
                t = (A.reshape(shape) * extra).to(sample.dtype)
                gz = t if gz is None else gz + t
            if noise_grad:  # lp depends on (prev - mean) = std * noise only; d prev / d noise = std
                n = sample[0].numel() if sample.shape[0] else 1
                if g_lp is not None:
                    g_side = -(torch.where(S > 0, g_lp.to(cd) / n, torch.zeros_like(S)).reshape(shape) * side)
                if g_prev is not None:
                    t = g_prev * S.reshape(shape)
                    g_side = t if g_side is None else g_side + t
        return (gu, gz, None, None, None, g_side if ctx.rollout else None, None if ctx.rollout else g_side, None)

    sde_step_op.register_autograd(backward, setup_context=setup_context)


_PYTHON_OPERATOR = _C is None
if _PYTHON_OPERATOR:
    _define_python_operator()


# ----------------------------------------------------------------------------- calls


def _call_op(model_output, sample, coefs, index, step, noise, prev_sample, return_mean):
    """The operator: through ``_C.sde_step`` (straight into the dispatcher) when compiled and not tracing,
    through ``torch.ops`` when tracing or without the extension, the eager reference on other devices."""
    if kernel_supports(sample):
        if not torch.compiler.is_compiling():
            return _C.sde_step(model_output, sample, coefs, index, step, noise, prev_sample, return_mean)
    elif not _PYTHON_OPERATOR:  # a device the compiled kernels do not serve (or _C switched off after import)
        A, C, S = coefficient_rows(coefs, index, step, sample.shape[0], sample.device)
        prev, lp, mean = reference_sde_step(model_output, sample, A, C, S, noise=noise, prev_sample=prev_sample)
        return prev, lp, mean, S.to(compute_dtype(sample))
    return torch.ops.fastvideo_grpo.sde_step(model_output, sample, coefs, index, step, noise, prev_sample,
                                             return_mean)


def sde_step_at(
    model_output: Tensor,
    sample: Tensor,
    coefs: Tensor,
    index,
    *,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_mean: bool = False,
):
    """One sampler step at step ``index`` of a coefficient table: the schedules' hot path.

    Args:
        model_output, sample: u and z_t (same shape, leading batch dim B, float dtypes: the compiled kernel
            serves those on the CPU, and on CUDA when built with it; anything else runs the reference).
        coefs: (T, 3) float64 table of (A, C, std) per step (CPU; on the sample's device only when
            ``index`` lives there, see ``CoefficientTable.get``).
        index: int (every sample at that step) or a (B,) integer tensor (one step per sample).
        prev_sample / generator / return_mean: as in ``fused_sde_step``.

    Returns ``(prev_sample, log_prob_B, mean or None, std_B)`` in the compute dtype.
    """
    if _C is not None and not torch.compiler.is_compiling():
        # the eligibility test, the noise draw, the operator and the step contract in one C++ call
        out = _C.table_step(model_output, sample, coefs, index, prev_sample, generator, rng.randn, return_mean)
        if out is not None:
            return out
    noise = None
    if prev_sample is None:
        noise = rng.randn(sample.shape, generator, device=sample.device, dtype=compute_dtype(sample))
    if isinstance(index, int):
        idx, step = None, int(index)
    else:
        idx, step = (index.expand(sample.shape[0]) if index.ndim == 0 else index), 0
    prev, lp, mean, std = _call_op(model_output, sample, coefs, idx, step, noise, prev_sample, return_mean)
    if noise is None:
        prev = prev_sample.to(compute_dtype(sample))
    return prev, lp, (mean if return_mean else None), std


# ----------------------------------------------------------------------------- per-sample coefficients


def _check_coef(name: str, v: Tensor, batch: int, device) -> Tensor:
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) to match the batch; got {tuple(v.shape)}")
    return v


def fused_sde_step(
    model_output: Tensor,
    sample: Tensor,
    coef_sample_B: Tensor,
    coef_output_B: Tensor,
    std_B: Tensor,
    *,
    noise: Optional[Tensor] = None,
    prev_sample: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_mean: bool = False,
):
    """One sampler step with mean = A z + C u and its Gaussian log-prob, fused into one memory pass.

    Args:
        model_output: u, same shape as ``sample`` (any float dtype).
        sample: z_t with a leading batch dim B (float32/float64/bfloat16/float16).
        coef_sample_B, coef_output_B, std_B: per-sample A, C, std (scalars or (B,)); see
            ``flow_coefficients`` / ``ddim_coefficients``. They are rounded to the compute dtype
            before use (a schedule's table gives the same values; ``sde_step_at`` is its faster path).
        noise: standard normal noise for a rollout; drawn with ``generator`` when neither it nor
            ``prev_sample`` is given (same draw as ``sde.flow_sde_step``).
        prev_sample: a stored z_s to re-score (training); the returned log-prob is then bit-identical
            to the rollout call that produced it.
        return_mean: also return the step mean (one extra write).

    Returns ``(prev_sample, log_prob_B)`` or ``(prev_sample, log_prob_B, mean)``, in float32
    (float64 for float64 samples); log_prob is 0 where std == 0.
    """
    if not isinstance(sample, Tensor) or not isinstance(model_output, Tensor):
        raise ValueError("model_output and sample must be tensors")
    if sample.ndim < 1:
        raise ValueError("sample must have a leading batch dimension")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
    for name, t in (("model_output", model_output), ("sample", sample)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float64, bfloat16 or float16; got {t.dtype}")
    if noise is not None and prev_sample is not None:
        raise ValueError("pass at most one of noise= (rollout) and prev_sample= (re-scoring)")
    cd = compute_dtype(sample)
    B = sample.shape[0]
    coefs = [_check_coef(n, v, B, sample.device).to(cd)
             for n, v in (("coef_sample_B", coef_sample_B), ("coef_output_B", coef_output_B), ("std_B", std_B))]
    if prev_sample is None and noise is None:
        noise = rng.randn(sample.shape, generator, device=sample.device, dtype=cd)
    for name, t in (("noise", noise), ("prev_sample", prev_sample)):
        if t is not None and t.shape != sample.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(sample.shape)}")
    if noise is not None:
        noise = noise.to(cd)
    if torch.is_grad_enabled() and any(c.requires_grad for c in coefs):
        prev, lp, mean = reference_sde_step(model_output, sample, *coefs, noise=noise, prev_sample=prev_sample)
    else:
        # per-sample rows (step -1): the compute-dtype coefficients widened to float64, exactly
        table = torch.stack(coefs, dim=1).to(torch.float64)
        prev, lp, mean, _ = _call_op(model_output, sample, table, None, -1, noise, prev_sample, return_mean)
        if prev_sample is not None:
            prev = prev_sample.to(cd)
    return (prev, lp, mean) if return_mean else (prev, lp)


# ----------------------------------------------------------------------------- per-schedule tables


def flow_coefficient_table(sigmas: Tensor, eta: Tensor, coefficients=flow_coefficients) -> Tensor:
    """(T, 3) float64 CPU table of a flow step's (A, C, std) per step: the values ``coefficients`` (a
    ``(sigma, sigma_next, eta) -> (A, C, std)`` function: ``flow_coefficients``, the default, or
    ``cps_coefficients``) gives for (sigma_t, sigma_{t+1}, eta_t), computed once for the whole schedule."""
    s = sigmas.detach().to("cpu", torch.float64)
    return torch.stack(coefficients(s[:-1], s[1:], eta.detach().to("cpu", torch.float64)), dim=1).contiguous()


def ddim_coefficient_table(alpha_t: Tensor, alpha_prev: Tensor, eta: Tensor) -> Tensor:
    """(T, 3) float64 CPU table of the DDIM step's (A, C, std) per step (``ddim_coefficients`` per step)."""
    a_t, a_prev, e = (t.detach().to("cpu", torch.float64) for t in (alpha_t, alpha_prev, eta))
    return torch.stack(ddim_coefficients(a_t, a_prev, e), dim=1).contiguous()


class CoefficientTable:
    """A schedule's coefficient table and its fused step: the schedules' hot path.

    The (T, 3) table is made on first use and again only when a source tensor changes: keyed by the
    identity and version of the sources (sigmas / alphas and eta), as ``sde._DeviceTables`` keys its
    copies, so reassigning or editing a table in place makes a new one. It stays on the CPU (the kernel
    looks rows up on the host and passes them by value to a GPU launch); for a step index that lives on a
    GPU, one device copy is kept as well. With the extension the cache and the step are ``_C.StepTable``
    (one call from Python per step); copies of a schedule start with an empty cache."""

    def __init__(self):
        self._native = _C.StepTable() if _C is not None else None
        self._sources = ()
        self._versions = ()
        self._table = None
        self._copies = {}

    def get(self, make, sources: Tuple[Tensor, ...], index=None) -> Tensor:
        """The table ``make(*sources)``; on ``index``'s device when ``index`` is a tensor off the CPU."""
        if self._native is not None:
            return self._native.get(make, sources, index)
        table = self._table
        fresh = table is not None and len(sources) == len(self._sources)
        for old, version, new in zip(self._sources, self._versions, sources):
            fresh = fresh and old is new and new._version == version
        if not fresh:
            table = self._table = make(*sources)
            self._sources, self._versions, self._copies = tuple(sources), tuple(t._version for t in sources), {}
        if not isinstance(index, Tensor) or index.is_cpu:
            return table
        if index.device not in self._copies:
            self._copies[index.device] = table.to(index.device)
        return self._copies[index.device]

    def step(self, make, sources, index, model_output, sample, prev_sample, generator, return_mean):
        """The fused step at ``index`` with this table, as ``sde_step_at`` returns it, or None when the
        compiled kernel does not serve these tensors (model_output not a float tensor of the sample's shape
        and device, a sample without a batch dim, a device without the kernel), without the extension, or
        under torch.compile: the caller then takes its plain path (decided before any noise is drawn)."""
        if self._native is None or _C is None or torch.compiler.is_compiling():
            return None
        # the eligibility test, the look-up, the noise draw, the operator and the step contract in one C++ call
        return self._native.step(make, sources, index, model_output, sample, prev_sample, generator, rng.randn,
                                 return_mean)

    def __deepcopy__(self, memo):
        return CoefficientTable()

    def __reduce__(self):
        return (CoefficientTable, ())
