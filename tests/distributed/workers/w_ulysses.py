"""Ulysses sequence parallelism on 2 ranks: attention forward + backward equal single-rank attention
(with and without a key mask), and a GRPO update of the toy DiT with sp=2 (FSDP over the sp axis)
equals the 1-process update."""

import copy

import common  # noqa: F401
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from common import PROMPTS, check, tiny_adapter
from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.config import ParallelConfig
from fastvideo_grpo.distributed import ParallelDims, init_distributed, reduce_metrics, shutdown
from fastvideo_grpo.distributed.fsdp import parallelize
from fastvideo_grpo.distributed.sequence_parallel import (gather_sequence, head_to_seq_all_to_all, shard_sequence,
                                                          seq_to_head_all_to_all, ulysses_attention)
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update


def attention_case(env, group, masked: bool):
    g = torch.Generator().manual_seed(5)
    B, H, N, D = 2, 4, 8, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    gout = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., -3:] = False
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    ref.backward(gout)
    n = N // env.world_size
    sl = slice(env.rank * n, (env.rank + 1) * n)
    ql, kl, vl = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, group, attn_mask=mask)
    out.backward(gout[:, :, sl])
    tol = dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, ref[:, :, sl], **tol)
    for name, a, b in (("q", ql, qf), ("k", kl, kf), ("v", vl, vf)):
        torch.testing.assert_close(a.grad, b.grad[:, :, sl], **tol, msg=lambda m: f"d{name} (masked={masked}): {m}")
    # cross-attention to a replicated context (text tokens) stays local
    ctx_k, ctx_v = (torch.randn(B, H, 5, D, generator=g, dtype=torch.float64) for _ in range(2))
    cref = F.scaled_dot_product_attention(q, ctx_k, ctx_v)
    torch.testing.assert_close(ulysses_attention(q[:, :, sl], ctx_k, ctx_v, group), cref[:, :, sl], **tol)
    # a local-length mask is gathered to the full sequence
    if masked:
        out2 = ulysses_attention(ql, kl, vl, group, attn_mask=mask[..., sl])
        torch.testing.assert_close(out2, ref[:, :, sl], **tol)


def primitives(env, group):
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float64).reshape(2, 4, 6, 3)
    local = x[:, :, env.rank * 3:(env.rank + 1) * 3]
    heads = seq_to_head_all_to_all(local, group)
    torch.testing.assert_close(heads, x[:, env.rank * 2:(env.rank + 1) * 2])
    torch.testing.assert_close(head_to_seq_all_to_all(heads, group), local)
    torch.testing.assert_close(gather_sequence(shard_sequence(x, group, dim=2), group, dim=2), x)


