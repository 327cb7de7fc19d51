"""Load a checkpoint (written by another world size) into a fresh trainer, compare the full model and
optimizer state with a reference dump, then train one more iteration.

usage: w_resume_check.py OUT_DIR CHECKPOINT REFERENCE_PT PROMPTS_PER_RANK"""

import sys

import common  # noqa: F401
import torch

from common import PROMPTS, check, redness, run_config, tiny_adapter
from fastvideo_grpo.training.checkpoint import load_trainer_checkpoint, resolve_resume
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.training.runner import build_trainer
from w_train import full_state


def compare(a, b, where):
    if isinstance(a, dict):
        check(set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ")
        for k in a:
            compare(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        check(len(a) == len(b), f"{where}: lengths differ")
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        check(torch.equal(a, b), f"{where}: tensors differ by {(a.float() - b.float()).abs().max()}")
    else:
        check(a == b, f"{where}: {a!r} != {b!r}")


def main():
    out, ckpt, ref_file, per_rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    env = init_distributed("cpu")
    try:
        cfg = run_config(out, num_iterations=10, prompts_per_rank=per_rank)
        trainer, dims, _ = build_trainer(cfg, env, tiny_adapter, PROMPTS, {"red": redness}, {"red": 1.0})
        exact = load_trainer_checkpoint(trainer, resolve_resume(ckpt, out))
        check(not exact or env.world_size == 2, "RNG reported exact across a world-size change")
        state = full_state(trainer)
        if env.rank == 0:
            ref = torch.load(ref_file, weights_only=True)
            compare(state["model"], ref["model"], "model")
            compare(state["optim"], ref["optim"], "optim")
        check(trainer.iteration == 2, f"resumed at iteration {trainer.iteration}, expected 2")
        check(trainer.prompts.position == 2 * 2 * 2, f"sampler position {trainer.prompts.position}")
        m = trainer.train_iteration()
        check(trainer.iteration == 3 and torch.isfinite(torch.tensor(m["train/loss"])), f"{m}")
        print(f"world {env.world_size}: resumed exact={exact}, iteration 3 loss {m['train/loss']:.6f}")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
