"""Train the tiny toy DiT with run_distributed; rank 0 writes the per-iteration metrics to
OUT/metrics_<tag>.json and, at iteration DUMP_AT, the full model + optimizer state to OUT/full_<it>.pt.

usage: w_train.py OUT_DIR NUM_ITERATIONS SAVE_EVERY RESUME PROMPTS_PER_RANK TAG [DUMP_AT]
(RESUME "none" = fresh start)."""

import json
import sys

import common  # noqa: F401
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from common import PROMPTS, redness, run_config, tiny_adapter
from fastvideo_grpo.distributed.init import get_rank
from fastvideo_grpo.distributed.launch import run_distributed


def full_state(trainer):
    """Full (unsharded) model and optimizer state dicts; collective."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = trainer.adapter.trainable_module()
    return {"model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, trainer.optimizer, options=opts)}


def main():
    out, iters, save_every, resume, per_rank, tag = sys.argv[1:7]
    dump_at = int(sys.argv[7]) if len(sys.argv) > 7 else -1
    cfg = run_config(out, num_iterations=int(iters), save_every=int(save_every),
                     resume=None if resume == "none" else resume, prompts_per_rank=int(per_rank))

    def on_metrics(m, trainer):
        if trainer.iteration == dump_at:
            state = full_state(trainer)
            if get_rank() == 0:
                torch.save(state, f"{out}/full_{dump_at}.pt")

    hist = run_distributed(cfg, tiny_adapter, PROMPTS, reward_fns={"red": redness}, reward_weights={"red": 1.0},
                           on_metrics=on_metrics)
    if get_rank() == 0:
        rows = [{k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith("time/")
                 and k != "samples_per_s"} for m in hist]
        with open(f"{out}/metrics_{tag}.json", "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
