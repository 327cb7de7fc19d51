"""FSDP2's "returned a view tensor" warning is gone, and sharding leaves the gradients as one process computes them.

For the toy DiT at patch size 1 (the demo's latent model, whose un-patchify returned a view) and the tiny model of
every family in tests/support/tiny_models.py: the policy is sharded over the 2 ranks by ``parallelize`` and each
rank runs a forward and backward on its half of a batch of 4 with that warning turned into an error; FSDP2 averages
the halves' gradients. The full gradients (all-gathered) must equal one process's (an unsharded copy on every rank)
over the same two halves, averaged.

They are not bitwise equal in general: other processes, and the sharded model's parameters live in FSDP's
all-gather buffers, where the CPU kernels may block their sums differently (the UNet's convolutions do). Bound: an
element of a gradient sums the per-sample terms g_b / B, each computed with an error of at most n * eps times the
size of its products (eps = 2^-24, n the longest inner product on the path: a length-n dot product errs by at most
n * eps * sum |x_i y_i|), and the B terms are summed with an error of at most B * eps times their absolute sum.
Within one tensor's gradient the products cancel unevenly, so their size is taken norm-wise, per tensor:
max |g_fsdp - g_ref| <= 2 * (n + B) * eps * max(sum_b |g_b| / B) (2: both runs err). Measured: up to about 20 eps
times that size (the UNet), bitwise equal for the toy and Wan; a lost or doubled rank's share would be of the size
of the gradient itself.

The check can fail: the toy model sharded without the hook warns.

usage: w_fsdp_views.py (under torchrun, 2 processes)
"""

import copy
import tempfile
import warnings
from pathlib import Path

import common  # noqa: F401  (sys.path, threads)
import torch
import torch.distributed as dist

from common import check
from fastvideo_grpo.config import ParallelConfig
from fastvideo_grpo.distributed import ParallelDims, init_distributed, shutdown
from fastvideo_grpo.distributed.fsdp import parallelize
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
from support.tiny_models import FAMILIES, TEXT_LEN, tiny_components

VIEW = r".*returned a view tensor.*"
B = 4
EPS = 2.0 ** -24


def toy_adapter():
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(image_size=4, patch_size=1, hidden=32, depth=1, heads=2))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
    return ToyAdapter(m)


def family_adapter(name, root: Path):
    comps, kw = tiny_components(name)  # seeded: the same weights on every rank
    for sub, m in comps.items():
        m.save_pretrained(str(root / name / sub))
    return ADAPTERS.build(name, model_path=str(root / name), **kw)


def inputs(adapter):
    g = torch.Generator().manual_seed(1)
    if isinstance(adapter, ToyAdapter):  # its own tokenizer
        cond = adapter.encode_prompts(["one red square", "two blue circles", "a green triangle", "one blue circle"])
        z = adapter.initial_noise(B, g)
        return z, adapter.make_schedule(3, 0.3).model_timestep(1, z), cond
    cond = {}
    for key, trailing in adapter.cond_spec().items():
        shape = (B,) + tuple(TEXT_LEN if d is None else d for d in trailing)
        cond[key] = (torch.ones(shape, dtype=torch.int64) if key.endswith("attention_mask")
                     else torch.randn(shape, generator=g))
    z = adapter.initial_noise(B, g, cond=cond)
    sched = adapter.make_schedule(3, 0.3)
    return z, sched.model_timestep(1, z), cond


def rows(cond, idx):
    return {k: v[idx] for k, v in cond.items()}


def loss(adapter, z, t, cond):
    return adapter.predict(z, t, cond).float().square().mean()


def longest_inner_product(module) -> int:
    """The largest input width of the module's linear / conv layers and its attention lengths' bound (tokens)."""
    n = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim >= 2:
            n = max(n, int(w[0].numel()))
    return n


def one_case(name, adapter, dims, env):
    z, t, cond = inputs(adapter)
    ref = copy.deepcopy(adapter)
    ref_params = [(n, p) for n, p in ref.trainable_module().named_parameters() if p.requires_grad]
    half = B // env.world_size
    g_ref = {n: torch.zeros_like(p) for n, p in ref_params}
    for r in range(env.world_size):  # one process, the ranks' halves of the batch one after the other
        ref.trainable_module().zero_grad()
        part = slice(r * half, (r + 1) * half)
        loss(ref, z[part], t[part], rows(cond, part)).backward()
        for n, p in ref_params:
            if p.grad is not None:  # None: not on the path of this model's output (qwen_image's unused layers)
                g_ref[n] += p.grad / env.world_size
    scale = {n: torch.zeros_like(p) for n, p in ref_params}
    for b in range(B):  # the terms of the batch mean: per-sample gradients / B
        ref.trainable_module().zero_grad()
        (loss(ref, z[b:b + 1], t[b:b + 1], rows(cond, slice(b, b + 1))) / B).backward()
        for n, p in ref_params:
            if p.grad is not None:
                scale[n] += p.grad.abs()
    n_inner = max(longest_inner_product(ref.trainable_module()), int(z[0].numel()))

    parallelize(adapter, dims, ParallelConfig(), env.device)
    mine = slice(env.rank * half, (env.rank + 1) * half)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=VIEW)
        loss(adapter, z[mine], t[mine], rows(cond, mine)).backward()
    worst = 0.0
    for (n, p), (n_ref, _) in zip([(n, p) for n, p in adapter.trainable_module().named_parameters()
                                   if p.requires_grad], ref_params):
        if p.grad is None:  # the same parameters as in one process (checked below: an exact zero there)
            g = torch.zeros_like(g_ref[n_ref])
        else:  # collective: every rank, same order
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        check(n.replace("_checkpoint_wrapped_module.", "") == n_ref, f"{name}: parameter order {n} vs {n_ref}")
        bound = 2 * (n_inner + B) * EPS * scale[n_ref].max().item()
        err = (g - g_ref[n_ref]).abs().max().item()
        check(err <= bound, f"{name}: gradient of {n} differs from one process's by {err:.3g} > its bound {bound:.3g}")
        worst = max(worst, err / bound if bound > 0 else 0.0)
    moved = sum(int((g_ref[k] != 0).any()) for k in g_ref)
    check(moved > 0, f"{name}: no gradient at all")
    if env.rank == 0:
        print(f"{name}: gradients equal one process's within {worst:.1%} of the bound "
              f"({moved}/{len(g_ref)} tensors non-zero, n={n_inner})", flush=True)


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    dims = ParallelDims(dp_shard=-1, world_size=env.world_size)
    dims.build_mesh("cpu")

    # the check can fail: sharded without the hook, the toy DiT at patch size 1 warns
    from torch.distributed.fsdp import fully_shard

    bare = toy_adapter()
    z, t, cond = inputs(bare)
    for blk in bare.model.blocks:
        fully_shard(blk, mesh=dims.fsdp_mesh())
    fully_shard(bare.model, mesh=dims.fsdp_mesh())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss(bare, z, t, cond).backward()
    check(any("returned a view tensor" in str(w.message) for w in seen), "the unhooked toy model did not warn")

    one_case("toy (patch size 1)", toy_adapter(), dims, env)
    with tempfile.TemporaryDirectory() as tmp:
        for name in FAMILIES:
            one_case(name, family_adapter(name, Path(tmp)), dims, env)
    shutdown()


if __name__ == "__main__":
    main()
