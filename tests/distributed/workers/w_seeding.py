"""Per-rank seeding and prompt assignment under torchrun: with dp=2 the ranks draw different initial
noise and disjoint whole prompt groups; with sp=2 the two ranks (one dp group) draw the same noise
and the same prompts. Global (DDPO-style) advantages are normalised over both dp ranks."""

import common  # noqa: F401
import torch
import torch.distributed as dist

from common import PROMPTS, check, redness, run_config, tiny_adapter
from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.training.runner import build_trainer
from fastvideo_grpo.algorithms.rollout import rollout


def gather_obj(x):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def case(env, sp: int):
    cfg = run_config("/tmp/unused", prompts_per_rank=2)
    cfg.parallel.sp = sp
    trainer, dims, _ = build_trainer(cfg, env, lambda dev: tiny_adapter(dev), PROMPTS, {"red": redness}, {"red": 1.0})
    noise = trainer.adapter.initial_noise(1, trainer.generator)
    noises = gather_obj(noise)
    prompts, cond = trainer.prompts.next_batch(2)
    all_prompts = gather_obj(prompts)
    # a rollout from this rank's prompts: whole groups, contiguous
    G = cfg.grpo.group_size
    keep = grpo.subsample_timesteps(4, 0.6, len(prompts) * G, trainer.generator)
    traj = rollout(trainer.adapter, trainer.schedule, prompts, cond, G, keep, trainer.generator)
    for i in range(len(prompts)):
        check(traj.prompts[i * G:(i + 1) * G] == [prompts[i]] * G, f"group {i} split: {traj.prompts}")
    finals = gather_obj(traj.final_latents)
    if sp == 1:
        check(not torch.equal(noises[0], noises[1]), "dp ranks drew the same initial noise")
        check(not set(all_prompts[0]) & set(all_prompts[1]), f"dp ranks share prompts: {all_prompts}")
        check(not torch.equal(finals[0], finals[1]), "dp ranks produced identical rollouts")
    else:
        check(torch.equal(noises[0], noises[1]), "sp peers drew different initial noise")
        check(all_prompts[0] == all_prompts[1], f"sp peers got different prompts: {all_prompts}")
        check(torch.allclose(finals[0], finals[1], atol=1e-6), "sp peers produced different rollouts")
    if env.rank == 0:
        print(f"sp={sp}: dp={dims.dp} prompts {all_prompts} ok")


def global_advantage_case(env):
    """grpo.advantage: global normalises over both dp ranks' rewards, not each rank's own."""
    cfg = run_config("/tmp/unused", prompts_per_rank=2)
    cfg.grpo.advantage = "global"
    trainer, dims, _ = build_trainer(cfg, env, lambda dev: tiny_adapter(dev), PROMPTS, {"red": redness}, {"red": 1.0})
    check(dims.dp == 2, "expected dp=2")
    g = torch.Generator().manual_seed(100 + env.rank)
    rewards = {"red": torch.rand(8, generator=g) + 3.0 * env.rank}  # rank 1's rewards are much larger
    adv = trainer.advantages(rewards, 4)
    all_r = torch.cat(gather_obj(rewards["red"]))
    want = (all_r - all_r.mean()) / (all_r.std() + 1e-8)  # the released global branch: unbiased std + 1e-8
    got = torch.cat(gather_obj(adv))
    check(torch.allclose(got, want, atol=1e-5), f"global advantages {got} != {want}")
    local = grpo.aggregate_advantages(rewards, 4, normalise="global")
    check(not torch.allclose(adv, local, atol=1e-3), "global advantages were normalised per rank")
    if env.rank == 0:
        print("global advantage over dp ranks ok")


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        case(env, sp=1)
        case(env, sp=2)
        global_advantage_case(env)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
