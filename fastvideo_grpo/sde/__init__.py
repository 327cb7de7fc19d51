"""The sampling math: stochastic (SDE) and deterministic (ODE) steps with Gaussian log-probs.

Pure functions and two small schedule classes; no model code. Everything follows
``docs/method.md`` sections 1-2.

Contract of every step function (after ddpo-pytorch):
    ``step(model_output, sample, <schedule values>, eta, *, prev_sample=None, generator=None)``
    -> ``(prev_sample, log_prob_B, mean, std_B)``

* ``sample`` is z_t with a leading batch dim; schedule values are scalars or shape (B,) tensors
  (per-sample sigmas, so one batch may hold samples at different steps).
* With ``prev_sample=None`` a new z_s is drawn (rollout); with ``prev_sample`` given, that stored
  transition is re-scored (training). Both paths run the same arithmetic, so re-scoring a step
  with unchanged weights reproduces the rollout log-prob bit for bit.
* ``log_prob_B`` is the Gaussian log-density of z_s under N(mean, std^2 I) averaged (not summed)
  over the non-batch elements, as the reference implementation does.
* Arithmetic runs in float32 for half-precision inputs and in float64 for float64 inputs.
* ``eta == 0`` is the deterministic ODE step (Euler for flow, DDIM for diffusion); the transition
  is then a point mass and ``log_prob`` is reported as 0 (such steps are never trained on).

The last step of a flow schedule is deterministic by default (``deterministic_last_step``): its
Euler step to sigma = 0 is exactly the clean prediction ``z - sigma * u``, the image the authors'
released code decodes and rewards. See docs/fidelity.md.

A flow schedule's step has a *form* (``FlowSchedule.form``, registered in ``FLOW_STEPS``): ``sde`` (the
Euler-Maruyama step above, DanceGRPO / Flow-GRPO) or ``cps`` (the coefficients-preserving step). Each form is
its coefficients (A, C, std) of mean = A z + C u, which the fused kernel runs, and the same step written out.
``sampling.eta_form`` picks how the configured eta becomes a schedule (``ETA_FORMS``: constant, flow_grpo, cps).
"""

from __future__ import annotations

import math
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch

from . import ops as _ops
from ..utils import rng
from ..utils.registry import Registry
from ..utils.transfer import to_device

Scalar = Union[float, torch.Tensor]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# Schedule ``step`` methods run the fused step + log-prob op (fastvideo_grpo.sde.ops; compiled kernel
# when built, PyTorch reference otherwise). FVG_DISABLE_FUSED=1 (or setting this to False) makes them
# call the plain ``flow_sde_step`` / ``ddim_sde_step`` below instead.
FUSED_STEPS = os.environ.get("FVG_DISABLE_FUSED", "0").lower() not in ("1", "true", "yes")


# ----------------------------------------------------------------------------- helpers


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def per_sample(value: Scalar, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, 1, ...) tensor broadcastable against ``ref``."""
    v = torch.as_tensor(value, dtype=dtype, device=ref.device)
    if v.ndim == 0:
        v = v.expand(ref.shape[0])
    if v.ndim != 1 or v.shape[0] != ref.shape[0]:
        raise ValueError(
            f"schedule values must be scalars or shape ({ref.shape[0]},) to match the batch; got {tuple(v.shape)}"
        )
    return v.reshape(-1, *([1] * (ref.ndim - 1)))


def gaussian_log_prob_mean(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over non-batch elements; ``std`` broadcasts as (B, 1, ...).

    Where std == 0 (deterministic step) the result is 0 by convention.
    """
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    lp = lp.mean(dim=tuple(range(1, lp.ndim)))
    return torch.where(std.reshape(-1) > 0, lp, torch.zeros_like(lp))


def _draw_or_keep(mean, std, prev_sample, generator):
    if prev_sample is None:
        noise = rng.randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise
    if prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}, expected {tuple(mean.shape)}")
    return prev_sample.to(mean.dtype)


