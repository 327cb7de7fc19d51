"""Apply parallelism to a policy, torchtitan order: activation checkpointing -> sequence parallel ->
FSDP2 ``fully_shard`` per transformer block, then the root module.

Blocks are found generically: the adapter's ``blocks_for_sharding()`` when it returns a list, else
every ``nn.ModuleList`` (or single module) under the names in ``BLOCK_ATTRS`` on the trainable module
(``transformer_blocks`` + ``single_transformer_blocks`` for FLUX / HunyuanVideo, ``blocks`` for Wan and
the toy DiT, ``down_blocks`` / ``mid_block`` / ``up_blocks`` for UNets). No model-name branches.

Only the trainable module (transformer / UNet, LoRA included) is sharded, and the frozen denoisers an
adapter declares (``frozen_denoisers()``: a second expert that the rollout runs, e.g. Wan 2.2's low-noise
transformer), which get the same per-block FSDP2 wrapping and sequence-parallel plan but no gradients or
optimiser state. Other frozen modules -- the VAE, text encoders when loaded, reward models -- keep
``requires_grad=False``, are never given to the optimiser and stay as full replicas on every rank's device
(run under ``no_grad``: their memory is the weights only). With LoRA the frozen base weights inside the
blocks are sharded together with the trainable LoRA weights (FSDP2 shards per parameter, so mixed
requires_grad is fine); only the LoRA weights get gradients and optimiser state.

Mixed precision: on GPU ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` by default: the
sharded parameters (and AdamW state) stay in their stored dtype (fp32 master weights when the model
is loaded in fp32), compute runs in bf16, gradients are reduced in fp32. On CPU everything is fp32.

Outputs of a sharded module are fresh tensors (``fresh_outputs``): FSDP2 registers its pre-backward hook (the
all-gather before the module's backward) on each output, and an in-place op on an output that is a view of
another tensor would silently drop it ("returned a view tensor" warning). Views came from: the toy DiT's
un-patchify at patch size 1 (a permute + reshape that needs no copy), FLUX's and HunyuanVideo's single-stream
blocks (the joint sequence split back into text and image parts by slicing), and the root modules of FLUX,
HunyuanVideo, Wan, SD3 and Qwen-Image (their last ``nn.Linear`` on a 3-D input, or an un-patchify reshape, returns a
view of the flattened result). A forward hook placed before FSDP2's clones exactly those outputs (a copy: the
values, strides and gradients are unchanged); ``tests/distributed/test_fsdp_views.py`` turns the warning into an error
for the toy and every registered family and checks the 2-rank gradients against one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn


#: the prefix torch's activation-checkpoint wrapper puts into parameter names
AC_PREFIX = "_checkpoint_wrapped_module."


def stable_param_name(name: str) -> str:
    """A parameter's name without activation-checkpoint wrapper prefixes (the same with and without AC)."""
    return name.replace(AC_PREFIX, "")


def reshard_gathered(module: nn.Module) -> None:
    """Free FSDP2's gathered copies under ``module`` so that the next forward gathers the (just written) shards;
    nothing for an unsharded module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()

from .parallel_dims import ParallelDims

BLOCK_ATTRS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers", "down_blocks", "mid_block",
               "up_blocks")

from ..utils.dtypes import parse_dtype  # noqa: E402,F401


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it (tensors, tuples / named tuples, lists, dicts, diffusers'
    output classes, which are dicts whose items are set in place)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _map_tensors(obj[k], fn)
        return obj
    return obj


def fresh_outputs(module: nn.Module, args, output):
    """Forward hook: every output that requires grad and is a view (``_base`` set) replaced by a copy of it."""
    return _map_tensors(output, lambda t: t.clone() if t.requires_grad and t._base is not None else t)


def find_blocks(module: nn.Module, attrs: Sequence[str] = BLOCK_ATTRS) -> List[nn.Module]:
    """The repeated blocks of ``module`` in forward order (see BLOCK_ATTRS)."""
    blocks: List[nn.Module] = []
    for name in attrs:
        child = getattr(module, name, None)
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks.extend(child)
        elif isinstance(child, nn.Module):
            blocks.append(child)
    return blocks


def adapter_blocks(adapter) -> List[nn.Module]:
    hook = getattr(adapter, "blocks_for_sharding", None)
    blocks = hook() if callable(hook) else None
    if blocks is None:
        blocks = find_blocks(adapter.trainable_module())
    blocks = list(blocks)
    if not blocks:
        raise ValueError(
            f"found no transformer blocks in {type(adapter.trainable_module()).__name__} (looked for attributes "
            f"{list(BLOCK_ATTRS)}); implement blocks_for_sharding() on {type(adapter).__name__}"
        )
    return blocks


def set_attention_backend(module: nn.Module, backend: str, sp: int = 1) -> Optional[str]:
    """``parallel.attention_backend``: the kernel diffusers' attention dispatcher calls in every attention
    layer (``native`` = torch's scaled_dot_product_attention, ``flash`` = FlashAttention 2, ...).

    sp = 1: set on the module (diffusers also makes it the process-wide default, so every other diffusers
    model in the process - reference policy, VAE, diffusers-based rewards - attends with it too); returns
    None. sp > 1: the module keeps the native backend, whose scaled_dot_product_attention call the Ulysses
    dispatch intercepts; the backend is checked and returned, for ``SequenceParallel`` to run the attention
    after the all-to-all with it (sequence_parallel.py)."""
    if backend == "native":
        return None
    if sp > 1:
        from .sequence_parallel import resolve_attention_backend

        resolve_attention_backend(backend)
        return backend
    setter = getattr(module, "set_attention_backend", None)
    if setter is None:
        raise ValueError(f"parallel.attention_backend={backend!r}: {type(module).__name__} has no diffusers attention "
                         "dispatcher; use native")
    try:
        setter(backend)
    except (ValueError, RuntimeError, ImportError) as e:
        raise ValueError(f"parallel.attention_backend={backend!r} is not available here ({e}); install its package "
                         "(e.g. pip install flash-attn for flash) or use native") from None
    return None


def checkpointed_indices(num_blocks: int, fraction: float) -> List[int]:
    """round(fraction * num_blocks) block indices, spread evenly (fraction 1 = every block)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"parallel.activation_checkpointing must be a fraction in [0, 1], got {fraction}")
    return [i for i in range(num_blocks) if int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9)]


