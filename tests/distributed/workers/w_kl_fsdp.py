"""grpo.kl_coef > 0 under FSDP2 on 2 ranks (half the batch each) equals the 1-process update on the whole batch:
the KL statistic, the loss and the updated weights. Full fine-tuning (the reference is a copy of the weights,
sharded like them: a DTensor per parameter) with Flow-GRPO's KL form, and LoRA on a tiny SD3 (the reference is
the model with its adapter switched off: no copy) with the exact form."""

import copy
import sys

import common  # noqa: F401  (sys.path, threads)
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from common import PROMPTS, check, tiny_adapter
from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.algorithms.policy_versions import LoRAOff, WeightCopy, reference_policy
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update
from fastvideo_grpo.config import ParallelConfig
from fastvideo_grpo.distributed import ParallelDims, init_distributed, reduce_metrics, shutdown
from fastvideo_grpo.distributed.fsdp import parallelize
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.sde import flow_grpo_eta

KW = dict(clip_range=1e-2, num_updates=2, max_grad_norm=1.0)


def _cond(adapter, n):
    g = torch.Generator().manual_seed(5)
    return {k: torch.randn((n,) + tuple(6 if d is None else d for d in trailing), generator=g)
            for k, trailing in adapter.cond_spec().items()}


def one_case(env, name, build, kl_form, lr):
    torch.manual_seed(0)
    ad = build()
    single = copy.deepcopy(ad)
    sched = ad.make_schedule(4, 0.7)
    if kl_form == "flow_grpo":
        import dataclasses

        sched = dataclasses.replace(sched, eta=flow_grpo_eta(sched.sigmas, 0.7))
    G, B = 2, 4
    prompts = PROMPTS[:B // G]
    cond = ad.encode_prompts(prompts) if hasattr(ad, "encoder") or name == "full" else _cond(ad, B // G)
    g = torch.Generator().manual_seed(1)
    keep = grpo.subsample_timesteps(4, 0.75, B, g, window=(0, 3))
    traj = rollout(ad, sched, prompts, cond, G, keep, g, decode=False)  # identical on both ranks
    adv = torch.randn(B, generator=g)
    kw = dict(KW, kl_coef=0.5, kl_form=kl_form)

    single_opt = torch.optim.AdamW([p for p in single.model.parameters() if p.requires_grad], lr=lr)
    single_stats = grpo_update(single, sched, traj, adv, single_opt, reference=reference_policy(single), **kw)

    dims = ParallelDims(dp_shard=-1, world_size=env.world_size)
    dims.build_mesh("cpu")
    parallelize(ad, dims, ParallelConfig(), env.device)
    reference = reference_policy(ad)
    if name == "full":
        check(isinstance(reference, WeightCopy), f"full fine-tuning reference is {type(reference).__name__}")
        check(all(isinstance(t, DTensor) for t in reference.copy.values()), "the reference copy is not sharded")
    else:
        check(isinstance(reference, LoRAOff), f"LoRA reference is {type(reference).__name__}")
    opt = torch.optim.AdamW([p for p in ad.model.parameters() if p.requires_grad], lr=lr)
    half = B // env.world_size
    rows = torch.arange(env.rank * half, (env.rank + 1) * half)
    stats = reduce_metrics(grpo_update(ad, sched, traj.select(rows), adv[rows], opt, reference=reference, **kw))
    full = get_model_state_dict(ad.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        check(single_stats["train/kl"] > 0, f"{name}: the KL never moved off 0: {single_stats}")
        for k in ("train/kl", "train/loss"):
            a, b = stats[k], single_stats[k]
            check(abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{name} {k}: fsdp {a} vs single {b}")
        ref_sd = single.model.state_dict()
        for k, v in ref_sd.items():
            err = (full[k] - v).abs().max().item()
            check(err < 1e-5, f"{name}: weight {k} differs by {err}")
        print(f"{name}: kl {stats['train/kl']:.6e} == {single_stats['train/kl']:.6e}")
    dist.barrier()


def main():
    folder = sys.argv[1]
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        from support.tiny_models import tiny_components

        if env.rank == 0:
            comps, _ = tiny_components("sd3")
            for sub, m in comps.items():
                m.save_pretrained(f"{folder}/{sub}")
        dist.barrier()
        one_case(env, "full", tiny_adapter, "flow_grpo", 1e-2)
        one_case(env, "lora", lambda: ADAPTERS.build("sd3", model_path=folder, resolution=16, lora_rank=4),
                 "exact", 1e-1)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
