"""One GRPO update under FSDP on 2 ranks (half the batch each) equals the 1-process update on the
whole batch: same mean loss, same updated weights. Checked without and with activation checkpointing."""

import copy

import common  # noqa: F401  (sys.path, threads)
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common import PROMPTS, check, tiny_adapter
from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.config import ParallelConfig
from fastvideo_grpo.distributed import ParallelDims, init_distributed, reduce_metrics, shutdown
from fastvideo_grpo.distributed.fsdp import parallelize
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update

KW = dict(clip_range=1e-2, num_updates=2, max_grad_norm=0.05)


def one_case(env, ac_fraction: float):
    torch.manual_seed(0)
    ad = tiny_adapter()
    ref = copy.deepcopy(ad)
    sched = ad.make_schedule(4, 0.3)
    prompts = PROMPTS[:4]
    G, B = 2, 8
    g = torch.Generator().manual_seed(1)
    keep = grpo.subsample_timesteps(4, 0.6, B, g)
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), G, keep, g)  # identical on both ranks
    adv = torch.randn(B, generator=g)

    # single-process reference on the whole batch
    ref_opt = torch.optim.AdamW(ref.model.parameters(), lr=1e-2)
    ref_stats = grpo_update(ref, sched, traj, adv, ref_opt, **KW)

    dims = ParallelDims(dp_shard=-1, world_size=env.world_size)
    dims.build_mesh("cpu")
    res = parallelize(ad, dims, ParallelConfig(activation_checkpointing=ac_fraction), env.device)
    check(res.fsdp and res.num_checkpointed == round(ac_fraction * 2), f"parallelize result {res}")
    opt = torch.optim.AdamW([p for p in ad.model.parameters() if p.requires_grad], lr=1e-2)
    half = B // env.world_size
    rows = torch.arange(env.rank * half, (env.rank + 1) * half)
    stats = grpo_update(ad, sched, traj.select(rows), adv[rows], opt, **KW)
    stats = reduce_metrics(stats)
    full = get_model_state_dict(ad.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        for k in ("train/loss", "train/clipfrac", "train/ratio_mean"):
            check(abs(stats[k] - ref_stats[k]) < 1e-6, f"{k}: fsdp {stats[k]} vs single {ref_stats[k]}")
        check(abs(stats["train/grad_norm"] - ref_stats["train/grad_norm"]) < 1e-5,
              f"grad_norm {stats['train/grad_norm']} vs {ref_stats['train/grad_norm']}")
        ref_sd = ref.model.state_dict()
        check(set(full) == set(ref_sd), f"keys differ: {set(full) ^ set(ref_sd)}")
        moved = 0
        for k, v in ref_sd.items():
            err = (full[k] - v).abs().max().item()
            check(err < 1e-5, f"weight {k} differs by {err} (ac={ac_fraction})")
            moved += 1
        print(f"ac={ac_fraction}: loss {stats['train/loss']:.8f} == {ref_stats['train/loss']:.8f}, "
              f"{moved} tensors equal")
    dist.barrier()


def differing_keys(env):
    """Ranks that report different metric keys (a per-step metric of the steps each rank trained): every key
    is reduced over the ranks that report it, and the next call (same keys again) still lines up."""
    mine = {"shared": float(env.rank + 1), f"only_rank{env.rank}": 10.0 * (env.rank + 1), "text": "kept"}
    out = reduce_metrics(mine)
    check(out["shared"] == 1.5 and out[f"only_rank{env.rank}"] == 10.0 * (env.rank + 1), f"mean: {out}")
    check(out[f"only_rank{1 - env.rank}"] == 10.0 * (2 - env.rank) and out["text"] == "kept", f"union: {out}")
    check(reduce_metrics(mine, op="max")["only_rank0"] == 10.0, "max over the reporting rank only")
    check(reduce_metrics(mine, op="sum")["shared"] == 3.0, "sum")
    check(reduce_metrics({"shared": 2.0})["shared"] == 2.0, "same keys after differing ones")
    print("differing metric keys reduce over the ranks that report them")


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        one_case(env, 0.0)
        one_case(env, 0.5)
        differing_keys(env)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