# ----------------------------------------------------------------------------- flow


def flow_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: Scalar,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
):
    """One Euler-Maruyama step of the rectified-flow reverse SDE from ``sigma`` down to ``sigma_next``.

    model_output is the velocity u = eps - x. With x_hat = z - sigma * u and
    score = -(z - (1 - sigma) x_hat) / sigma^2 (docs/method.md section 2):
        mean = z + (u - eta^2 / 2 * score) * (sigma_next - sigma)
        std  = eta * sqrt(sigma - sigma_next)
    """
    dt_ = compute_dtype(sample)
    z = sample.to(dt_)
    u = model_output.to(dt_)
    s = per_sample(sigma, z, dt_)
    s_next = per_sample(sigma_next, z, dt_)
    e = per_sample(eta, z, dt_)
    dt = s_next - s  # negative
    x_hat = z - s * u
    score = -(z - (1.0 - s) * x_hat) / (s * s)
    mean = z + (u - 0.5 * e * e * score) * dt
    std = e * torch.sqrt(torch.clamp(-dt, min=0.0))
    prev = _draw_or_keep(mean, std, prev_sample, generator)
    log_prob = gaussian_log_prob_mean(prev, mean, std)
    return prev, log_prob, mean, std.reshape(-1)


def flow_cps_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: Scalar,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
):
    """One coefficients-preserving step (CPS; Wang et al. 2025, Flow-GRPO's ``sde_type: cps``) from ``sigma``
    down to ``sigma_next``, with noise level ``eta`` in [0, 1].

    The flow's sample at sigma is (1 - sigma) x0 + sigma x1 (data x0, noise x1). With the model's predictions
    x0_hat = z - sigma u and x1_hat = z + (1 - sigma) u, the step keeps that form at sigma_next: of the noise
    coefficient sigma_next, a share std = sigma_next sin(eta pi / 2) is fresh Gaussian noise and the rest
    comes from the predicted noise, so the total noise variance is exactly sigma_next^2:
        mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat,   std = sigma_next sin(eta pi / 2)
    eta = 0 is the Euler step; eta = 1 replaces all the noise by fresh noise. The log-prob is the exact
    Gaussian log-density of z_next under N(mean, std^2 I), averaged over elements like ``flow_sde_step``'s
    (the released code scores -(z_next - mean)^2 only, without the 1 / (2 std^2) scale and the constants).
    """
    dt_ = compute_dtype(sample)
    z = sample.to(dt_)
    u = model_output.to(dt_)
    s = per_sample(sigma, z, dt_)
    s_next = per_sample(sigma_next, z, dt_)
    e = per_sample(eta, z, dt_)
    x0_hat = z - s * u
    x1_hat = z + (1.0 - s) * u
    std = s_next * torch.sin(e * (0.5 * math.pi))
    mean = (1.0 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next * s_next - std * std, min=0.0)) * x1_hat
    prev = _draw_or_keep(mean, std, prev_sample, generator)
    log_prob = gaussian_log_prob_mean(prev, mean, std)
    return prev, log_prob, mean, std.reshape(-1)


def flow_ode_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: Scalar, sigma_next: Scalar) -> torch.Tensor:
    """Deterministic Euler step z_s = z_t + u (s - t) (eta = 0), in the input's dtype."""
    dt_ = compute_dtype(sample)
    z = sample.to(dt_)
    s = per_sample(sigma, z, dt_)
    s_next = per_sample(sigma_next, z, dt_)
    return (z + model_output.to(dt_) * (s_next - s)).to(sample.dtype)


