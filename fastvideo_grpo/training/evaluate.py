"""Held-out evaluation with the deterministic ODE sampler (eta = 0) and any set of rewards.

``evaluate_policy`` evaluates prompts in one process; ``distributed_evaluate`` splits fixed batches over
data-parallel ranks (what the training loop and the evaluation CLI call). Fixed seeds make "before" and
"after" comparable sample by sample (same initial noise per prompt and sample index).
``python -m fastvideo_grpo.cli.evaluate`` is the command line (cli/evaluate.py).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..models.base import Cond, PolicyAdapter
from ..rewards.base import RewardFn, compute_rewards
from ..algorithms.rollout import decode_latents, sample_ode


@torch.no_grad()
def evaluate_policy(
    adapter: PolicyAdapter,
    prompts: Sequence[str],
    reward_fns: Dict[str, RewardFn],
    num_steps: int,
    *,
    encode: Optional[Callable[[List[str]], Cond]] = None,
    samples_per_prompt: int = 1,
    seed: int = 1234,
    batch_size: int = 64,
    return_images: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    rollout_batch_size: int = 0,
    decode_batch_size: int = 0,
    offload_vae: bool = False,
    on_step: Optional[Callable[[int], None]] = None,
) -> Dict:
    """Mean reward per reward name (and per-sample scores) over prompts x samples_per_prompt.

    ``autocast_dtype``: the denoiser's autocast dtype on CUDA, as in training (``train.autocast``).
    ``batch_size`` samples are encoded, sampled, decoded and scored together; within that batch the
    denoiser runs ``rollout_batch_size`` samples per forward and the VAE ``decode_batch_size`` per call
    (``rollout.sampling_memory(cfg.sampling)`` gives them from a config): the scores depend on them only
    through the kernels' batch-shape rounding."""
    encode = encode or adapter.encode_prompts
    module = adapter.trainable_module()
    was_training = module.training
    module.eval()
    schedule = adapter.make_schedule(num_steps, 0.0)
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    g = torch.Generator().manual_seed(seed)
    noise = adapter.initial_noise(len(all_prompts), g, device=adapter.device)
    scores: Dict[str, List[torch.Tensor]] = {}
    extras: Dict[str, List[torch.Tensor]] = {}
    images = []
    for s in range(0, len(all_prompts), batch_size):
        batch = all_prompts[s:s + batch_size]
        cond = encode(batch)
        z = sample_ode(adapter, schedule, cond, noise[s:s + batch_size], autocast_dtype=autocast_dtype,
                       rollout_batch_size=rollout_batch_size, on_step=on_step)
        img = decode_latents(adapter, z, decode_batch_size, offload_vae)
        r, info = compute_rewards(reward_fns, img, batch)
        for k, v in r.items():
            scores.setdefault(k, []).append(v)
        for k, inf in info.items():
            for ik, iv in (inf or {}).items():
                if isinstance(iv, torch.Tensor) and iv.ndim == 1 and iv.numel() == len(batch):
                    extras.setdefault(f"{k}/{ik}", []).append(iv.float())
        if return_images:
            images.append(img.cpu())
    module.train(was_training)
    per_sample = {k: torch.cat(v) for k, v in scores.items()}
    out = {
        "num_samples": len(all_prompts),
        "mean": {k: float(v.mean()) for k, v in per_sample.items()},
        "extras_mean": {k: float(torch.cat(v).mean()) for k, v in extras.items()},
        "per_sample": {k: v.tolist() for k, v in per_sample.items()},
        "prompts": all_prompts,
    }
    if return_images:
        out["images"] = torch.cat(images)
    return out


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_evaluate(adapter, prompts: Sequence[str], reward_fns: Dict, num_steps: int, encode: Callable, *,
                         samples_per_prompt: int, batch_size: int, seed: int, dp_rank: int, dp_size: int,
                         return_images: bool = False, max_frames: Optional[int] = 8,
                         autocast_dtype: Optional[torch.dtype] = None, progress: bool = False, **memory) -> Dict:
    """ODE evaluation split over data-parallel ranks (collective on every rank, FSDP-safe).

    Prompts are cut into fixed batches of ``batch_size // samples_per_prompt`` prompts; batch j uses
    noise seed ``seed + j`` whatever the world size, so results are comparable across runs and
    checkpoints. Batches go round-robin to dp ranks; every rank runs the same number of batches
    (padding with repeats that are dropped), then per-sample scores are gathered on all ranks.
    ``return_images``: also gather the samples as uint8 (videos cut to ``max_frames`` evenly spaced
    frames first), returned as floats in [0, 1] under "images". ``memory``: chunk sizes and VAE residency
    (``rollout.sampling_memory``), passed to ``evaluate_policy``. ``progress``: a bar over this rank's sampling
    steps (samples x steps; none when the output is not a terminal).
    """
    from tqdm.auto import tqdm

    per = max(1, batch_size // samples_per_prompt)
    batches = [list(prompts[i:i + per]) for i in range(0, len(prompts), per)]
    rounds = math.ceil(len(batches) / dp_size) if batches else 0
    local = []
    mine = [len(batches[j]) if j < len(batches) else len(batches[0])
            for j in (r * dp_size + dp_rank for r in range(rounds))]  # the padding rounds sample too
    bar = tqdm(total=sum(mine) * samples_per_prompt * num_steps, desc="evaluate", unit="sample-step", leave=False,
               dynamic_ncols=True, disable=None if progress else True)
    for r in range(rounds):
        j = r * dp_size + dp_rank
        real = j < len(batches)
        ev = evaluate_policy(adapter, batches[j if real else 0], reward_fns, num_steps, encode=encode,
                             samples_per_prompt=samples_per_prompt, seed=seed + (j if real else 0),
                             batch_size=per * samples_per_prompt, return_images=return_images,
                             autocast_dtype=autocast_dtype, on_step=bar.update, **memory)
        if real:
            local.append((j, ev["per_sample"], _compact(ev.get("images"), max_frames), ev["extras_mean"]))
    bar.close()
    if _dist_on():
        gathered: List = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        allb = {}
        for part in gathered:
            for j, s, im, ex in part:
                allb.setdefault(j, (s, im, ex))  # sp peers computed the same batch: keep one
    else:
        allb = {j: (s, im, ex) for j, s, im, ex in local}
    order = sorted(allb)
    per_sample: Dict[str, List[float]] = {}
    extras: Dict[str, List[float]] = {}  # per-batch means of the rewards' extra per-sample values, weighted
    for j in order:
        for k, v in allb[j][0].items():
            per_sample.setdefault(k, []).extend(v)
        for k, v in allb[j][2].items():
            extras.setdefault(k, []).extend([v] * len(batches[j]))
    out = {
        "num_samples": sum(len(batches[j]) for j in order) * samples_per_prompt,
        "mean": {k: float(sum(v) / len(v)) for k, v in per_sample.items() if v},
        "extras_mean": {k: float(sum(v) / len(v)) for k, v in extras.items() if v},
        "per_sample": per_sample,
        "prompts": [p for j in order for p in batches[j] for _ in range(samples_per_prompt)],
    }
    if return_images and order:
        out["images"] = torch.cat([allb[j][1] for j in order]).float() / 255.0
    return out


def _compact(images: Optional[torch.Tensor], max_frames: Optional[int]) -> Optional[torch.Tensor]:
    """Samples for gathering / grids: uint8 on CPU, videos cut to ``max_frames`` evenly spaced frames."""
    if images is None:
        return None
    if images.ndim == 5 and max_frames and images.shape[1] > max_frames:
        idx = torch.linspace(0, images.shape[1] - 1, max_frames).round().long()
        images = images[:, idx]
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def frames_for_grid(images: torch.Tensor, max_frames: int) -> Tuple[torch.Tensor, int]:
    """(N, 3, H, W) -> itself, nrow 1; videos (N, F, 3, H, W) -> frame strips (N * f, 3, H, W), nrow f."""
    if images.ndim == 4:
        return images, 1
    F = images.shape[1]
    f = max(1, min(max_frames, F))
    idx = torch.linspace(0, F - 1, f).round().long()
    strips = images[:, idx]
    return strips.reshape(-1, *strips.shape[2:]), f

