"""Rollouts: G samples per prompt from one shared initial noise, batched over groups and prompts.

``rollout`` runs the SDE sampler without gradients and keeps exactly the transitions the training
step will re-score (the per-sample subsets chosen by ``grpo.subsample_timesteps`` before
sampling), so a trajectory costs 2 * K latents per sample instead of T + 1.

``sample_ode`` is the deterministic sampler used for evaluation.

Memory (docs/performance.md, "Memory at real sizes"): the batch is cut into chunks of
``rollout_batch_size`` samples for the denoiser forwards only; everything else of a step -- the SDE
step, its noise draw, the kept transitions -- runs on the whole batch, so the noise each sample gets
is the same whatever the chunk size. The samples are then those of the whole-batch run up to the
kernels' own batch-shape-dependent rounding (CPU: MKL GEMMs below 4 rows, oneDNN convolutions; last
bits only, measured in docs/performance.md); the PPO ratio is exactly 1 when the training micro-batch
equals the rollout chunk (same shapes). ``decode_latents`` decodes in chunks of ``decode_batch_size``
and can keep the VAE in host memory between decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..utils import residency
from .. import sde
from ..config import ODE_SOLVERS
from ..utils.dtypes import autocast_context
from ..utils.transfer import to_device
from ..models.base import Cond, PolicyAdapter, index_cond, slice_cond


@dataclass
class Trajectory:
    """A batch of B = num_prompts * group_size sampled trajectories (groups contiguous)."""

    prompts: List[str]  # (B,)
    cond: Cond  # per-sample rows
    steps_BK: torch.Tensor  # int64 CPU: which sampling steps are kept for training
    latents_BK: torch.Tensor  # z_t at the kept steps: (B, K, *latent)
    next_latents_BK: torch.Tensor  # z_s (the action) at the kept steps: (B, K, *latent)
    log_probs_BK: torch.Tensor  # old log-probs of the kept transitions: (B, K)
    final_latents: torch.Tensor  # z_0: (B, *latent)
    decoded: Optional[torch.Tensor] = None  # pixels in [0, 1]
    group_size: int = 1
    # bool CPU (B, K): which kept slots are trained (None = all). A sampler whose samples share transitions
    # (a tree's common prefix) trains each once: the other slots holding it are False
    trained_BK: Optional[torch.Tensor] = None
    # the step means of the kept transitions under the rollout policy, (B, K, *latent), float32 (float64 for
    # float64 latents); kept only when asked (``rollout(keep_means=True)``: an objective's ``needs_step_means``)
    means_BK: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.final_latents.shape[0]

    def select(self, index: torch.Tensor) -> "Trajectory":
        """Rows ``index`` of every per-sample field (best-of-N training on a subset)."""
        idx = index.to(torch.int64)
        dev = self.latents_BK.device
        return Trajectory(
            prompts=[self.prompts[i] for i in idx.tolist()],
            cond=index_cond(self.cond, idx),
            steps_BK=self.steps_BK.index_select(0, idx.cpu()),
            latents_BK=self.latents_BK.index_select(0, idx.to(dev)),
            next_latents_BK=self.next_latents_BK.index_select(0, idx.to(dev)),
            log_probs_BK=self.log_probs_BK.index_select(0, idx.to(self.log_probs_BK.device)),
            final_latents=self.final_latents.index_select(0, idx.to(dev)),
            decoded=None if self.decoded is None else self.decoded.index_select(0, idx.to(self.decoded.device)),
            group_size=self.group_size,
            trained_BK=None if self.trained_BK is None else self.trained_BK.index_select(0, idx.cpu()),
            means_BK=None if self.means_BK is None else self.means_BK.index_select(0, idx.to(dev)),
        )


def group_initial_noise(adapter: PolicyAdapter, num_prompts: int, group_size: int, generator: torch.Generator,
                        shared: bool = True, device=None, cond: Optional[Cond] = None) -> torch.Tensor:
    """Initial latents for num_prompts groups: one draw per group repeated G times (``shared``),
    or an independent draw per sample (ablation; the paper saw reward hacking with it)."""
    if shared:
        z = adapter.initial_noise(num_prompts, generator, device=device, cond=cond)
        return z.repeat_interleave(group_size, dim=0)
    return adapter.initial_noise(num_prompts * group_size, generator, device=device, cond=cond)


@torch.no_grad()
def rollout(
    adapter: PolicyAdapter,
    schedule,
    prompts: List[str],
    cond_P: Cond,
    group_size: int,
    keep_steps_BK: torch.Tensor,
    generator: torch.Generator,
    *,
    shared_noise: bool = True,
    decode: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    rollout_batch_size: int = 0,
    decode_batch_size: int = 0,
    offload_vae: bool = False,
    ode_solver: str = "euler",
    keep_means: bool = False,
) -> Trajectory:
    """Sample group_size trajectories for each of the P prompts with the SDE sampler.

    keep_steps_BK (int64, CPU) names, per sample, the steps whose transitions are stored.
    ``rollout_batch_size``: samples per denoiser forward (0 = all B); ``decode_batch_size`` /
    ``offload_vae``: see ``decode_latents``. None of them changes the noise; the samples only by the
    kernels' batch-shape rounding (module docstring). ``ode_solver="dpmpp_2m"`` (flow schedules): the steps
    whose eta is 0 take a DPM-Solver++(2M) step (``sde.flow_dpmpp_2m_step``, using the previous step's data
    prediction) instead of Euler; such steps are deterministic and never kept for training. ``"dpmpp_2m_post"``
    (MixGRPO-Flash's ``post``): only the eta-0 steps after the last stochastic step take it, those before are Euler
    steps (the history of data predictions runs through every step, as the released sampler's). ``keep_means``: also
    store each kept transition's step mean (``Trajectory.means_BK``, in the step's compute dtype; one more
    latent per kept step) for objectives that compare the trained policy's mean with the rollout's.
    """
    check_ode_solver(ode_solver, schedule)
    multistep = ode_solver in ("dpmpp_2m", "dpmpp_2m_post")
    etas = schedule.eta.tolist()
    stochastic = [i for i, e in enumerate(etas) if e > 0]
    first_dpm = stochastic[-1] + 1 if ode_solver == "dpmpp_2m_post" and stochastic else 0
    num_prompts = len(prompts)
    B = num_prompts * group_size
    if keep_steps_BK.shape[0] != B:
        raise ValueError(f"keep_steps_BK has {keep_steps_BK.shape[0]} rows, expected {B}")
    device = adapter.device
    rows = torch.arange(num_prompts).repeat_interleave(group_size)
    cond = index_cond(cond_P, rows)
    z = group_initial_noise(adapter, num_prompts, group_size, generator, shared_noise, device=device, cond=cond_P)
    K = keep_steps_BK.shape[1]
    kept = torch.empty((B, K) + tuple(z.shape[1:]), dtype=z.dtype, device=device)
    kept_next = torch.empty_like(kept)
    kept_lp = torch.empty((B, K), dtype=torch.float32, device=device)
    kept_mean = torch.empty(kept.shape, dtype=sde.compute_dtype(z), device=device) if keep_means else None
    keep_cpu = keep_steps_BK.cpu()
    kept_rows = _kept_rows_per_step(keep_cpu, schedule.num_steps, device)
    x0_prev = None  # data prediction of the previous step (DPM-Solver++ history)
    for i in range(schedule.num_steps):
        t = schedule.model_timestep(i, z)
        out = predict_in_chunks(adapter, z, t, cond, rollout_batch_size, autocast_dtype)
        if multistep and etas[i] == 0.0 and i >= first_dpm:
            sig = schedule.sigmas
            z_next, x0_prev = sde.flow_dpmpp_2m_step(out, z, float(sig[i]), float(sig[i + 1]), x0_prev,
                                                     float(sig[i - 1]) if i else None)
            lp = torch.zeros(B, dtype=torch.float32, device=device)  # a point mass, as an eta = 0 SDE step
            mean = z_next  # the point mass's mean
        else:
            # the step (and its noise draw) on the whole batch: each sample's noise is independent of the chunking
            z_next, lp, mean, _ = schedule.step(i, out, z, generator=generator, need_mean=keep_means)
            if multistep:
                cd = sde.compute_dtype(z)
                x0_prev = z.to(cd) - float(schedule.sigmas[i]) * out.to(cd)
        z_next = z_next.to(z.dtype)
        b_dev, k_dev = kept_rows[i]
        if b_dev.numel():
            kept[b_dev, k_dev] = z[b_dev]
            kept_next[b_dev, k_dev] = z_next[b_dev]
            kept_lp[b_dev, k_dev] = lp[b_dev].to(torch.float32)
            if keep_means:
                kept_mean[b_dev, k_dev] = mean[b_dev].to(kept_mean.dtype)
        z = z_next
    decoded = decode_latents(adapter, z, decode_batch_size, offload_vae) if decode else None
    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)],
        cond=cond,
        steps_BK=keep_cpu,
        latents_BK=kept,
        next_latents_BK=kept_next,
        log_probs_BK=kept_lp,
        final_latents=z,
        decoded=decoded,
        group_size=group_size,
        means_BK=kept_mean,
    )


def check_ode_solver(name: str, schedule) -> None:
    """ValueError unless ``name`` (``sampling.ode_solver``, or the trainer's ``dpmpp_2m_post``) is a known solver
    that can take ``schedule``'s deterministic steps (DPM-Solver++(2M) needs a flow-matching schedule)."""
    if name not in ODE_SOLVERS + ("dpmpp_2m_post",):
        raise ValueError(f"sampling.ode_solver must be one of {ODE_SOLVERS}, got {name!r}")
    kind = getattr(schedule, "prediction_type", None)
    if name != "euler" and kind != "flow":
        raise ValueError(f"sampling.ode_solver: dpmpp_2m needs a flow-matching model; this one samples with a {kind} "
                         "schedule (use 'euler')")


def _kept_rows_per_step(keep_BK: torch.Tensor, num_steps: int, device):
    """For each step i, the (sample, slot) indices where ``keep_BK == i``, on ``device``.

    Found on the CPU and copied in one asynchronous transfer (a copy from pageable memory waits for the
    GPU, so one per step would stall the host at every step of the rollout)."""
    parts = [torch.stack(torch.nonzero(keep_BK == i, as_tuple=True)) for i in range(num_steps)]
    counts = [p.shape[1] for p in parts]
    flat = to_device(torch.cat(parts, dim=1), device)
    return [(p[0], p[1]) for p in torch.split(flat, counts, dim=1)]


@torch.no_grad()
def sample_ode(adapter: PolicyAdapter, schedule, cond: Cond, initial_latents: torch.Tensor,
               autocast_dtype: Optional[torch.dtype] = None, rollout_batch_size: int = 0,
               on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Deterministic (eta = 0) sampling from given initial latents; returns final latents.

    ``rollout_batch_size``: samples per denoiser forward (0 = all); the result depends on it only through
    the kernels' batch-shape rounding. ``on_step(num_samples)`` after each step (a progress bar)."""
    z = initial_latents
    for i in range(schedule.num_steps):
        t = schedule.model_timestep(i, z)
        out = predict_in_chunks(adapter, z, t, cond, rollout_batch_size, autocast_dtype)
        z = schedule.step(i, out, z, eta=0.0, need_mean=False)[0].to(z.dtype)
        if on_step is not None:
            on_step(z.shape[0])
    return z


def sampling_memory(sampling_cfg) -> dict:
    """The keyword arguments of ``rollout`` / ``evaluate_policy`` set by a ``config.SamplingConfig``:
    samples per denoiser forward and per VAE decode, and where the VAE lives between decodes."""
    return dict(rollout_batch_size=sampling_cfg.rollout_batch_size, decode_batch_size=sampling_cfg.decode_batch_size,
                offload_vae=sampling_cfg.offload_vae)


def predict_in_chunks(adapter: PolicyAdapter, z: torch.Tensor, t: torch.Tensor, cond: Cond, batch_size: int = 0,
                      autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``adapter.predict(z, t, cond)`` run ``batch_size`` samples at a time (0 = all at once) and
    concatenated. Chunks are views of the batch (no copies, no host-device sync); only one chunk's
    activations are alive at a time, which is what bounds the rollout's memory."""
    B = z.shape[0]
    if not batch_size or batch_size >= B:
        with autocast_context(z.device, autocast_dtype):
            return adapter.predict(z, t, cond)
    outs = []
    for s in range(0, B, batch_size):
        e = min(B, s + batch_size)
        with autocast_context(z.device, autocast_dtype):
            outs.append(adapter.predict(z[s:e], t[s:e], slice_cond(cond, s, e)))
    return torch.cat(outs)


@torch.no_grad()
def decode_latents(adapter: PolicyAdapter, z: torch.Tensor, batch_size: int = 0, offload: bool = False) -> torch.Tensor:
    """``adapter.decode`` over ``batch_size`` samples at a time (0 = all at once), concatenated.

    Decoding is per sample, so chunking changes the pixels only by the kernels' batch-shape rounding
    (VAE tiling changes them more: an adapter setting, ``vae_tiling``). ``offload``: the adapter's ``decoder_modules()`` (the VAE) live
    in host memory between decodes -- copied to the device for this call and dropped after it (the
    first call moves them to the host). Decoders that are already in host memory are copied to the
    device for the call either way."""
    modules = adapter.decoder_modules()
    B = z.shape[0]
    step = batch_size if batch_size and batch_size < B else B
    with residency.on_device(modules, z.device):
        out = torch.cat([adapter.decode(z[s:s + step]) for s in range(0, B, step)]) if step < B else adapter.decode(z)
    if offload:
        residency.to_host(modules, pin=z.device.type == "cuda")
    return out

