"""parallel.fsdp_one_process under ``torchrun --nproc_per_node=1``: the trainer's parameters are FSDP2
DTensors over a one-rank mesh, and an iteration gives the same numbers as the unsharded trainer.
Without a process group the option is refused with a message."""

import copy

import common  # noqa: F401  (sys.path, threads)
import torch
from torch.distributed.tensor import DTensor

from common import PROMPTS, check, redness, run_config, tiny_adapter
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.distributed.init import DistEnv
from fastvideo_grpo.training.runner import build_trainer


def main():
    env = init_distributed("cpu")
    check(env.world_size == 1, f"expected one process, got {env.world_size}")
    cfg = run_config("/tmp/unused")
    torch.manual_seed(0)
    base = tiny_adapter()
    plain_cfg, sharded_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    sharded_cfg.parallel.fsdp_one_process = True
    rewards = {"redness": redness}
    results = {}
    for name, c in (("plain", plain_cfg), ("sharded", sharded_cfg)):
        trainer, _, _ = build_trainer(c, env, lambda device: copy.deepcopy(base), PROMPTS, rewards, {"redness": 1.0})
        params = list(trainer.adapter.trainable_module().parameters())
        check(all(isinstance(p, DTensor) for p in params) == (name == "sharded"),
              f"{name}: DTensor parameters {[type(p).__name__ for p in params[:2]]}")
        m = trainer.train_iteration()
        full = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in params]
        results[name] = (m, full)
    (mp, wp), (ms, ws) = results["plain"], results["sharded"]
    for k in ("train/loss", "train/grad_norm", "reward/redness/mean"):
        check(abs(mp[k] - ms[k]) <= 1e-6 * max(1.0, abs(mp[k])), f"{k}: plain {mp[k]} vs sharded {ms[k]}")
    check(all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(wp, ws)), "updated weights differ")
    print("ONE_PROCESS_FSDP_OK", mp["train/loss"], ms["train/loss"])
    shutdown()
    try:  # no process group: refused before any work
        build_trainer(sharded_cfg, DistEnv(), lambda device: copy.deepcopy(base), PROMPTS, rewards, {"redness": 1.0})
    except ValueError as e:
        check("torchrun --nproc_per_node=1" in str(e), str(e))
        print("REFUSED_OK")
    else:
        raise AssertionError("fsdp_one_process without a process group was accepted")


if __name__ == "__main__":
    main()
