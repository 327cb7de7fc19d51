"""Ulysses sequence parallelism (sp=2) with parallel.attention_backend: the attention after the
all-to-all runs through diffusers' dispatcher with the chosen backend (here ``_native_math``, a
non-default kernel that runs on CPU). A tiny FLUX with sp=2 equals the single-rank model (fwd + bwd),
and every attention inside the sequence-parallel blocks reached the backend's kernel (counted at
diffusers' backend registry, with the full token count and this rank's half of the heads); the FLUX
adapter through parallelize(sp=2, FSDP, attention_backend) equals the plain single-process adapter."""

import tempfile
from pathlib import Path

import common  # noqa: F401
import torch.distributed as dist

from common import check
from fastvideo_grpo.distributed import init_distributed, shutdown
from w_ulysses_hunyuan import adapter_case, flux_case

BACKEND = "_native_math"


def main():
    from diffusers.models import attention_dispatch as ad

    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    registry = ad._AttentionBackendRegistry
    name = ad.AttentionBackendName(BACKEND)
    kernel = registry._backends[name]
    calls = []

    def counting(**kw):
        calls.append((tuple(kw["query"].shape), tuple(kw["key"].shape)))
        return kernel(**kw)

    registry._backends[name] = counting
    try:
        group = dist.new_group([0, 1])
        flux_case(env, group, attention_backend=BACKEND)
        # FLUX: 2 double + 2 single blocks, (B, N, H, d) = (2, 16 image + 5 text tokens, 2 heads / 2 ranks, 16)
        check(len(calls) >= 4, f"the backend ran {len(calls)} times; expected every block's attention")
        check(all(q == (2, 21, 1, 16) for q, _ in calls), f"backend saw {sorted(set(calls))}, not all tokens x 1 head")
        if env.rank == 0:
            print(f"tiny FLUX with sp=2 and attention_backend={BACKEND} equals single rank ({len(calls)} kernel calls)")
        n = len(calls)
        with tempfile.TemporaryDirectory() as tmp:
            adapter_case(env, "flux", Path(tmp), attention_backend=BACKEND)
        check(len(calls) > n, "parallelize(attention_backend) did not reach the backend under sp=2")
        if env.rank == 0:
            print(f"flux adapter with parallelize(sp=2, FSDP, attention_backend={BACKEND}) equals single process")
    finally:
        registry._backends[name] = kernel
        shutdown()


if __name__ == "__main__":
    main()