def _replace_child(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)  # ModuleList / Sequential accept str indices via setattr
                return
    raise AssertionError("block not found under the trainable module")


def apply_activation_checkpointing(root: nn.Module, blocks: List[nn.Module], fraction: float) -> List[nn.Module]:
    """Wrap the chosen blocks in non-reentrant checkpoint wrappers; returns the new block list."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    chosen = set(checkpointed_indices(len(blocks), fraction))
    out = []
    for i, b in enumerate(blocks):
        if i in chosen:
            w = checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            _replace_child(root, b, w)
            b = w
        out.append(b)
    return out


@dataclass
class ParallelizeResult:
    blocks: List[nn.Module]
    num_checkpointed: int = 0
    sequence_parallel: Optional[object] = None
    fsdp: bool = False
    #: the ``SequenceParallel`` hooks of each frozen denoiser (``adapter.frozen_denoisers()``)
    frozen_sequence_parallel: List[object] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def parallelize(adapter, dims: ParallelDims, pcfg=None, device: Optional[torch.device] = None) -> ParallelizeResult:
    """AC -> SP -> FSDP2 on ``adapter.trainable_module()`` in place; returns what was applied.

    ``pcfg`` is a ``config.ParallelConfig`` (activation_checkpointing fraction, param_dtype,
    reduce_dtype, cpu_offload, reshard_after_forward); None = defaults.
    """
    from .sequence_parallel import SPPlan, SequenceParallel

    frac = float(getattr(pcfg, "activation_checkpointing", 0.0) or 0.0)
    module = adapter.trainable_module()
    sp_backend = set_attention_backend(module, str(getattr(pcfg, "attention_backend", "native") or "native"),
                                       dims.sp)
    blocks = adapter_blocks(adapter)
    res = ParallelizeResult(blocks=blocks)
    if frac > 0:
        blocks = apply_activation_checkpointing(module, blocks, frac)
        res.blocks, res.num_checkpointed = blocks, len(checkpointed_indices(len(blocks), frac))
    frozen_hook = getattr(adapter, "frozen_denoisers", None)
    frozen = [(m, find_blocks(m)) for m in (frozen_hook() if callable(frozen_hook) else [])]
    for m, mblocks in frozen:
        if not mblocks:
            raise ValueError(f"found no transformer blocks in the frozen denoiser {type(m).__name__} (looked for "
                             f"attributes {list(BLOCK_ATTRS)})")
        set_attention_backend(m, str(getattr(pcfg, "attention_backend", "native") or "native"), dims.sp)
    if dims.sp_enabled:
        plan_hook = getattr(adapter, "sequence_parallel_plan", None)
        plan = plan_hook() if callable(plan_hook) else None
        res.sequence_parallel = SequenceParallel(blocks, dims.group("sp"), plan or SPPlan(),
                                                 attention_backend=sp_backend)
        res.frozen_sequence_parallel = [SequenceParallel(mblocks, dims.group("sp"), plan or SPPlan(),
                                                         attention_backend=sp_backend) for _, mblocks in frozen]
    if dims.mesh is None:  # one process without parallel.fsdp_one_process: plain module
        return res
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if device is None:
        device = next(module.parameters()).device
    kwargs = {"mesh": dims.fsdp_mesh(), "reshard_after_forward": bool(getattr(pcfg, "reshard_after_forward", True))}
    param_dtype = parse_dtype(getattr(pcfg, "param_dtype", "bf16"))
    reduce_dtype = parse_dtype(getattr(pcfg, "reduce_dtype", "fp32"))
    if torch.device(device).type == "cuda" and (param_dtype != torch.float32 or reduce_dtype != torch.float32):
        # fp32 outputs: the SDE step and its log-prob run in fp32 on the bf16 model's prediction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                   output_dtype=torch.float32)
    else:
        res.notes.append("mixed precision off (CPU or fp32 requested)")
    if getattr(pcfg, "cpu_offload", False):
        kwargs["offload_policy"] = CPUOffloadPolicy()
        adapter.set_compute_device(device)  # the parameters now live on the CPU; compute stays on ``device``
    for m in list(blocks) + [module]:  # before FSDP2's own post-forward hook (prepend): see fresh_outputs
        m.register_forward_hook(fresh_outputs, prepend=True)
    for b in blocks:
        fully_shard(b, **kwargs)
    fully_shard(module, **kwargs)
    for m, mblocks in frozen:  # no gradients: FSDP2 only all-gathers their weights for each forward
        for b in mblocks:
            fully_shard(b, **kwargs)
        fully_shard(m, **kwargs)
    res.fsdp = True
    return res