def flow_grpo_eta(sigmas: torch.Tensor, noise_level: Union[float, torch.Tensor]) -> torch.Tensor:
    """Flow-GRPO's noise level as a per-step eta of ``flow_sde_step`` (Liu et al. 2025, its SDE sampler).

    Flow-GRPO samples x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(-dt) eps with
    sigma_t = a sqrt(t / (1 - t)). ``flow_sde_step``'s score term is -eta^2/2 * score with
    score = -(x_t + (1 - t) v) / t, and its std is eta sqrt(-dt): the same step with eta_t = sigma_t. At
    t = 1 (where t / (1 - t) is infinite) the released code uses the second sigma of the grid in the
    denominator, as here. ``noise_level`` is a (scalar or per-step) a; returns eta of shape (T,).
    """
    s = sigmas[:-1].to(torch.float64)
    if sigmas.numel() < 3:
        raise ValueError("Flow-GRPO's noise level needs at least 2 sampling steps")
    denom = 1.0 - torch.where(s >= 1.0, sigmas[1].to(torch.float64), s)
    return torch.as_tensor(noise_level, dtype=torch.float64) * torch.sqrt(s / denom)


def flow_dpmpp_2m_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: float, sigma_next: float,
                       x0_prev: Optional[torch.Tensor] = None, sigma_prev: Optional[float] = None):
    """One deterministic DPM-Solver++(2M) step of a rectified flow from ``sigma`` down to ``sigma_next``.

    The flow's forward process is z = alpha x0 + sigma eps with alpha = 1 - sigma, so the data prediction
    is x0 = z - sigma u and the half log-SNR is lambda = log(alpha / sigma). With h = lambda_next - lambda
    (DPM-Solver++, Lu et al. 2022, its multistep second-order update):
        z_next = (sigma_next / sigma) z + alpha_next (1 - e^{-h}) D
        D = x0                                   (first order: no previous x0, or sigma_next = 0)
        D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev,   r = (lambda - lambda_prev) / h   (second order)
    The first-order update is exactly the Euler step z + u (sigma_next - sigma). ``x0_prev`` is the data
    prediction of the previous step, made at ``sigma_prev`` (one made at sigma_prev = 1, where alpha = 0 and
    lambda = -inf, carries no slope and is not used). Sigmas are Python scalars (one step index for
    the whole batch). Returns ``(z_next, x0)`` in the compute dtype (float32, or float64 for float64 input).
    """
    dt_ = compute_dtype(sample)
    z = sample.to(dt_)
    x0 = z - float(sigma) * model_output.to(dt_)
    s, s_next = float(sigma), float(sigma_next)
    if not 0.0 <= s_next < s <= 1.0:
        raise ValueError(f"DPM-Solver++ steps need 0 <= sigma_next < sigma <= 1, got {s} -> {s_next}")
    if s_next == 0.0:  # lambda = +inf: the step lands on the data prediction (diffusers: lower_order_final)
        return x0, x0
    if s == 1.0:  # alpha = 0 at pure noise: lambda = -inf, e^{-h} = 0; first order only
        return (1.0 - s_next) * x0 + s_next * (z - (1.0 - s) * x0) / s, x0

    def lam(v):
        return math.log((1.0 - v) / v)

    h = lam(s_next) - lam(s)
    coef = (1.0 - s_next) * (1.0 - math.exp(-h))
    d = x0
    if x0_prev is not None and sigma_prev is not None and float(sigma_prev) < 1.0:
        r = (lam(s) - lam(float(sigma_prev))) / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev.to(dt_)
    return (s_next / s) * z + coef * d, x0


def time_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / FLUX static time shift: s' = shift * s / (1 + (shift - 1) * s)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def unshift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of ``time_shift``: t = s / (shift - (shift - 1) s)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return sigmas / (shift - (shift - 1.0) * sigmas)


