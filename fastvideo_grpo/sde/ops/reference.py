"""Pure-PyTorch reference of the fused SDE step + Gaussian log-likelihood (eager elementwise ops).

Every sampler step in ``fastvideo_grpo.sde`` has a mean that is affine in the sample z and the model
output u, per sample b:  mean = A_b * z + C_b * u,  std = std_b.  ``flow_coefficients``,
``cps_coefficients`` and ``ddim_coefficients`` compute (A, C, std) from the schedule values (tiny (B,)
tensors, float64);
``reference_sde_step`` then does the per-element work the compiled kernel fuses into one pass:

    prev   = mean + std * noise            (rollout)   or the given prev_sample (re-scoring)
    lp_b   = mean_i[ -(prev - mean)^2 / (2 std^2) - log std - 0.5 log(2 pi) ]   (0 where std == 0)
           = -sum_i (prev - mean)^2 / (2 std^2 N) - log std - 0.5 log(2 pi)

Arithmetic runs in float32 (float64 for float64 samples), as in ``sde.py``. This module is the
fallback when ``fastvideo_grpo._C`` is missing and the ground truth the kernels are tested against.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def compute_dtype(sample: torch.Tensor) -> torch.dtype:
    """float64 samples compute in float64, everything else in float32 (same rule as ``sde.py``)."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def _coef_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _as_batch(values, batch_size: Optional[int], device) -> Tuple[torch.Tensor, ...]:
    """Scalars / (B,) tensors -> float64 tensors of one common shape ((B,) when batch_size is given)."""
    dt = _coef_dtype(device if device is not None else "cpu")
    ts = []
    for v in values:
        t = torch.as_tensor(v)
        t = t.to(device=device if device is not None else t.device, dtype=dt)
        if t.ndim > 1:
            raise ValueError(f"schedule values must be scalars or 1-D (B,) tensors; got shape {tuple(t.shape)}")
        ts.append(t)
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    if batch_size is not None:
        if shape not in ((), (batch_size,)):
            raise ValueError(
                f"schedule values must be scalars or shape ({batch_size},) to match the batch; got {tuple(shape)}"
            )
        shape = (batch_size,)
    return tuple(t.expand(shape) for t in ts)


def flow_coefficients(sigma, sigma_next, eta, *, batch_size: Optional[int] = None, device=None):
    """(A, C, std) of the rectified-flow Euler-Maruyama step (``sde.flow_sde_step``), float64.

    With x_hat = z - s u and score = -(z - (1 - s) x_hat) / s^2 = -(z + (1 - s) u) / s,
    mean = z + (u - e^2/2 score) dt with dt = s' - s gives
        A = 1 + e^2 dt / (2 s),   C = dt (1 + e^2 (1 - s) / (2 s)),   std = e sqrt(max(-dt, 0)).
    """
    s, s_next, e = _as_batch((sigma, sigma_next, eta), batch_size, device)
    dt = s_next - s
    half_e2_over_s = 0.5 * e * e / s
    coef_sample = 1.0 + half_e2_over_s * dt
    coef_output = dt * (1.0 + half_e2_over_s * (1.0 - s))
    std = e * torch.sqrt(torch.clamp(-dt, min=0.0))
    return coef_sample, coef_output, std


def cps_coefficients(sigma, sigma_next, eta, *, batch_size: Optional[int] = None, device=None):
    """(A, C, std) of the coefficients-preserving step (CPS, ``sde.flow_cps_step``), float64.

    With x0 = z - s u and x1 = z + (1 - s) u (the data and noise predictions), std = s' sin(eta pi / 2) and
    c = sqrt(max(s'^2 - std^2, 0)), mean = (1 - s') x0 + c x1 gives
        A = (1 - s') + c,   C = (1 - s) c - s (1 - s'),   std = s' sin(eta pi / 2).
    """
    s, s_next, e = _as_batch((sigma, sigma_next, eta), batch_size, device)
    std = s_next * torch.sin(e * (0.5 * math.pi))
    c = torch.sqrt(torch.clamp(s_next * s_next - std * std, min=0.0))
    coef_sample = (1.0 - s_next) + c
    coef_output = (1.0 - s) * c - s * (1.0 - s_next)
    return coef_sample, coef_output, std


def ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, eta, *, batch_size: Optional[int] = None, device=None):
    """(A, C, std) of the eps-prediction DDIM step with stochasticity eta (``sde.ddim_sde_step``), float64.

    x_hat = (z - sqrt(1 - a_t) eps) / sqrt(a_t), std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)),
    mean = sqrt(a_prev) x_hat + sqrt(max(1 - a_prev - std^2, 0)) eps gives
        A = sqrt(a_prev / a_t),   C = sqrt(max(1 - a_prev - std^2, 0)) - sqrt(a_prev) sqrt(1 - a_t) / sqrt(a_t).
    """
    a_t, a_prev, e = _as_batch((alpha_prod_t, alpha_prod_t_prev, eta), batch_size, device)
    beta_t = 1.0 - a_t
    variance = (1.0 - a_prev) / beta_t * (1.0 - a_t / a_prev)
    std = e * torch.sqrt(torch.clamp(variance, min=0.0))
    coef_sample = torch.sqrt(a_prev) / torch.sqrt(a_t)
    coef_output = torch.sqrt(torch.clamp(1.0 - a_prev - std * std, min=0.0)) - coef_sample * torch.sqrt(beta_t)
    return coef_sample, coef_output, std


def _bcast(v: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(device=ref.device, dtype=dtype).reshape(-1, *([1] * (ref.ndim - 1)))


def reference_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coef_sample: torch.Tensor,
    coef_output: torch.Tensor,
    std: torch.Tensor,
    *,
    noise: Optional[torch.Tensor] = None,
    prev_sample: Optional[torch.Tensor] = None,
):
    """Eager, autograd-differentiable version of the fused op: returns (prev, log_prob_B, mean).

    Exactly one of ``noise`` (rollout: prev = mean + std * noise) and ``prev_sample`` (re-scoring)
    must be given. Outputs are in the compute dtype.
    """
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of noise= (rollout) and prev_sample= (re-scoring)")
    cd = compute_dtype(sample)
    z = sample.to(cd)
    u = model_output.to(cd)
    a = _bcast(coef_sample, z, cd)
    c = _bcast(coef_output, z, cd)
    s = _bcast(std, z, cd)
    mean = a * z + c * u
    prev = mean + s * noise.to(cd) if noise is not None else prev_sample.to(cd)
    return prev, gaussian_log_prob_from_residual(prev - mean, std.to(device=z.device, dtype=cd)), mean


def gaussian_log_prob_from_residual(diff: torch.Tensor, std_B: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch elements of log N(diff; 0, std_b^2), 0 where std_b == 0."""
    n = diff[0].numel() if diff.shape[0] else 1
    ss = (diff * diff).reshape(diff.shape[0], -1).sum(dim=1)
    safe = torch.where(std_B > 0, std_B, torch.ones_like(std_B))
    lp = -ss / (2.0 * safe * safe * n) - torch.log(safe) - HALF_LOG_2PI
    return torch.where(std_B > 0, lp, torch.zeros_like(lp))


def reference_sde_step_backward(model_output, sample, prev_sample, coef_sample, coef_output, weight_B,
                                need_output: bool, need_sample: bool, need_prev: bool):
    """Closed-form log-prob backward of a re-scored step (what the compiled backward computes).

    With d = prev - (A z + C u) and weight_B = grad_log_prob / (std^2 N) (0 where std == 0):
    grad_u = C w d, grad_z = A w d, grad_prev = -w d, each returned in its input's dtype (or None).
    """
    cd = compute_dtype(sample)
    z = sample.to(cd)
    a = _bcast(coef_sample, z, cd)
    c = _bcast(coef_output, z, cd)
    w = _bcast(weight_B, z, cd)
    wd = w * (prev_sample.to(cd) - (a * z + c * model_output.to(cd)))
    gu = (c * wd).to(model_output.dtype) if need_output else None
    gz = (a * wd).to(sample.dtype) if need_sample else None
    gp = (-wd).to(prev_sample.dtype) if need_prev else None
    return gu, gz, gp
