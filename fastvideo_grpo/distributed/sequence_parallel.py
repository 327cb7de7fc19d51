"""Ulysses sequence parallelism: all-to-all between sequence shards and head shards around attention.

Each of the ``sp`` ranks of a group holds 1/sp of the tokens of every sample. Before attention an
all-to-all turns (B, H, N/sp, d) into (B, H/sp, N, d) -- all tokens, a slice of the heads -- so the
attention itself is exact; a second all-to-all turns the output back. Everything outside attention
is token-wise and runs on the local shard.

Gradient bookkeeping (why the results equal single-rank training). The transformer's input is
split along the sequence before the first block (``shard_sequence``) and gathered after the last
(``gather_sequence``); everything after the gather (and the loss) is computed identically on every
sp rank. The backward of the gather returns ``sp * grad[local slice]`` (the sum over the sp ranks of
their identical output gradients), so each rank's parameter gradient is sp times the part its
tokens contribute plus, for parameters used after the gather, the full gradient. FSDP shards over
the flattened (dp_shard, sp) axis and *averages* gradients over it, which turns both into the exact
gradient of the replicated loss.

``SequenceParallel`` installs this on a model without model-specific code: a forward pre-hook on
the first transformer block shards the inputs named by a ``SPPlan`` (default: the first positional
argument / ``hidden_states`` along dim 1; per-block side inputs such as rotary tables as the plan
says), a forward hook on the last block gathers its output,
and while a block runs, ``torch.nn.functional.scaled_dot_product_attention`` dispatches to
``ulysses_attention``. Requirements: heads and the token count divisible by sp; positional
information applied inside the blocks to the local tokens must be sharded the same way (an
adapter whose blocks take e.g. rotary tables over all tokens supplies its own ``SPPlan``).

Attention kernel (``parallel.attention_backend``): after the all-to-all each rank holds every token
of a slice of the heads, so any kernel computes that attention exactly. ``SequenceParallel(...,
attention_backend=name)`` runs it through diffusers' attention dispatcher with that backend
(``flash``, ``_flash_3``, ``sage``, ``_native_math``, ...); None = torch's scaled_dot_product_attention.
The model's own attention layers stay on diffusers' native backend, whose call to
``scaled_dot_product_attention`` is what the Ulysses dispatch intercepts.

Joint image + text attention (HunyuanVideo, FLUX; ``SPPlan.replicated_tokens``): only the image
tokens are sharded; the text tokens are computed whole, identically, on every rank. Inside
attention the text part takes this rank's head slice and its output heads are all-gathered back,
whose backward is the exact adjoint (a reduce-scatter: each rank's text copy receives the gradients
all ranks computed for its heads), so the same bookkeeping as above gives exact gradients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- all-to-all primitives


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into world chunks along scatter_dim, send chunk j to rank j, concatenate the
    received chunks (in rank order) along gather_dim."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(f"dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by the sequence-parallel "
                         f"degree {world}; choose parallel.sp dividing the number of heads and tokens")
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` and gather ``gather_dim`` over the group; backward is the reverse."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def seq_to_head_all_to_all(x: torch.Tensor, group, seq_dim: int = 2, head_dim: int = 1) -> torch.Tensor:
    """(.., H, N/sp, ..) sequence-sharded -> (.., H/sp, N, ..) head-sharded; differentiable."""
    return _AllToAll.apply(x, group, head_dim, seq_dim)


def head_to_seq_all_to_all(x: torch.Tensor, group, seq_dim: int = 2, head_dim: int = 1) -> torch.Tensor:
    """Inverse of ``seq_to_head_all_to_all``; differentiable."""
    return _AllToAll.apply(x, group, seq_dim, head_dim)


# ----------------------------------------------------------------------------- shard / gather tokens


def _all_gather_cat(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if x.shape[dim] % world:
            raise ValueError(f"sequence length {x.shape[dim]} (dim {dim}) is not divisible by the sequence-parallel "
                             f"degree {world}; change the resolution / frame count or parallel.sp")
        ctx.group, ctx.dim, ctx.full = group, dim, x.shape[dim]
        return x.chunk(world, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        # the local tokens' gradient only; the other ranks hold the rest (see the module docstring)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        full_shape = list(grad.shape)
        full_shape[ctx.dim] = ctx.full
        out = grad.new_zeros(full_shape)
        n = ctx.full // world
        out.narrow(ctx.dim, rank * n, n).copy_(grad)
        return out, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.n = group, dim, x.shape[dim]
        return _all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.n, ctx.n) * world, None, None


def shard_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous 1/sp slice of ``x`` along ``dim`` (latents, hidden states)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Shard.apply(x, group, dim)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All sp shards concatenated along ``dim`` (in rank order); see the docstring for its backward."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Gather.apply(x, group, dim)


# ----------------------------------------------------------------------------- attention


_sdpa_original = F.scaled_dot_product_attention
_state = threading.local()


def _gather_mask(mask: torch.Tensor, n_local: int, group) -> torch.Tensor:
    """Bring a (.., Nq, Nk) mask given over local tokens to all tokens; a full-length mask passes."""
    world = dist.get_world_size(group)
    if mask.dim() >= 1 and mask.shape[-1] == n_local and n_local * world != n_local:
        mask = _all_gather_cat(mask, -1, group)
    if mask.dim() >= 2 and mask.shape[-2] == n_local:
        mask = _all_gather_cat(mask, -2, group)
    return mask


def resolve_attention_backend(name: Optional[str]):
    """A diffusers backend name -> its ``AttentionBackendName`` after checking that its package is
    installed (ValueError naming what to install otherwise); None / "native" -> None (torch SDPA)."""
    if name in (None, "", "native"):
        return None
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements
    except ImportError as e:  # diffusers too old for the dispatcher
        raise ValueError(f"parallel.attention_backend={name!r} needs diffusers' attention dispatcher ({e})") from None
    try:
        backend = AttentionBackendName(name)
        _check_attention_backend_requirements(backend)
    except (ValueError, RuntimeError, ImportError) as e:
        raise ValueError(f"parallel.attention_backend={name!r} is not available here ({e}); install its package "
                         "(e.g. pip install flash-attn for flash) or use native") from None
    return backend


def _kernel(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """The attention on (B, H, N, d) tensors every rank computes after the exchange: torch SDPA, or the
    block's diffusers backend (called in its (B, N, H, d) layout)."""
    backend = getattr(_state, "backend", None)
    if backend is None:
        return _sdpa_original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              **kwargs)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    _state.inner = True  # a backend that itself calls scaled_dot_product_attention must reach torch's
    try:
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                    dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                    enable_gqa=bool(kwargs.get("enable_gqa", False)), backend=backend)
    finally:
        _state.inner = False
    return out.transpose(1, 2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, attn_mask=None, dropout_p=0.0,
                      is_causal=False, scale=None, n_replicated: int = 0, replicated_first: bool = False,
                      **kwargs) -> torch.Tensor:
    """Exact attention over all tokens for sequence-sharded (B, H, N/sp, d) q, k, v.

    ``attn_mask`` may be given over all tokens or over the local ones (it is gathered); a per-head
    mask is sliced to the local heads. Returns the (B, H, N/sp, d) output. Keys of another length
    than the local queries mean cross-attention to a context every rank holds whole (text
    embeddings): that is computed locally without communication (so a self-attention must not be
    called with a replicated, unsharded key sequence).

    ``n_replicated`` > 0: joint attention over [sharded tokens; replicated tokens] (or [replicated;
    sharded] with ``replicated_first``), e.g. HunyuanVideo / FLUX image tokens sharded along the
    sequence and their text tokens held whole by every rank. The sharded part goes through the
    all-to-all (all tokens, a slice of the heads); the replicated part just takes this rank's head
    slice, and its output heads are all-gathered back (backward: the reduce-scatter). A mask over
    the local tokens (sharded part local) is gathered; one over all tokens passes.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return _kernel(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              **kwargs)
    heads, n_local = q.shape[1], q.shape[2]
    if n_replicated and k.shape[-2] == n_local:
        return _ulysses_joint(q, k, v, group, int(n_replicated), bool(replicated_first), attn_mask=attn_mask,
                              dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    if k.shape[-2] != n_local:
        # cross-attention to a replicated context (e.g. text tokens): queries are independent, no exchange
        return _kernel(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              **kwargs)
    if heads % world or k.shape[1] % world:
        raise ValueError(f"{heads} query heads / {k.shape[1]} key heads are not divisible by the sequence-parallel "
                         f"degree {world}; choose parallel.sp dividing the number of attention heads")
    qh, kh, vh = (seq_to_head_all_to_all(t, group) for t in (q, k, v))
    if attn_mask is not None:
        attn_mask = _gather_mask(attn_mask, n_local, group)
        if attn_mask.dim() == 4 and attn_mask.shape[1] == heads:
            local = heads // world
            attn_mask = attn_mask.narrow(1, dist.get_rank(group) * local, local)
    out = _kernel(qh, kh, vh, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         **kwargs)
    return head_to_seq_all_to_all(out, group)


class _HeadGather(torch.autograd.Function):
    """All-gather along the head dim of a tensor each rank computed a head slice of; backward is the
    adjoint (reduce-scatter: the sum over ranks of their gradients of this rank's heads)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        send = torch.stack(grad.chunk(world, dim=ctx.dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.sum(0), None, None


def _split_tokens(t: torch.Tensor, n_rep: int, rep_first: bool, dim: int):
    """(sharded part, replicated part) of ``t`` along ``dim``."""
    n = t.shape[dim]
    if rep_first:
        return t.narrow(dim, n_rep, n - n_rep), t.narrow(dim, 0, n_rep)
    return t.narrow(dim, 0, n - n_rep), t.narrow(dim, n - n_rep, n_rep)


def _join_tokens(sharded: torch.Tensor, rep: torch.Tensor, rep_first: bool, dim: int) -> torch.Tensor:
    return torch.cat([rep, sharded] if rep_first else [sharded, rep], dim=dim)


def _ulysses_joint(q, k, v, group, n_rep, rep_first, attn_mask=None, **kwargs):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    heads, n_local = q.shape[1], q.shape[2]
    if not 0 <= n_rep <= n_local:
        raise ValueError(f"{n_rep} replicated tokens but the attention sees only {n_local} tokens")
    if heads % world or k.shape[1] % world or v.shape[1] % world:
        raise ValueError(f"{heads} query heads / {k.shape[1]} key heads are not divisible by the sequence-parallel "
                         f"degree {world}; choose parallel.sp dividing the number of attention heads")

    def to_heads(t):
        s, r = _split_tokens(t, n_rep, rep_first, 2)
        h = t.shape[1] // world
        return _join_tokens(seq_to_head_all_to_all(s, group), r.narrow(1, rank * h, h), rep_first, 2)

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    if attn_mask is not None:
        for d in (-1, -2):
            if attn_mask.dim() >= -d and attn_mask.shape[d] == n_local and n_local != n_rep:
                s, r = _split_tokens(attn_mask, n_rep, rep_first, attn_mask.dim() + d)
                attn_mask = _join_tokens(_all_gather_cat(s, d, group), r, rep_first, d)
        if attn_mask.dim() == 4 and attn_mask.shape[1] == heads:
            local = heads // world
            attn_mask = attn_mask.narrow(1, rank * local, local)
    out = _kernel(qh, kh, vh, attn_mask=attn_mask, **kwargs)
    s, r = _split_tokens(out, n_rep, rep_first, 2)
    return _join_tokens(head_to_seq_all_to_all(s, group), _HeadGather.apply(r.contiguous(), group, 1), rep_first, 2)


def _dispatching_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    group = getattr(_state, "group", None)
    if group is None or getattr(_state, "inner", False):
        return _sdpa_original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **kwargs)
    return ulysses_attention(query, key, value, group, attn_mask=attn_mask, dropout_p=dropout_p,
                             is_causal=is_causal, scale=scale, n_replicated=getattr(_state, "n_replicated", 0),
                             replicated_first=getattr(_state, "replicated_first", False), **kwargs)


