"""Sequence parallelism (sp = 2) + FSDP2 for the 2026 video families through ``parallelize``: each registered
adapter named on the command line (its tiny folder from tests/support/tiny_models.py) gives the single-process
prediction and parameter gradients. Wan 2.2 A14B runs one sample on each expert: the frozen low-noise expert is
sharded and sequence-parallel too, and gets no gradient."""

import copy
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401
import torch

from common import check, check_sharded_matches
from fastvideo_grpo.distributed import init_distributed, shutdown
from support.tiny_models import tiny_components


def _randomize(*modules):
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.normal_(0, 0.05)


def adapter_case(env, name, tmp: Path, t):
    from torch.distributed.tensor import DTensor

    from fastvideo_grpo.config import ParallelConfig
    from fastvideo_grpo.distributed import ParallelDims
    from fastvideo_grpo.distributed.fsdp import parallelize
    from fastvideo_grpo.models.base import ADAPTERS

    torch.manual_seed(0)
    comps, kw = tiny_components(name)
    _randomize(*[m for sub, m in comps.items() if sub.startswith("transformer")])
    root = tmp / f"{name}_rank{env.rank}"
    for sub, m in comps.items():
        m.save_pretrained(str(root / sub))
    ad = ADAPTERS.build(name, model_path=str(root), **kw)
    ref = copy.deepcopy(ad)
    g = torch.Generator().manual_seed(3)
    P = len(t)
    cond = {}
    for key, trailing in ad.cond_spec().items():
        shape = (P,) + tuple(6 if d is None else d for d in trailing)
        if key.endswith("attention_mask"):
            m = torch.ones(shape, dtype=torch.int64)
            m[0, -2:] = 0  # a padded prompt
            cond[key] = m
        else:
            cond[key] = torch.randn(shape, generator=g)
    z = torch.randn((P,) + tuple(ad.latent_shape(cond)), generator=g)
    t = torch.tensor(t)
    r = ref.predict(z, t, cond)
    (r.float() ** 2).sum().backward()
    dims = ParallelDims(dp_shard=1, sp=2, world_size=env.world_size)
    dims.build_mesh("cpu")
    res = parallelize(ad, dims, ParallelConfig(activation_checkpointing=1.0), env.device)
    check(res.sequence_parallel is not None and res.fsdp, f"{res}")
    frozen = ad.frozen_denoisers()
    check(len(res.frozen_sequence_parallel) == len(frozen), f"{name}: frozen denoisers without sp hooks")
    for m in frozen:
        check(all(isinstance(p, DTensor) for p in m.parameters()), f"{name}: a frozen denoiser is not sharded")
    o = ad.predict(z, t, cond)
    check_sharded_matches(ad, ref, o, r, name)
    for m in frozen:
        check(all(p.grad is None for p in m.parameters()), f"{name}: a frozen denoiser got gradients")
    res.sequence_parallel.remove()
    for sp in res.frozen_sequence_parallel:
        sp.remove()


TIMESTEPS = {"wan22_a14b": [900.0, 500.0]}  # one sample on each expert (boundary 875)


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in sys.argv[1:]:
                adapter_case(env, name, Path(tmp), TIMESTEPS.get(name, [700.0, 250.0]))
                if env.rank == 0:
                    print(f"{name} adapter with parallelize(sp=2, FSDP) equals single process", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
