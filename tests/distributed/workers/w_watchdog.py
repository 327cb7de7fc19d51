"""The reward-hacking watchdog on 2 ranks: the tiny toy DiT trained by runner.run with held-out evaluations
every iteration whose rewards are scripted per call (each rank scores one batch per evaluation: the trained
reward 0.5, 0.6, ..., the gold 0.9, 0.8, ...), pixel diversity (main rank) and train.watchdog.stop.
Rank 0 writes OUT/result.json: the exit code every rank saw and the iteration each rank stopped at.

usage: w_watchdog.py OUT_DIR"""

import json
import os
import sys

import common  # noqa: F401
import torch
import torch.distributed as dist

from common import PROMPTS, redness, run_config, tiny_adapter
from fastvideo_grpo.config import RewardConfig
from fastvideo_grpo.training.loop import Component, TrainingStopped
from fastvideo_grpo.rewards.base import REWARDS
from fastvideo_grpo.training.runner import PromptSets, run


def scripted(start, step):
    calls = []

    def reward(images, prompts, **_):
        calls.append(1)
        return torch.full((images.shape[0],), start + step * (len(calls) - 1)), {}

    return reward


REWARDS.register("dist_gold")(lambda: scripted(0.9, -0.1))


def main():
    out = sys.argv[1]
    cfg = run_config(out, num_iterations=6, save_every=0, prompts_per_rank=1)
    cfg.train.eval_every = 1
    cfg.eval.samples_per_prompt = 2
    cfg.eval.batch_size = 4  # 2 held-out prompts x 2 samples per batch: one batch per rank per evaluation
    w = cfg.train.watchdog
    w.gold, w.diversity, w.threshold, w.patience, w.stop = [RewardConfig(name="dist_gold", key="gold")], "pixel", \
        0.15, 2, True
    cfg.validate()
    stopped_at = []

    class Last(Component):
        def on_iteration(self, state, it, m):
            stopped_at[:] = [it]

    code = 0
    try:
        run(cfg, tiny_adapter, PromptSets(PROMPTS, held=PROMPTS[:4]), reward_fns={"red": redness},
            reward_weights={"red": 1.0}, eval_fns={"trained": scripted(0.5, 0.1)},
            extra_components=lambda parts: [Last()])
    except TrainingStopped as e:
        code = e.exit_code
    # the process group is shut down by now: each rank reports through its own file
    with open(f"{out}/rank_{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"code": code, "stopped_at": stopped_at}, f)
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