def _install_dispatch() -> None:
    """Route F.scaled_dot_product_attention through the Ulysses dispatcher (only active inside
    sequence-parallel blocks; elsewhere it calls the original)."""
    if F.scaled_dot_product_attention is not _dispatching_sdpa:
        F.scaled_dot_product_attention = _dispatching_sdpa


# ----------------------------------------------------------------------------- applying to a model


@dataclass
class SPPlan:
    """Which block inputs are sharded along the sequence, and how the last block's output is gathered.

    ``shard_inputs``: inputs of the FIRST block (the hidden states that then flow block to block),
    as positional index or keyword name -> sequence dim; absent inputs are skipped.
    ``shard_every_block``: side inputs given to EVERY block over all tokens -- rotary (cos, sin)
    tables, per-token modulation -- sharded the same way at each block (a tuple has each tensor
    sharded); a tensor whose size along that dim is not the first block's token count is left
    whole (so one plan covers both (B, 6, D) and per-token (B, N, 6, D) modulation). ``gather_output_dim``: the sequence dim along which the last block's output (every
    tensor of a tuple output) is gathered.

    Joint attention over sharded + replicated tokens (HunyuanVideo, FLUX: image tokens sharded, text
    tokens whole on every rank): ``replicated_tokens`` names a block input (positional index or
    keyword -> dim) whose size along that dim is the number of replicated tokens that every
    self-attention call inside the block carries after (``replicated_first``: before) its local
    sharded tokens; that attention exchanges only the sharded part (see ``ulysses_attention``).
    With it, a ``shard_every_block`` side tensor spanning replicated + all sharded tokens (e.g.
    FLUX's rotary tables over [text; image]) has only its sharded part sharded.
    ``gather_output_indices``: which elements of a tuple block output are gathered (None = every
    tensor); the others (e.g. the replicated text stream) pass unchanged.

    Blocks that get the replicated tokens already joined to their sharded ones (FLUX.2's single-stream
    blocks: [text; image] in one sequence, no text input): ``carry_replicated`` keeps, for a block whose
    ``replicated_tokens`` input is absent or None, the count of the block before it (the dual-stream blocks
    that named them); ``output_has_replicated`` gathers only the sharded part of the last block's output
    tensor, the replicated part (identical on every rank) passing unchanged.
    """

    shard_inputs: Dict[Union[int, str], int] = field(default_factory=lambda: {0: 1, "hidden_states": 1})
    shard_every_block: Dict[Union[int, str], int] = field(default_factory=dict)
    gather_output_dim: int = 1
    replicated_tokens: Dict[Union[int, str], int] = field(default_factory=dict)
    replicated_first: bool = False
    gather_output_indices: Optional[Sequence[int]] = None
    carry_replicated: bool = False
    output_has_replicated: bool = False


