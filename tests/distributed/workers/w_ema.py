"""The weight EMA under FSDP2 on 2 ranks: every average is a DTensor sharded like its parameter, the full
average equals the closed form of the full weights' history, the swap for evaluation works on the shards,
and a checkpoint round-trips it. Rank 0 writes the full average to OUT/ema_full.pt for a 1-process load.

usage: w_ema.py OUT_DIR"""

import sys

import common  # noqa: F401
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from common import PROMPTS, check, redness, run_config, tiny_adapter
from fastvideo_grpo.training.checkpoint import load_trainer_checkpoint, save_trainer_checkpoint
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.training.runner import build_trainer

DECAY = 0.7


def full_weights(trainer):
    opts = StateDictOptions(full_state_dict=True)  # on every rank (cpu_offload would leave it on rank 0 only)
    sd = get_model_state_dict(trainer.adapter.trainable_module(), options=opts)
    return {k: v.double() for k, v in sd.items()}


def full_ema(trainer):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).double().cpu()
            for k, v in trainer.ema.state_dict().items()}


def main():
    out = sys.argv[1]
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        cfg = run_config(out, num_iterations=10)
        cfg.train.ema_decay = DECAY
        trainer, dims, _ = build_trainer(cfg, env, tiny_adapter, PROMPTS, {"red": redness}, {"red": 1.0})
        ema = trainer.ema
        params = dict(ema.params)
        for name, e in ema.state_dict().items():
            p = params[name]
            check(isinstance(p, DTensor) and isinstance(e, DTensor), f"{name}: not sharded")
            check(e.placements == p.placements and e.device_mesh == p.device_mesh, f"{name}: placed otherwise")
            check(e.to_local().shape == p.to_local().shape and e.dtype == torch.float32, f"{name}: local shard")
        hist = [full_weights(trainer)]
        for _ in range(3):
            trainer.train_iteration()
            ema.update()
            hist.append(full_weights(trainer))
        got = full_ema(trainer)
        for k, v in got.items():
            n = len(hist) - 1
            want = DECAY ** n * hist[0][k] + sum((1 - DECAY) * DECAY ** (n - i) * hist[i][k] for i in range(1, n + 1))
            check(torch.allclose(v, want, rtol=1e-5, atol=1e-6), f"{k}: EMA differs by {(v - want).abs().max()}")
        live = full_weights(trainer)
        ad = trainer.adapter
        z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.full((2,), 500.0)
        cond = ad.encode_prompts(PROMPTS[:2])
        plain = tiny_adapter()  # unsharded, holding the full average: what a forward under applied() must give
        plain.model.load_state_dict({k: v.float() for k, v in got.items()}, strict=False)
        with torch.no_grad():
            ad.predict(z, t, cond)  # a forward first, so that gathered copies of the trained weights exist
            with ema.applied():
                inside = full_weights(trainer)
                check(all(torch.allclose(inside[k], got[k].to(inside[k].dtype), atol=1e-7) for k in got),
                      "applied(): the parameters do not hold the average")
                out_ema = ad.predict(z, t, cond)
            check(torch.allclose(out_ema, plain.predict(z, t, cond), rtol=1e-5, atol=1e-6),
                  "a forward under applied() does not run with the average")
            check(not torch.allclose(ad.predict(z, t, cond), out_ema, atol=1e-6), "restored forward equals the EMA's")
        after = full_weights(trainer)
        check(all(torch.equal(after[k], live[k]) for k in live), "applied(): trained weights not restored")
        path = save_trainer_checkpoint(trainer, f"{out}/checkpoints")
        other, _, _ = build_trainer(cfg, env, tiny_adapter, PROMPTS, {"red": redness}, {"red": 1.0})
        load_trainer_checkpoint(other, path)
        again = full_ema(other)
        check(all(torch.equal(again[k], got[k]) for k in got), "checkpoint round trip changed the EMA")
        if env.rank == 0:
            torch.save({k: v.float() for k, v in got.items()}, f"{out}/ema_full.pt")
            print(f"EMA_SHARDED_OK {len(got)} tensors, checkpoint {path}")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