def compressed_tail(sigmas: torch.Tensor, last: int, ratio: float, shift: float = 1.0) -> torch.Tensor:
    """The grid with the steps after step ``last`` replaced by fewer ones (MixGRPO-Flash, ``dpm_apply: post``).

    The released rule (MixGRPO ``fastvideo/utils/sampling_utils.py`` 44-54): the grid is kept up to
    ``sigmas[last + 1]``; from there ``n = int(max((T - last) * ratio, 1))`` points linear in the unshifted time t
    run down to 0 and are shifted: ``shift(linspace(t_{last + 1}, 0, n))``, n - 1 steps instead of T - last - 1.
    Where the released n is 1 the grid would stop at ``sigmas[last + 1]`` > 0; here n is at least 2 (one step to
    0). ``ratio`` 1 gives the grid's own steps back (for a grid linear in t before the shift). float64."""
    T = sigmas.numel() - 1
    if not 0 <= last < T:
        raise ValueError(f"the last stochastic step {last} is not a step of a {T}-step grid")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"the compression ratio must be in (0, 1], got {ratio}")
    s = sigmas.to(torch.float64)
    n = max(int(max((T - last) * ratio, 1)), 2)
    t_start = float(unshift(s[last + 1], shift))
    tail = time_shift(torch.linspace(t_start, 0.0, n, dtype=torch.float64), shift)
    return torch.cat([s[:last + 1], s[last + 1:last + 2], tail[1:]])


def flow_sigmas(num_steps: int, shift: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 down to 0, linearly spaced then time-shifted (DanceGRPO practice)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype), shift)


@dataclass(frozen=True)
class FlowStepForm:
    """A flow step's form: ``coefficients(sigma, sigma_next, eta, *, batch_size, device) -> (A, C, std)`` (float64,
    mean = A z + C u: what the fused kernel and the schedule's table run) and ``step`` (the same step written
    out, with ``flow_sde_step``'s signature and contract: the plain path, and the reference of the fused one)."""

    coefficients: Callable
    step: Callable

    def table(self, sigmas: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """The (T, 3) float64 (A, C, std) table of a schedule (``ops.flow_coefficient_table``)."""
        return _ops.flow_coefficient_table(sigmas, eta, self.coefficients)


#: the step forms of a flow schedule (``FlowSchedule.form``); a new one is one ``FLOW_STEPS.register`` of a
#: ``FlowStepForm`` (its coefficients must be affine in z and u: mean = A z + C u, std independent of both)
FLOW_STEPS: Registry[FlowStepForm] = Registry("flow step form (FlowSchedule.form)")
FLOW_STEPS.register("sde")(FlowStepForm(_ops.flow_coefficients, flow_sde_step))
FLOW_STEPS.register("cps")(FlowStepForm(_ops.cps_coefficients, flow_cps_step))


# ----------------------------------------------------------------------------- diffusion (DDIM)


def ddim_sde_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: Scalar,
    alpha_prod_t_prev: Scalar,
    eta: Scalar,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
):
    """One DDIM step with stochasticity ``eta`` for an eps-prediction model (DDIM paper eq. 12/16).

    alpha_prod values are diffusers' ``alphas_cumprod`` at the current and previous timestep
    (``final_alpha_cumprod`` past the end). eta is DDIM's eta (fraction of the DDPM posterior std; 1 = DDPM),
    as in DDPO and DanceGRPO's released Stable Diffusion code, whose config samples with eta = 1.0
    (fastvideo/config_sd/base.py, ``sample.eta``), as configs/sd_hps*.yaml do:
        x_hat = (z - sqrt(1 - a_t) eps) / sqrt(a_t)
        std   = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        mean  = sqrt(a_prev) x_hat + sqrt(1 - a_prev - std^2) eps
    """
    dt_ = compute_dtype(sample)
    z = sample.to(dt_)
    eps = model_output.to(dt_)
    a_t = per_sample(alpha_prod_t, z, dt_)
    a_prev = per_sample(alpha_prod_t_prev, z, dt_)
    e = per_sample(eta, z, dt_)
    beta_t = 1.0 - a_t
    x_hat = (z - torch.sqrt(beta_t) * eps) / torch.sqrt(a_t)
    variance = (1.0 - a_prev) / beta_t * (1.0 - a_t / a_prev)
    std = e * torch.sqrt(torch.clamp(variance, min=0.0))
    direction = torch.sqrt(torch.clamp(1.0 - a_prev - std * std, min=0.0)) * eps
    mean = torch.sqrt(a_prev) * x_hat + direction
    prev = _draw_or_keep(mean, std, prev_sample, generator)
    log_prob = gaussian_log_prob_mean(prev, mean, std)
    return prev, log_prob, mean, std.reshape(-1)


