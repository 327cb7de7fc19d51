"""A 2-rank toy run in which rank 1 stops itself (SIGSTOP) inside the reward of iteration 2, as a hung or
suspended process would; the other rank must name it and exit (distributed/heartbeat.py).

usage: w_stall.py OUT_DIR TRAIN_TIMEOUT_S STOP|none [--resume latest]
Writes OUT_DIR/stopped.json (pid, time) on rank 1 just before it stops."""

import json
import os
import signal
import sys
import time

import common  # noqa: F401
from common import PROMPTS, redness, run_config, tiny_adapter
from fastvideo_grpo.distributed.init import get_rank
from fastvideo_grpo.training.loop import run_cli
from fastvideo_grpo.training.runner import PromptSets, run


def main():
    out, timeout, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "stop"
    resume = "latest" if "--resume" in sys.argv else None
    cfg = run_config(out, num_iterations=3, save_every=1, resume=resume)
    cfg.parallel.train_timeout_s = timeout
    cfg.parallel.init_timeout_s = 120.0  # start-up and the first iteration: generous on a loaded machine
    calls = {"n": 0}

    def reward(images, prompts, **meta):
        calls["n"] += 1
        if stop and get_rank() == 1 and calls["n"] == 2:
            with open(os.path.join(out, "stopped.json"), "w") as f:
                json.dump({"pid": os.getpid(), "time": time.time()}, f)
            os.kill(os.getpid(), signal.SIGSTOP)
        return redness(images, prompts)

    run(cfg.validate(), tiny_adapter, PromptSets(PROMPTS), reward_fns={"red": reward}, reward_weights={"red": 1.0})


if __name__ == "__main__":
    run_cli(main)
