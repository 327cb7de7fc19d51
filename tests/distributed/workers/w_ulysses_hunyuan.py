"""Ulysses sequence parallelism (sp=2) for joint image + text attention: tiny diffusers
HunyuanVideo and FLUX transformers with the adapters' SPPlans (image tokens sharded, text tokens
replicated) give the single-rank output, and parameter gradients averaged over the sp ranks (what
FSDP does) equal the single-rank ones; HunyuanVideo with text-padding masks, with and without
gradient checkpointing. Also the joint attention primitive itself (fwd + bwd, masks)."""

import copy

import common  # noqa: F401
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import check, check_sharded_matches
from fastvideo_grpo.distributed import init_distributed, shutdown
from fastvideo_grpo.distributed.sequence_parallel import SequenceParallel, ulysses_attention
from fastvideo_grpo.models.flux import FluxAdapter
from fastvideo_grpo.models.hunyuan_video import HunyuanVideoAdapter
from support.tiny_models import tiny_components, tiny_flux, tiny_hunyuan

TOL = dict(atol=1e-10, rtol=1e-8)


def joint_attention_case(env, group, rep_first: bool, masked: bool):
    g = torch.Generator().manual_seed(7)
    B, H, Ni, Nt, D = 2, 4, 8, 3, 8
    world, rank = env.world_size, env.rank
    q, k, v, gout = (torch.randn(B, H, Ni + Nt, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, Ni + Nt, dtype=torch.bool)
        mask[0, ..., (0 if rep_first else Ni + Nt - 2):(2 if rep_first else Ni + Nt)] = False
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    ref.backward(gout)
    n = Ni // world
    img = slice(Nt + rank * n, Nt + (rank + 1) * n) if rep_first else slice(rank * n, (rank + 1) * n)
    txt = slice(0, Nt) if rep_first else slice(Ni, Ni + Nt)

    def local(t):
        parts = [t[:, :, txt], t[:, :, img]] if rep_first else [t[:, :, img], t[:, :, txt]]
        return torch.cat(parts, dim=2)

    ql, kl, vl = (local(t).clone().requires_grad_() for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, group, attn_mask=mask, n_replicated=Nt, replicated_first=rep_first)
    # the loss summed over the ranks must count the replicated text outputs once (as the model's
    # final gather does for its image output): each rank takes 1/world of the text rows' gradient
    gl = local(gout).clone()
    gl[:, :, (slice(0, Nt) if rep_first else slice(n, n + Nt))] /= world
    out.backward(gl)
    torch.testing.assert_close(out, local(ref), **TOL)
    for name, a, b in (("q", ql, qf), ("k", kl, kf), ("v", vl, vf)):
        # image rows: this rank's gradient; text rows (replicated): summed over the ranks
        ga = a.grad.clone()
        ti = slice(0, Nt) if rep_first else slice(n, n + Nt)
        gt = ga[:, :, ti].clone()
        dist.all_reduce(gt)
        ga[:, :, ti] = gt
        torch.testing.assert_close(ga, local(b.grad), **TOL,
                                   msg=lambda m: f"d{name} (rep_first={rep_first}, masked={masked}): {m}")
    if masked:  # a mask over the local tokens is gathered
        out2 = ulysses_attention(ql, kl, vl, group, attn_mask=local(mask.expand(B, 1, 1, Ni + Nt).transpose(-1, -2))
                                 .transpose(-1, -2), n_replicated=Nt, replicated_first=rep_first)
        torch.testing.assert_close(out2, local(ref), **TOL)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _compare(m, ref, run, plan, blocks, group, what, n_img, attention_backend=None, n_joined=0):
    """``n_joined``: text tokens some blocks get joined before their image shard (FLUX.2's single-stream blocks)."""
    r = run(ref)
    (r ** 2).sum().backward()
    sp = SequenceParallel(blocks, group, plan, attention_backend=attention_backend)
    seen = []  # token counts the blocks see (registered after the sharding hook: runs after it)

    def record(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.shape[1])

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    try:
        o = run(m)
        (o ** 2).sum().backward()
    finally:
        sp.remove()
        for h in handles:
            h.remove()
    world = dist.get_world_size(group)
    check(len(seen) >= len(blocks) and all(s_ * world == n_img or (s_ - n_joined) * world == n_img for s_ in seen),
          f"{what}: blocks did not run on 1/{world} of the {n_img} image tokens: {seen}")
    torch.testing.assert_close(o, r, **TOL, msg=lambda msg: f"{what} output: {msg}")
    n = 0
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        if q.grad is None:
            check(p.grad is None, f"{what}: {name} has a gradient under sp only")
            continue
        gr = p.grad.clone()
        dist.all_reduce(gr)
        torch.testing.assert_close(gr / dist.get_world_size(group), q.grad, atol=1e-9, rtol=1e-7,
                                   msg=lambda msg: f"{what} grad {name}: {msg}")
        n += 1
    check(n > 10, f"{what}: only {n} parameters got gradients")


def hunyuan_case(env, group, checkpointing: bool):
    torch.manual_seed(0)
    m = _randomize(tiny_hunyuan(4, num_layers=2, num_single_layers=2).double())
    if checkpointing:
        m.enable_gradient_checkpointing()
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    B, L = 2, 6
    x = torch.randn(B, 4, 2, 4, 6, generator=g, dtype=torch.float64)  # 48 image tokens
    t = torch.tensor([500.0, 300.0], dtype=torch.float64)
    txt = torch.randn(B, L, 16, generator=g, dtype=torch.float64)
    tmask = torch.ones(B, L, dtype=torch.float64)
    tmask[0, 4:] = 0  # text padding on sample 0
    pooled = torch.randn(B, 8, generator=g, dtype=torch.float64)
    guidance = torch.full((B,), 6000.0, dtype=torch.float64)

    def run(model):
        return model(x, t, txt, tmask, pooled, guidance=guidance, return_dict=False)[0]

    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    _compare(m, ref, run, HunyuanVideoAdapter.sequence_parallel_plan(None), blocks, group,
             f"hunyuan (checkpointing={checkpointing})", n_img=2 * 4 * 6)


def flux_case(env, group, attention_backend=None):
    torch.manual_seed(0)
    m = _randomize(tiny_flux(num_layers=2, num_single_layers=2).double())
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    B, h, w, L = 2, 4, 4, 5
    x = torch.randn(B, h * w, 16, generator=g, dtype=torch.float64)
    txt = torch.randn(B, L, 32, generator=g, dtype=torch.float64)
    pooled = torch.randn(B, 32, generator=g, dtype=torch.float64)
    img_ids = torch.zeros(h, w, 3, dtype=torch.float64)
    img_ids[..., 1] = torch.arange(h, dtype=torch.float64)[:, None]
    img_ids[..., 2] = torch.arange(w, dtype=torch.float64)[None, :]
    img_ids = img_ids.reshape(h * w, 3)

    def run(model):
        return model(hidden_states=x, timestep=torch.tensor([0.5, 0.3], dtype=torch.float64),
                     guidance=torch.full((B,), 3.5, dtype=torch.float64), pooled_projections=pooled,
                     encoder_hidden_states=txt, txt_ids=torch.zeros(L, 3, dtype=torch.float64), img_ids=img_ids,
                     return_dict=False)[0]

    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    _compare(m, ref, run, FluxAdapter.sequence_parallel_plan(None), blocks, group, f"flux ({attention_backend})",
             n_img=h * w, attention_backend=attention_backend)


def flux2_case(env, group, checkpointing: bool):
    """FLUX.2: the dual-stream blocks take the text stream as an input, the single-stream ones [text; image] joined
    (the plan carries the text count to them and gathers only the image part of the last output); with diffusers'
    gradient checkpointing the blocks get their inputs positionally (the plan names both)."""
    from fastvideo_grpo.models.flux2 import Flux2Adapter, text_ids, token_ids
    from support.tiny_models import tiny_flux2

    torch.manual_seed(0)
    m = _randomize(tiny_flux2(num_layers=2, num_single_layers=2, guidance_embeds=True).double())
    if checkpointing:
        m.enable_gradient_checkpointing()
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    B, h, w, L = 2, 4, 4, 5
    x = torch.randn(B, h * w, 16, generator=g, dtype=torch.float64)
    txt = torch.randn(B, L, 32, generator=g, dtype=torch.float64)

    def run(model):
        return model(hidden_states=x, encoder_hidden_states=txt, timestep=torch.tensor([0.5, 0.3], dtype=torch.float64),
                     img_ids=token_ids(h, w, "cpu"), txt_ids=text_ids(L, "cpu"),
                     guidance=torch.full((B,), 4.0, dtype=torch.float64), return_dict=False)[0]

    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    _compare(m, ref, run, Flux2Adapter.sequence_parallel_plan(None), blocks, group,
             f"flux2 (checkpointing={checkpointing})", n_img=h * w, n_joined=L)


def z_image_case(env, group):
    """Z-Image: its main layers over the joined [image; text] sequence (batch padding masked: captions of 4 and 6
    tokens), sharded whole; the refiners run outside on every rank."""
    from fastvideo_grpo.models.z_image import ZImageAdapter
    from support.tiny_models import tiny_z_image

    torch.manual_seed(0)
    m = _randomize(tiny_z_image(num_layers=2).double())
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]  # 16 tokens, padded to 32
    caps = [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (4, 6)]  # each padded to 32

    def run(model):
        return torch.stack(model(x, torch.tensor([0.5, 0.3], dtype=torch.float64), caps, return_dict=False)[0])

    _compare(m, ref, run, ZImageAdapter.sequence_parallel_plan(None), list(m.layers), group, "z_image", n_img=64)


