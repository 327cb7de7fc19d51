"""Dispatch of the fused SDE step + Gaussian log-likelihood op (compiled kernel or PyTorch reference).

``fused_sde_step`` is the public entry point. It is backed by the custom operator
``torch.ops.fastvideo_grpo.sde_step`` (``torch.library.custom_op``) with a registered autograd
formula and a fake implementation, so it traces under ``torch.compile(fullgraph=True)``. The operator
runs the compiled kernel from ``fastvideo_grpo._C`` when it is importable and supports the tensors'
device (CPU always, CUDA when built with it); otherwise the eager reference in ``reference.py``.
Set ``FVG_DISABLE_EXT=1`` to force the reference.

Gradients: the log-prob of a re-scored step (``prev_sample=`` given) is differentiated w.r.t.
model_output, sample and prev_sample in one fused pass; gradients flowing into the returned
prev / mean go through the affine map mean = A z + C u. The per-sample coefficients are treated
as constants by the operator; if one of them requires grad, the eager reference is used instead.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...utils import rng

from .reference import (_FLOAT_DTYPES, compute_dtype, ddim_coefficients, flow_coefficients, reference_sde_step,
                        reference_sde_step_backward)

__all__ = ["fused_sde_step", "flow_coefficients", "ddim_coefficients", "extension_available", "kernel_supports"]


def _load_extension():
    if os.environ.get("FVG_DISABLE_EXT", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        from fastvideo_grpo import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C if hasattr(_C, "sde_step_forward") else None


_C = _load_extension()


def extension_available() -> bool:
    """True when the compiled ``fastvideo_grpo._C`` kernels were built and imported."""
    return _C is not None


def kernel_supports(t: Tensor) -> bool:
    """Whether the compiled kernel handles a tensor on ``t``'s device (else the reference runs)."""
    if _C is None:
        return False
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and bool(_C.has_cuda())


def _empty(ref: Tensor, dtype: torch.dtype) -> Tensor:
    return ref.new_empty((0,), dtype=dtype)


# ----------------------------------------------------------------------------- custom operator


