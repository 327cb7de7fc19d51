"""Per-rank seeding and prompt assignment under torchrun: with dp=2 the ranks draw different initial
noise and disjoint whole prompt groups; with sp=2 the two ranks (one dp group) draw the same noise
and the same prompts."""

import common  # noqa: F401
import torch
import torch.distributed as dist

from common import PROMPTS, check, redness, run_config, tiny_adapter
from fastvideo_grpo import grpo
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.distributed.launch import build_trainer
from fastvideo_grpo.rollout import rollout


def gather_obj(x):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def case(env, sp: int):
    cfg = run_config("/tmp/unused", prompts_per_rank=2)
    cfg.parallel.sp = sp
    trainer, dims = build_trainer(cfg, env, lambda dev: tiny_adapter(dev), PROMPTS, {"red": redness}, {"red": 1.0})
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


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        case(env, sp=1)
        case(env, sp=2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