def scaled_linear_alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """Stable Diffusion's ``scaled_linear`` beta schedule as diffusers builds it (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ----------------------------------------------------------------------------- schedules


def eta_per_step(eta: Union[float, Sequence[float], torch.Tensor], num_steps: int) -> torch.Tensor:
    """Expand a scalar eta or validate a per-step eta schedule to shape (num_steps,)."""
    e = torch.as_tensor(eta, dtype=torch.float64)
    if e.ndim == 0:
        e = e.expand(num_steps).clone()
    if e.shape != (num_steps,):
        raise ValueError(f"eta schedule has {e.numel()} entries, expected 1 or num_steps={num_steps}")
    if (e < 0).any():
        raise ValueError("eta must be >= 0")
    return e


class _DeviceTables:
    """Copies of a schedule's small tables on each device they are used on, made once.

    A copy from pageable host memory to a GPU waits for the GPU's queued work, so copying a sigma
    or an eta to the device at every step would stall the host once per step (several times per
    step). The copies are keyed by the table's identity and version: reassigning or editing a table
    makes a new copy."""

    def __init__(self):
        self._copies = {}

    def get(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        if table.device == device:
            return table
        key = (id(table), table._version, device)
        hit = self._copies.get(key)
        if hit is None or hit[0] is not table:
            hit = (table, table.to(device))
            self._copies[key] = hit
        return hit[1]


def _gather(table: torch.Tensor, index, like: torch.Tensor, tables: Optional[_DeviceTables] = None):
    """table[index] for an int or a (B,) index tensor, on ``like``'s device."""
    if tables is None:
        tables = _DeviceTables()
    on_device = tables.get(table, like.device)
    if isinstance(index, int):
        return on_device[index]
    return on_device[to_device(index, like.device)]  # a host index: copied without a host sync


def _fused_ok(model_output, sample) -> bool:
    """The fused op handles same-shape float tensors with a batch dim; anything else takes the plain path."""
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return (FUSED_STEPS and isinstance(model_output, torch.Tensor) and sample.ndim >= 1
            and model_output.shape == sample.shape and model_output.dtype in floats and sample.dtype in floats)


def _fused_step(model_output, sample, coefs, prev_sample, generator, need_mean):
    a, c, std = coefs
    prev, lp, *mean = _ops.fused_sde_step(model_output, sample, a, c, std, prev_sample=prev_sample,
                                          generator=generator, return_mean=need_mean)
    return prev, lp, (mean[0] if need_mean else None), std.to(compute_dtype(sample))