class SequenceParallel:
    """Hooks that run ``blocks`` (in order) sequence-parallel over ``group``; ``remove()`` undoes them.
    ``attention_backend``: the diffusers backend of the attention inside the blocks (None = torch SDPA)."""

    def __init__(self, blocks: Sequence[nn.Module], group, plan: Optional[SPPlan] = None,
                 attention_backend: Optional[str] = None):
        if not blocks:
            raise ValueError("sequence parallelism needs at least one transformer block")
        self.group, self.plan = group, plan or SPPlan()
        self.backend = resolve_attention_backend(attention_backend)
        self._full_len: Optional[int] = None  # token count at the first block (set each forward)
        self._handles: List = []
        _install_dispatch()
        inner = [getattr(b, "_checkpoint_wrapped_module", b) for b in blocks]
        first, last = inner[0], inner[-1]
        self._handles.append(first.register_forward_pre_hook(self._shard_first, with_kwargs=True))
        self._handles.append(last.register_forward_hook(self._gather_output))
        self._n_rep = 0  # replicated tokens of the block being entered
        for b in inner:
            if self.plan.replicated_tokens:
                self._handles.append(b.register_forward_pre_hook(self._count_replicated, with_kwargs=True))
            if self.plan.shard_every_block:
                self._handles.append(b.register_forward_pre_hook(self._shard_side, with_kwargs=True))
            self._handles.append(b.register_forward_pre_hook(self._enter))
            self._handles.append(b.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module, args):
        _state.group = self.group
        _state.backend = self.backend
        _state.n_replicated = self._n_rep
        _state.replicated_first = self.plan.replicated_first

    def _exit(self, module, args, output):
        _state.group = None
        _state.backend = None
        _state.n_replicated = 0
        return None

    def _count_replicated(self, module, args, kwargs):
        for key, dim in self.plan.replicated_tokens.items():
            v = None
            if isinstance(key, int) and key < len(args):
                v = args[key]
            elif isinstance(key, str) and key in kwargs:
                v = kwargs[key]
            if isinstance(v, torch.Tensor):
                self._n_rep = v.shape[dim]
                return None
        if not self.plan.carry_replicated:
            self._n_rep = 0
        return None

    def _shard_first(self, module, args, kwargs):
        self._full_len = None
        return self._shard(self.plan.shard_inputs, args, kwargs, side=False)

    def _shard_side(self, module, args, kwargs):
        return self._shard(self.plan.shard_every_block, args, kwargs, side=True)

    def _shard(self, which, args, kwargs, side):
        args = list(args)
        for key, dim in which.items():
            if isinstance(key, int) and key < len(args):
                args[key] = self._shard_value(args[key], dim, side)
            elif isinstance(key, str) and key in kwargs:
                kwargs[key] = self._shard_value(kwargs[key], dim, side)
        return tuple(args), kwargs

    def _shard_value(self, v, dim, side):
        if isinstance(v, torch.Tensor):
            if side:  # only tensors spanning all tokens (e.g. not a (B, 6, D) per-sample modulation)
                if v.dim() <= dim or self._full_len is None:
                    return v
                if v.shape[dim] == self._full_len:
                    return shard_sequence(v, self.group, dim)
                if self._n_rep and v.shape[dim] == self._full_len + self._n_rep:  # [sharded; replicated] table
                    s, r = _split_tokens(v, self._n_rep, self.plan.replicated_first, dim)
                    return _join_tokens(shard_sequence(s.contiguous(), self.group, dim), r, self.plan.replicated_first,
                                        dim)
                return v
            self._full_len = v.shape[dim] if self._full_len is None else self._full_len
            return shard_sequence(v, self.group, dim)
        if isinstance(v, (tuple, list)):  # e.g. rotary (cos, sin) tables over all tokens
            return type(v)(self._shard_value(x, dim, side) for x in v)
        return v

    def _gather_output(self, module, args, output):
        dim = self.plan.gather_output_dim
        if isinstance(output, torch.Tensor):
            if self.plan.output_has_replicated and self._n_rep:
                s, r = _split_tokens(output, self._n_rep, self.plan.replicated_first, dim)
                return _join_tokens(gather_sequence(s.contiguous(), self.group, dim), r, self.plan.replicated_first,
                                    dim)
            return gather_sequence(output, self.group, dim)
        if isinstance(output, (tuple, list)):
            which = self.plan.gather_output_indices
            return type(output)(gather_sequence(o, self.group, dim)
                                if isinstance(o, torch.Tensor) and o.dim() > dim and (which is None or i in which)
                                else o for i, o in enumerate(output))
        raise ValueError(f"cannot gather a {type(output).__name__} block output; give the adapter an SPPlan")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