def _adapter_components(name):
    comps, kw = tiny_components(name)
    return comps["transformer"], comps["vae"], kw


def adapter_case(env, name, tmp, attention_backend="native"):
    """The registered adapter through ``parallelize`` (AC + SP with the adapter's plan + FSDP over the
    sp axis): predict() and the parameter gradients of a scalar loss equal the plain adapter's."""
    from fastvideo_grpo.config import ParallelConfig
    from fastvideo_grpo.distributed import ParallelDims
    from fastvideo_grpo.distributed.fsdp import parallelize
    from fastvideo_grpo.models.base import ADAPTERS

    torch.manual_seed(0)
    tr, vae, kw = _adapter_components(name)
    _randomize(tr)
    root = tmp / f"{name}_rank{env.rank}"
    tr.save_pretrained(str(root / "transformer"))
    vae.save_pretrained(str(root / "vae"))
    ad = ADAPTERS.build(name, model_path=str(root), **kw)
    ref = copy.deepcopy(ad)
    g = torch.Generator().manual_seed(3)
    P = 2
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
    t = torch.tensor([700.0, 250.0])
    r = ref.predict(z, t, cond)
    (r.float() ** 2).sum().backward()
    dims = ParallelDims(dp_shard=1, sp=2, world_size=env.world_size)
    dims.build_mesh("cpu")
    res = parallelize(ad, dims, ParallelConfig(activation_checkpointing=1.0, attention_backend=attention_backend),
                      env.device)
    check(res.sequence_parallel is not None and res.fsdp, f"{res}")
    o = ad.predict(z, t, cond)
    check_sharded_matches(ad, ref, o, r, name)
    res.sequence_parallel.remove()


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        group = dist.new_group([0, 1])
        for rep_first in (False, True):
            for masked in (False, True):
                joint_attention_case(env, group, rep_first, masked)
        if env.rank == 0:
            print("joint ulysses attention equals single-rank attention (fwd + bwd)")
        hunyuan_case(env, group, checkpointing=False)
        hunyuan_case(env, group, checkpointing=True)
        if env.rank == 0:
            print("tiny HunyuanVideo with sp=2 equals single rank (fwd + bwd, text padding mask)")
        flux_case(env, group)
        if env.rank == 0:
            print("tiny FLUX with sp=2 equals single rank (fwd + bwd)")
        flux2_case(env, group, checkpointing=False)
        flux2_case(env, group, checkpointing=True)
        z_image_case(env, group)
        if env.rank == 0:
            print("tiny FLUX.2 (with and without checkpointing) and Z-Image with sp=2 equal single rank (fwd + bwd)")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            for name in ("hunyuan_t2v", "hunyuan_t2i", "hunyuan_i2v", "flux", "flux2_klein", "z_image"):
                adapter_case(env, name, Path(tmp))
                if env.rank == 0:
                    print(f"{name} adapter with parallelize(sp=2, FSDP) equals single process")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