@torch.library.custom_op("fastvideo_grpo::sde_step", mutates_args=())
def _sde_step_op(
    model_output: Tensor,
    sample: Tensor,
    coef_sample: Tensor,
    coef_output: Tensor,
    std: Tensor,
    noise: Optional[Tensor],
    prev_sample: Optional[Tensor],
    return_mean: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(prev or empty when re-scoring, log_prob_B, mean or empty), all in the compute dtype."""
    if kernel_supports(sample) and model_output.device == sample.device:
        prev, lp, mean = _C.sde_step_forward(model_output, sample, coef_sample, coef_output, std,
                                             noise, prev_sample, return_mean)
        return prev, lp, mean
    prev, lp, mean = reference_sde_step(model_output, sample, coef_sample, coef_output, std,
                                        noise=noise, prev_sample=prev_sample)
    cd = compute_dtype(sample)
    return (prev if noise is not None else _empty(sample, cd), lp,
            mean if return_mean else _empty(sample, cd))


@_sde_step_op.register_fake
def _sde_step_fake(model_output, sample, coef_sample, coef_output, std, noise, prev_sample, return_mean):
    cd = compute_dtype(sample)
    full = sample.new_empty(sample.shape, dtype=cd)
    prev = full if noise is not None else _empty(sample, cd)
    mean = sample.new_empty(sample.shape, dtype=cd) if return_mean else _empty(sample, cd)
    return prev, sample.new_empty((sample.shape[0],), dtype=cd), mean


@torch.library.custom_op("fastvideo_grpo::sde_step_backward", mutates_args=())
def _sde_step_backward_op(
    model_output: Tensor,
    sample: Tensor,
    prev_sample: Tensor,
    coef_sample: Tensor,
    coef_output: Tensor,
    weight: Tensor,
    need_output: bool,
    need_sample: bool,
    need_prev: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Log-prob backward of a re-scored step (see ``reference_sde_step_backward``); unrequested grads are empty."""
    if kernel_supports(sample) and model_output.device == sample.device:
        gu, gz, gp = _C.sde_step_backward(model_output, sample, prev_sample, coef_sample, coef_output, weight,
                                          need_output, need_sample, need_prev)
        return gu, gz, (gp.to(prev_sample.dtype) if need_prev else gp)
    gu, gz, gp = reference_sde_step_backward(model_output, sample, prev_sample, coef_sample, coef_output, weight,
                                             need_output, need_sample, need_prev)
    return (gu if need_output else _empty(model_output, model_output.dtype),
            gz if need_sample else _empty(sample, sample.dtype),
            gp if need_prev else _empty(prev_sample, prev_sample.dtype))


@_sde_step_backward_op.register_fake
def _sde_step_backward_fake(model_output, sample, prev_sample, coef_sample, coef_output, weight,
                            need_output, need_sample, need_prev):
    return (torch.empty_like(model_output) if need_output else _empty(model_output, model_output.dtype),
            torch.empty_like(sample) if need_sample else _empty(sample, sample.dtype),
            torch.empty_like(prev_sample) if need_prev else _empty(prev_sample, prev_sample.dtype))


def _setup_context(ctx, inputs, output):
    model_output, sample, coef_sample, coef_output, std, noise, prev_sample, return_mean = inputs
    ctx.rollout = noise is not None
    ctx.return_mean = return_mean
    ctx.save_for_backward(model_output, sample, coef_sample, coef_output, std, prev_sample, noise)
    ctx.set_materialize_grads(False)  # unused outputs (prev / mean) then cost nothing in backward


def _backward(ctx, g_prev, g_lp, g_mean):
    model_output, sample, coef_sample, coef_output, std, prev_sample, noise = ctx.saved_tensors
    need_u, need_z, _, _, _, need_noise, need_prev, _ = ctx.needs_input_grad
    cd = compute_dtype(sample)
    gu = gz = gp = gn = None
    if not ctx.rollout and g_lp is not None and (need_u or need_z or need_prev):
        n = sample[0].numel() if sample.shape[0] else 1
        s = std.to(cd)
        w = torch.where(s > 0, g_lp.to(cd) / (torch.where(s > 0, s, torch.ones_like(s)) ** 2 * n),
                        torch.zeros_like(s))
        gu, gz, gp = torch.ops.fastvideo_grpo.sde_step_backward(model_output, sample, prev_sample, coef_sample,
                                                                coef_output, w, need_u, need_z, need_prev)
        gu = gu if need_u else None
        gz = gz if need_z else None
        gp = gp if need_prev else None
    # In a rollout, log_prob depends on (prev - mean) = std * noise only: no gradient to u or z,
    # d lp_b / d noise = -noise / N where std_b > 0; d prev / d noise = std.
    extra = None
    shape = (-1,) + (1,) * (sample.ndim - 1)
    if ctx.rollout and need_noise:
        n = sample[0].numel() if sample.shape[0] else 1
        s = std.to(cd)
        if g_lp is not None:
            gn = -(torch.where(s > 0, g_lp.to(cd) / n, torch.zeros_like(s)).reshape(shape) * noise)
        if g_prev is not None:
            t = g_prev * s.reshape(shape)
            gn = t if gn is None else gn + t
    if ctx.rollout and g_prev is not None:
        extra = g_prev
    if ctx.return_mean and g_mean is not None:
        extra = g_mean if extra is None else extra + g_mean
    if extra is not None:
        if need_u:
            t = coef_output.to(cd).reshape(shape) * extra
            gu = t.to(model_output.dtype) if gu is None else gu + t.to(model_output.dtype)
        if need_z:
            t = coef_sample.to(cd).reshape(shape) * extra
            gz = t.to(sample.dtype) if gz is None else gz + t.to(sample.dtype)
    return gu, gz, None, None, None, gn, gp, None


_sde_step_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


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
            ``flow_coefficients`` / ``ddim_coefficients``.
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
        prev, lp, mean = torch.ops.fastvideo_grpo.sde_step(model_output, sample, *coefs, noise, prev_sample,
                                                           return_mean)
        if prev_sample is not None:
            prev = prev_sample.to(cd)
    return (prev, lp, mean) if return_mean else (prev, lp)
