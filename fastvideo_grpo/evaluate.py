"""Held-out evaluation with the deterministic ODE sampler (eta = 0) and any set of rewards.

``evaluate_policy`` is what the trainer and the demo call; fixed seeds make "before" and "after"
comparable sample by sample (same initial noise per prompt and sample index).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .models.base import Cond, PolicyAdapter
from .rewards.base import RewardFn, compute_rewards
from .rollout import decode_latents, sample_ode


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
                       rollout_batch_size=rollout_batch_size)
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


def main(argv=None):
    """``python -m fastvideo_grpo.evaluate``: evaluate / compare checkpoints (see evaluate_cli.py)."""
    from .evaluate_cli import main as _main

    return _main(argv)


if __name__ == "__main__":
    from .evaluate_cli import cli

    cli()