class _PosBlock(torch.nn.Module):
    """Attention block taking a per-token positional table over ALL tokens (like rotary tables)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(d, 3 * d), heads

    def forward(self, x, pos):
        B, N, D = x.shape
        q, k, v = self.qkv(x + pos).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)


def side_input_case(env, group):
    """SPPlan.shard_every_block shards a full-length side input at every block; the gradients,
    averaged over the sp ranks (what FSDP does), equal the single-rank ones."""
    from fastvideo_grpo.distributed.sequence_parallel import SPPlan, SequenceParallel

    torch.manual_seed(3)
    blocks = torch.nn.ModuleList([_PosBlock(), _PosBlock()]).double()
    ref_blocks = copy.deepcopy(blocks)
    x, pos = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)

    def run(bs):
        h = x
        for b in bs:
            h = b(h, pos)
        return (h ** 2).sum()

    ref = run(ref_blocks)
    ref.backward()
    sp = SequenceParallel(list(blocks), group, SPPlan(shard_every_block={1: 1}))
    out = run(blocks)
    out.backward()
    torch.testing.assert_close(out, ref)
    for p, q in zip(blocks.parameters(), ref_blocks.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g / dist.get_world_size(group), q.grad)
    sp.remove()


def wan_case(env, group):
    """A tiny diffusers Wan transformer with the plan docs/distributed.md gives for Wan (rotary tables and
    per-token modulation sharded at every block; cross-attention to text stays local): same output,
    and gradients averaged over the sp ranks equal the single-rank ones."""
    try:
        import diffusers
    except ImportError:
        return "skipped (no diffusers)"
    from fastvideo_grpo.distributed.sequence_parallel import SPPlan, SequenceParallel

    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0], dtype=torch.float64)
    txt = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
    r = ref(x, t, txt, return_dict=False)[0]
    (r ** 2).sum().backward()
    sp = SequenceParallel(list(m.blocks), group, SPPlan(shard_every_block={2: 1, 3: 1, "rotary_emb": 1}))
    o = m(x, t, txt, return_dict=False)[0]
    (o ** 2).sum().backward()
    torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-8)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        gr = p.grad.clone()
        dist.all_reduce(gr)
        torch.testing.assert_close(gr / 2, q.grad, atol=1e-6, rtol=1e-5, msg=lambda msg: f"{name}: {msg}")
    sp.remove()
    return "ok"


def model_case(env):
    torch.manual_seed(0)
    ad = tiny_adapter()
    ref = copy.deepcopy(ad)
    sched = ad.make_schedule(4, 0.3)
    prompts = PROMPTS[:2]
    G, B = 2, 4
    g = torch.Generator().manual_seed(2)
    keep = grpo.subsample_timesteps(4, 0.75, B, g)  # 3 of the 4 steps per sample
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), G, keep, g)
    adv = torch.randn(B, generator=g)
    kw = dict(clip_range=1e-2, num_updates=2, max_grad_norm=10.0)
    ref_opt = torch.optim.AdamW(ref.model.parameters(), lr=1e-2)
    ref_stats = grpo_update(ref, sched, traj, adv, ref_opt, **kw)

    dims = ParallelDims(dp_shard=1, sp=2, world_size=env.world_size)
    dims.build_mesh("cpu")
    res = parallelize(ad, dims, ParallelConfig(activation_checkpointing=1.0), env.device)
    check(res.sequence_parallel is not None and res.fsdp, f"{res}")
    # the sp rollout equals the single-process one (both sp ranks compute the same trajectory)
    g2 = torch.Generator().manual_seed(2)
    keep2 = grpo.subsample_timesteps(4, 0.75, B, g2)
    traj2 = rollout(ad, sched, prompts, ad.encode_prompts(prompts), G, keep2, g2)
    err = (traj2.final_latents - traj.final_latents).abs().max().item()
    check(err < 1e-5, f"sp rollout differs from single-process rollout by {err}")
    opt = torch.optim.AdamW([p for p in ad.model.parameters() if p.requires_grad], lr=1e-2)
    stats = reduce_metrics(grpo_update(ad, sched, traj, adv, opt, **kw))  # whole batch on both sp ranks
    full = get_model_state_dict(ad.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        check(abs(stats["train/loss"] - ref_stats["train/loss"]) < 1e-6, f"loss {stats} vs {ref_stats}")
        check(abs(stats["train/grad_norm"] - ref_stats["train/grad_norm"]) < 1e-4,
              f"grad norm {stats['train/grad_norm']} vs {ref_stats['train/grad_norm']}")
        for k, v in ref.model.state_dict().items():
            e = (full[k] - v).abs().max().item()
            check(e < 1e-5, f"sp weight {k} differs by {e}")
        print(f"sp=2 model update equals single process (loss {stats['train/loss']:.8f})")
    res.sequence_parallel.remove()


def main():
    env = init_distributed("cpu")
    check(env.world_size == 2, "run with 2 processes")
    try:
        group = dist.new_group([0, 1])
        primitives(env, group)
        attention_case(env, group, masked=False)
        attention_case(env, group, masked=True)
        side_input_case(env, group)
        wan = wan_case(env, group)
        if env.rank == 0:
            print(f"tiny Wan with sp=2: {wan}")
        if env.rank == 0:
            print("ulysses attention equals single-rank attention (fwd + bwd)")
        model_case(env)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