@dataclass
class FlowSchedule:
    """Rectified-flow schedule: sigmas (T+1,), model timesteps = sigma * timestep_scale."""

    sigmas: torch.Tensor
    eta: torch.Tensor  # (T,)
    timestep_scale: float = 1000.0
    prediction_type: str = "flow"
    #: the static shift the grid was made with (sigma = shift(t) of a grid linear in t); ``compressed_tail`` keeps it
    shift: float = 1.0
    form: str = "sde"  # the step's form, registered in FLOW_STEPS: "sde" (Euler-Maruyama) or "cps"
    #: default of ``sampling.deterministic_last_step``: the released DanceGRPO flow scripts (FLUX, Hunyuan,
    #: SkyReels, Wan) decode ``pred_original = z - sigma * u`` at the last step, which is this schedule's
    #: last step with eta = 0 (sigma_T = 0)
    deterministic_last_step_default: ClassVar[bool] = True
    _tables: _DeviceTables = field(default_factory=_DeviceTables, init=False, repr=False, compare=False)
    _coefs: _ops.CoefficientTable = field(default_factory=_ops.CoefficientTable, init=False, repr=False,
                                          compare=False)

    @classmethod
    def create(cls, num_steps: int, eta=0.0, shift: float = 1.0, timestep_scale: float = 1000.0):
        return cls(flow_sigmas(num_steps, shift), eta_per_step(eta, num_steps), timestep_scale, shift=float(shift))

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def model_timestep(self, index, like: torch.Tensor) -> torch.Tensor:
        t = _gather(self.sigmas, index, like, self._tables) * self.timestep_scale
        return t.to(torch.float32).expand(like.shape[0]) if t.ndim == 0 else t.to(torch.float32)

    def step(self, index, model_output, sample, *, prev_sample=None, generator=None, eta=None, need_mean=True):
        """SDE step at step ``index`` (int or per-sample (B,) tensor); eta defaults to the schedule's.

        Returns ``(prev_sample, log_prob_B, mean, std_B)`` like ``flow_sde_step`` (mean is None when
        ``need_mean=False`` on the fused path, which saves one write of the latent).
        """
        form = FLOW_STEPS.get(self.form)
        if eta is None and FUSED_STEPS:  # the compiled kernel with coefficients made once per schedule
            out = self._coefs.step(form.table, (self.sigmas, self.eta), index, model_output, sample,
                                   prev_sample, generator, need_mean)
            if out is not None:
                return out
        e = _gather(self.eta, index, sample, self._tables) if eta is None else eta
        s = _gather(self.sigmas, index, sample, self._tables)
        s_next = _gather(self.sigmas, index + 1, sample, self._tables)
        if not _fused_ok(model_output, sample):
            return form.step(model_output, sample, s, s_next, e, prev_sample=prev_sample, generator=generator)
        coefs = form.coefficients(s, s_next, e, batch_size=sample.shape[0], device=sample.device)
        return _fused_step(model_output, sample, coefs, prev_sample, generator, need_mean)

    def coefficient_table(self) -> torch.Tensor:
        """The (T, 3) float64 CPU table of each step's (A, C, std): mean = A z + C u, the std of the step
        (the values the fused step runs with; cached)."""
        return self._coefs.get(FLOW_STEPS.get(self.form).table, (self.sigmas, self.eta))


@dataclass
class DDIMSchedule:
    """Diffusion schedule over ``num_steps`` DDIM steps, leading spacing with steps_offset (SD v1.x)."""

    alphas_cumprod: torch.Tensor  # (num_train,)
    timesteps: torch.Tensor  # (T,) int64, descending
    alpha_t: torch.Tensor  # (T,)
    alpha_prev: torch.Tensor  # (T,)
    eta: torch.Tensor  # (T,)
    prediction_type: str = "eps"
    #: default of ``sampling.deterministic_last_step``: the released Stable Diffusion code samples its last
    #: DDIM step with eta too (and decodes that sample); it only leaves the step out of training
    deterministic_last_step_default: ClassVar[bool] = False
    _tables: _DeviceTables = field(default_factory=_DeviceTables, init=False, repr=False, compare=False)
    _coefs: _ops.CoefficientTable = field(default_factory=_ops.CoefficientTable, init=False, repr=False,
                                          compare=False)

    @classmethod
    def create(cls, num_steps: int, eta=0.0, alphas_cumprod: Optional[torch.Tensor] = None,
               steps_offset: int = 1, set_alpha_to_one: bool = False):
        ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.to(torch.float64)
        n_train = ac.numel()
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
        ratio = n_train // num_steps
        ts = (torch.arange(num_steps, dtype=torch.int64) * ratio).flip(0) + steps_offset
        final = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ac[0]
        prev_ts = ts - ratio
        a_prev = torch.where(prev_ts >= 0, ac[prev_ts.clamp(min=0)], final)
        return cls(ac, ts, ac[ts], a_prev, eta_per_step(eta, num_steps))

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def model_timestep(self, index, like: torch.Tensor) -> torch.Tensor:
        t = _gather(self.timesteps, index, like, self._tables)
        return t.expand(like.shape[0]) if t.ndim == 0 else t

    def step(self, index, model_output, sample, *, prev_sample=None, generator=None, eta=None, need_mean=True):
        """DDIM SDE step at step ``index``; same contract as ``FlowSchedule.step``."""
        if eta is None and FUSED_STEPS:
            out = self._coefs.step(_ops.ddim_coefficient_table, (self.alpha_t, self.alpha_prev, self.eta), index,
                                   model_output, sample, prev_sample, generator, need_mean)
            if out is not None:
                return out
        e = _gather(self.eta, index, sample, self._tables) if eta is None else eta
        a_t = _gather(self.alpha_t, index, sample, self._tables)
        a_prev = _gather(self.alpha_prev, index, sample, self._tables)
        if not _fused_ok(model_output, sample):
            return ddim_sde_step(model_output, sample, a_t, a_prev, e, prev_sample=prev_sample, generator=generator)
        coefs = _ops.ddim_coefficients(a_t, a_prev, e, batch_size=sample.shape[0], device=sample.device)
        return _fused_step(model_output, sample, coefs, prev_sample, generator, need_mean)

    def coefficient_table(self) -> torch.Tensor:
        """The (T, 3) float64 CPU table of each step's (A, C, std) (as ``FlowSchedule.coefficient_table``)."""
        return self._coefs.get(_ops.ddim_coefficient_table, (self.alpha_t, self.alpha_prev, self.eta))


