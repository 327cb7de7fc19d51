"""Train the tiny toy DiT with runner.run (the one loop); rank 0 writes the per-iteration metrics to
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
from fastvideo_grpo.training.loop import Component
from fastvideo_grpo.training.metrics import wall_clock_metric
from fastvideo_grpo.training.runner import PromptSets, run


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

    hist = []

    class Record(Component):  # every rank: the rank-averaged metrics, and the full state at DUMP_AT
        def on_iteration(self, state, it, m):
            hist.append(dict(m))
            if it == dump_at:
                full = full_state(state.trainer)  # collective
                if get_rank() == 0:
                    torch.save(full, f"{out}/full_{dump_at}.pt")

    run(cfg, tiny_adapter, PromptSets(PROMPTS), reward_fns={"red": redness}, reward_weights={"red": 1.0},
        extra_components=lambda parts: [Record()])
    if get_rank() == 0:
        rows = [{k: v for k, v in m.items() if isinstance(v, (int, float)) and not wall_clock_metric(k)}
                for m in hist]
        with open(f"{out}/metrics_{tag}.json", "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