def with_deterministic_last_step(schedule):
    """A copy of ``schedule`` whose last step has eta = 0 (the other steps keep theirs).

    For a flow schedule the last step goes from sigma_{T-1} to sigma_T = 0, so its eta = 0 (Euler) step
    ``z + u (0 - sigma)`` is exactly the clean prediction ``x_hat = z - sigma u``: the latent the released
    DanceGRPO code decodes and rewards (``latents = pred_original`` in train_grpo_flux.py and the Hunyuan,
    SkyReels and Wan scripts). The stochastic step would instead add ``eta * sqrt(sigma_{T-1})`` of noise,
    the largest std of the trajectory, to every rewarded image. For a DDIM schedule it is the
    deterministic DDIM step. A step with eta = 0 has no log-prob and is never trained on.
    """
    eta = schedule.eta.clone()
    eta[-1] = 0.0
    return dataclasses.replace(schedule, eta=eta)


# ----------------------------------------------------------------------------- eta forms (sampling.eta_form)


#: how ``sampling.eta`` (or ``eta_schedule``) becomes the schedule a run samples with: an entry maps the adapter's
#: schedule (eta as configured) to that schedule. ``flow_only=True`` (registration info): flow models only (the
#: trainer refuses it for another schedule, naming the model). A new form is one registered function here and
#: its name in ``config.ETA_FORMS`` (the config key's domain).
ETA_FORMS: Registry[Callable] = Registry("eta form (sampling.eta_form)")


@ETA_FORMS.register("constant")
def constant_eta(schedule):
    """eta as configured: the SDE's noise level at each step (DanceGRPO)."""
    return schedule


@ETA_FORMS.register("flow_grpo", flow_only=True)
def flow_grpo_eta_form(schedule):
    """eta is Flow-GRPO's a: each step's eta becomes a sqrt(sigma / (1 - sigma)) (``flow_grpo_eta``)."""
    return dataclasses.replace(schedule, eta=flow_grpo_eta(schedule.sigmas, schedule.eta))


@ETA_FORMS.register("cps", flow_only=True)
def cps_eta_form(schedule):
    """eta is CPS's noise level in [0, 1] and every step is the coefficients-preserving step (``flow_cps_step``)."""
    bad = [float(e) for e in schedule.eta if not 0.0 <= float(e) <= 1.0]
    if bad:
        raise ValueError(f"sampling.eta_form: cps takes a noise level in [0, 1] (std = sigma_next sin(eta pi / 2)); "
                         f"sampling.eta / sampling.eta_schedule hold {bad}")
    return dataclasses.replace(schedule, form="cps")
