"""Plan a run at real scale on a CPU: per-GPU memory, FLOPs and time of a recipe on N GPUs, and a verdict.

    python -m fastvideo_grpo.cli.plan --config configs/flux_hps.yaml --gpus 8 [--gpu-mem-gib 80] [--json]
    make plan CONFIG=configs/flux_hps.yaml GPUS=8

The model comes from an architecture file in ``configs/arch/`` (the published diffusers configs, with
their sources; chosen by the recipe's ``model.kwargs.model_path`` name, or ``--arch``). It is built at its
real size on the ``meta`` device through the recipe's own adapter (the same code that trains it, so real
dimensions, latent packing, rotary tables and the sequence-parallel head split are exercised), without
weights. Then, under PyTorch's fake tensors (``FakeTensorMode``: shapes and dtypes, no data), a copy with
ONE block of each kind runs the recipe's real steps -- the rollout forward at the rollout batch, one
training micro-step (forward + backward) at the micro-batch, the VAE decode -- and is measured:

* activations kept for backward: every tensor autograd saves, counted once per storage, attributed to
  the block that saved it (checkpointed blocks keep only their inputs);
* peak live memory of the no-grad rollout forward and of the decode (``torch.distributed._tools``'
  ``MemTracker``);
* FLOPs (``torch.utils.flop_counter``; attention counted in closed form, 4 * B * heads * Nq * Nk * d).

Full-model numbers are the measured root plus each block kind times its count; per-GPU numbers divide by
the sequence-parallel degree where Ulysses splits the work. Static memory is closed form: FSDP2 shards of
the parameters, gradients and AdamW state over ``dp_shard * sp`` ranks, the shards of frozen denoisers (a
second expert, ``adapter.frozen_denoisers()``), the all-gathered bf16 blocks in flight, the frozen VAE and
reward models. Time = FLOPs / (peak bf16 FLOP/s x MFU); communication and the
reward models' compute are not modelled. See docs/recipes.md for the tables and what was validated.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.tokens import attention_shape, image_tokens  # noqa: F401  (attention_shape: part of this module's face)

ROOT = Path(__file__).resolve().parents[2]
ARCH_DIR = ROOT / "configs" / "arch"
GIB = 2 ** 30
#: bf16 dense matrix-product throughput measured on this workplace's H100 and H200 (8192^3, KINDS notes:
#: 769-798 TFLOP/s on both); HBM per card
GPUS = {"H100": {"tflops": 790.0, "mem_gib": 80.0}, "H200": {"tflops": 790.0, "mem_gib": 141.0}}
#: model FLOPs utilisation assumed for the projection (override with --mfu). Measured by bench/gpu_check.py
#: on an H200: see docs/recipes.md ("Validation") for the value and the run it comes from.
DEFAULT_MFU = 0.28
#: CUDA context, allocator fragmentation and NCCL buffers: kept free on every GPU
RESERVE_GIB = 6.0
#: reward models (approximate parameter counts, bytes per parameter at their default dtype)
REWARD_PARAMS = {"hps": (986e6, 4), "clip_score": (986e6, 4), "pickscore": (986e6, 4), "aesthetic": (428e6, 4),
                 "video_align": (2.2e9, 2), "hpsv3": (8.29e9, 2)}


def _reward_bytes(rc) -> float:
    """Bytes of a reward's model: the wrapped reward's for a wrapper (binary, win_rate: REWARDS.resolve_wrapped)."""
    from ..rewards import REWARDS

    name = REWARDS.resolve_wrapped(rc.name, rc.kwargs)[0] if rc.name in REWARDS.names() else rc.name
    params, nbytes = REWARD_PARAMS.get(name, (0, 0))
    return params * nbytes


# ----------------------------------------------------------------------------- architecture files


def load_arch(path) -> Dict:
    arch = json.loads(Path(path).read_text())
    for key in ("name", "transformer", "vae", "blocks"):
        if key not in arch:
            raise ValueError(f"architecture file {path} lacks {key!r}")
    arch["_path"] = str(path)
    return arch



def find_arch(cfg) -> Path:
    """The architecture file whose repository name matches the recipe's ``model.kwargs.model_path``."""
    name = Path(str(cfg.model.kwargs.get("model_path", ""))).name.lower()
    for f in sorted(ARCH_DIR.glob("*.json")):
        repo = json.loads(f.read_text()).get("repo", "")
        if name and repo.split("/")[-1].lower() == name:
            return f
    raise ValueError(f"no architecture file in {ARCH_DIR} for model_path {cfg.model.kwargs.get('model_path')!r}; "
                     f"pass --arch configs/arch/<name>.json")


def reduced(arch: Dict) -> Dict:
    """The same architecture with one block of each kind."""
    small = copy.deepcopy(arch)
    for key in arch["blocks"]:
        small["transformer"]["config"][key] = 1
    return small


def build_adapter(cfg, arch: Dict, dtype: str = "float32", vae_dtype: Optional[torch.dtype] = None,
                  lora: bool = True):
    """The recipe's adapter around the architecture's modules, built on the current default device (and
    default dtype; ``vae_dtype``: the VAE's, when it differs). ``lora=False`` leaves the recipe's LoRA layers out
    (peft cannot place them under fake tensors; their activations and FLOPs are a few percent of the layers they
    adapt)."""
    from ..models import ADAPTERS
    from ..models.diffusers_base import component_from_config

    model = component_from_config(arch["transformer"]["class"], arch["transformer"]["config"])
    prev = torch.get_default_dtype()
    if vae_dtype is not None:
        torch.set_default_dtype(vae_dtype)
    try:
        vae = component_from_config(arch["vae"]["class"], arch["vae"]["config"])
    finally:
        torch.set_default_dtype(prev)
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k not in ("model_path", "device", "dtype")
              and (lora or not k.startswith("lora_"))}
    return ADAPTERS.build(cfg.model.name, model_path=None, components=(model, vae), dtype=dtype, **kwargs)


# ----------------------------------------------------------------------------- measuring under fake tensors


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class SavedTensors:
    """Bytes autograd saves for backward, counted once per storage, by block (None = outside blocks);
    parameters (and views of them) are excluded."""

    def __init__(self, module: nn.Module, blocks: Dict[str, List[nn.Module]]):
        self.param_storages = {p.untyped_storage()._cdata for p in module.parameters()}
        self.seen: Dict[int, Optional[str]] = {}
        self.by_block: Dict[Optional[str], int] = {}
        self.current: List[Optional[str]] = [None]
        self.handles = []
        self.inputs: Dict[str, int] = {}
        for kind, mods in blocks.items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(self._enter(kind), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._leave, with_kwargs=True))

    def _enter(self, kind):
        def hook(mod, args, kwargs):
            self.current.append(kind)
            flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            self.inputs[kind] = sum(t.numel() * t.element_size() for t in flat if t.is_floating_point())
        return hook

    def _leave(self, mod, args, kwargs, out):
        self.current.pop()

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in self.param_storages and key not in self.seen:
            kind = self.current[-1]
            self.seen[key] = kind
            self.by_block[kind] = self.by_block.get(kind, 0) + _bytes(t)
        return t

    def close(self):
        for h in self.handles:
            h.remove()


def _attention_flops(adapter, batch: int) -> float:
    """4 * B * heads * N^2 * head_dim per attention layer (QK^T and PV), summed over the full model."""
    n = adapter_tokens(adapter)
    heads, hd, layers = attention_shape(adapter)
    if not (heads and hd and layers):
        return 0.0
    return 4.0 * batch * heads * n * n * hd * layers


def adapter_tokens(adapter) -> int:
    """Tokens one sample puts through the transformer's attention (image/video tokens + text tokens); see
    models/tokens.py for an adapter whose latent is not an image or video grid (``attention_tokens``)."""
    return image_tokens(adapter) + text_len(adapter)


def text_len(adapter) -> int:
    return int(getattr(adapter, "plan_text_len", 0) or 0)


def fake_cond(adapter, batch: int, seq: int) -> Dict[str, torch.Tensor]:
    cond = {}
    for key, trailing in adapter.cond_spec().items():
        shape = (batch,) + tuple(seq if d is None else d for d in trailing)
        cond[key] = torch.ones(shape, dtype=torch.int64) if key.endswith("attention_mask") else torch.zeros(shape)
    return cond


@dataclass
class Measured:
    """Per-sample-batch measurements of the reduced model (one block per kind)."""

    train_saved_root: float = 0.0  # bytes saved outside blocks at the micro-batch
    train_saved_block: Dict[str, float] = field(default_factory=dict)  # per block of each kind
    block_input: Dict[str, float] = field(default_factory=dict)  # bytes of one block's inputs
    rollout_peak: float = 0.0  # live bytes (activations) of the no-grad forward at the rollout batch
    decode_peak: float = 0.0  # live bytes of one VAE decode at the decode batch
    flops_fwd_root: float = 0.0
    flops_fwd_block: Dict[str, float] = field(default_factory=dict)
    decode_flops: float = 0.0
    seconds: float = 0.0
    batches: Tuple[int, int, int] = (1, 1, 1)  # (micro, rollout, decode) batch the numbers were measured at


def measure(cfg, arch: Dict, micro_batch: int, rollout_batch: int, decode_batch: int, seq: int) -> Measured:
    """Run the reduced model's real steps under fake tensors (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils.flop_counter import FlopCounterMode

    from .repeat_memo import RepeatedCallMemo, vae_children
    from .vae_blend import vectorise_blends

    t0 = time.perf_counter()
    small = reduced(arch)
    out = Measured()
    # LoRA: the graph is measured without the adapters (peft cannot add them to fake parameters): an upper bound of
    # the activations, since LoRA saves the inputs the full fine-tuning graph saves for its targeted layers and none
    # for the frozen weights' gradients; the trained parameters (static memory) are counted on the real model
    cfg = copy.deepcopy(cfg)
    cfg.model.kwargs = {k: v for k, v in cfg.model.kwargs.items() if not k.startswith("lora_")}
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the compute dtype of FSDP2's mixed precision
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            # the transformer computes in bf16 (FSDP2 mixed precision); the VAE decodes in the stored dtype
            adapter = build_adapter(cfg, small, dtype="bfloat16", vae_dtype=_stored_dtype(cfg), lora=False)
            adapter.plan_text_len = seq
            vectorise_blends(adapter.vae)  # one op per tile overlap instead of one per row (same result)
            model = adapter.model
            blocks = {k: list(getattr(model, attr)) for k, attr in small["blocks"].items()}
            with unset_fake_temporarily():  # the schedule's small tables are real tensors
                sched = adapter.make_schedule(2, 0.3)

            def inputs(b):  # (a CFG adapter runs both branches itself: 2b rows through the transformer)
                z = torch.zeros((b,) + tuple(adapter.latent_shape()), dtype=torch.float32)
                return z, sched.model_timestep(0, z), fake_cond(adapter, b, seq)

            # training micro-step: saved activations by block and FLOPs
            z, t, cond = inputs(micro_batch)
            saved = SavedTensors(model, blocks)
            with FlopCounterMode(display=False) as fc:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
                    u = adapter.predict(z, t, cond)
                fwd = fc.get_total_flops()
                u.float().square().mean().backward()
            saved.close()
            per_block_fwd = _block_flops(adapter, blocks, micro_batch, seq)
            out.train_saved_root = saved.by_block.get(None, 0)
            out.train_saved_block = {k: saved.by_block.get(k, 0) for k in blocks}
            out.block_input = dict(saved.inputs)
            out.flops_fwd_block = {k: v / micro_batch for k, v in per_block_fwd.items()}
            out.flops_fwd_root = max(0.0, fwd - sum(per_block_fwd.values())) / micro_batch
            model.zero_grad(set_to_none=True)
            # rollout forward (no grad) at the rollout batch: peak live activations
            z, t, cond = inputs(rollout_batch)
            with torch.no_grad():
                with LivePeak() as lp:
                    adapter.predict(z, t, cond)
                out.rollout_peak = lp.peak
            # VAE decode at the decode batch
            zd = torch.zeros((decode_batch,) + tuple(adapter.latent_shape()), dtype=torch.float32)
            with torch.no_grad():
                with FlopCounterMode(display=False) as fc2, LivePeak() as lp:
                    with RepeatedCallMemo(vae_children(getattr(adapter, "vae", None)), fc2, lp):
                        adapter.decode(zd)  # a tile or latent frame of a seen shape is replayed, not re-run
                out.decode_peak = lp.peak
                out.decode_flops = fc2.get_total_flops() / decode_batch
    finally:
        torch.set_default_dtype(prev)
    out.seconds = time.perf_counter() - t0
    out.batches = (micro_batch, rollout_batch, decode_batch)
    return out


class LivePeak(TorchDispatchMode):
    """Peak bytes of the storages created inside the context and still alive (the activations and
    temporaries of a forward), tracked per storage with weak references: it works under fake tensors."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        if key in self._seen:
            self._seen.discard(key)
            self.live -= n


def _stored_dtype(cfg) -> torch.dtype:
    from ..utils.dtypes import parse_dtype

    return parse_dtype(cfg.model.kwargs.get("dtype", "float32"))


def _block_flops(adapter, blocks, batch, seq) -> Dict[str, float]:
    """Forward FLOPs of one block of each kind, counted by running it alone inside a full forward."""
    from torch.utils.flop_counter import FlopCounterMode

    counts: Dict[str, float] = {}
    handles = []
    state = {}

    def pre(kind):
        def h(mod, args, kwargs):
            state["fc"] = FlopCounterMode(display=False)
            state["fc"].__enter__()
        return h

    def post(kind):
        def h(mod, args, kwargs, out):
            fc = state.pop("fc")
            fc.__exit__(None, None, None)
            counts[kind] = counts.get(kind, 0.0) + fc.get_total_flops()
        return h

    for kind, mods in blocks.items():
        for m in mods:
            handles.append(m.register_forward_pre_hook(pre(kind), with_kwargs=True))
            handles.append(m.register_forward_hook(post(kind), with_kwargs=True))
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        sched = adapter.make_schedule(2, 0.3)
    z = torch.zeros((batch,) + tuple(adapter.latent_shape()), dtype=torch.float32)
    try:
        with torch.no_grad():
            adapter.predict(z, sched.model_timestep(0, z), fake_cond(adapter, batch, seq))
    finally:
        for h in handles:
            h.remove()
    return counts


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    recipe: str
    arch: str
    gpus: int
    gpu_mem_gib: float
    params: Dict[str, float]
    memory_gib: Dict[str, float]
    flops: Dict[str, float]
    seconds: Dict[str, float]
    fits: bool
    suggestions: List[str]
    settings: Dict
    measured_in_s: float
    _measured: Optional[Measured] = None
    #: the run's throughput/* metrics as predicted (per GPU): frames per second and MFU by GPU kind
    throughput: Dict = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def parameter_counts(adapter, arch: Dict) -> Dict[str, float]:
    model = adapter.trainable_module()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = {}
    for key, attr in arch["blocks"].items():
        mods = list(getattr(model, attr))
        blocks[attr] = {"count": len(mods), "params_each": sum(p.numel() for p in mods[0].parameters())}
    in_blocks = sum(b["count"] * b["params_each"] for b in blocks.values())
    frozen = sum(p.numel() for m in adapter.frozen_denoisers() for p in m.parameters())
    return {"total": total, "trainable": trainable, "root": total - in_blocks, "blocks": blocks,
            "frozen_denoisers": frozen, "vae": sum(p.numel() for p in adapter.vae.parameters()),
            "largest_block": max([b["params_each"] for b in blocks.values()] or [total])}


def plan(cfg, gpus: int, gpu_mem_gib: float = 80.0, arch_path=None, mfu: float = DEFAULT_MFU,
         measured: Optional[Measured] = None, recipe: str = "", arch: Optional[Dict] = None,
         text_len: Optional[int] = None) -> Plan:
    """The per-GPU plan of ``cfg`` on ``gpus`` GPUs (see the module docstring). ``measured``: reuse a
    measurement (activations scale linearly with the batch); ``arch``: an architecture dict instead of a file."""
    from ..distributed.parallel_dims import parallel_dims_from_config
    from ..utils.dtypes import parse_dtype
    if arch is None:
        arch = load_arch(arch_path) if arch_path else load_arch(find_arch(cfg))
    dims = parallel_dims_from_config(cfg.parallel, gpus)
    with torch.device("meta"):
        adapter = build_adapter(cfg, arch, dtype=str(cfg.model.kwargs.get("dtype", "float32")))
    _check_sp(adapter, dims.sp)
    params = parameter_counts(adapter, arch)
    g, s = cfg.grpo, cfg.sampling
    cfg_mult = 2 if getattr(adapter, "uses_cfg", False) else 1
    rank_batch = g.prompts_per_iteration * g.group_size
    micro = g.micro_batch_size or rank_batch
    seq = int(text_len) if text_len else _text_len(cfg, adapter)
    decode_batch = min(rank_batch, int(s.decode_batch_size or rank_batch))
    roll_batch = min(rank_batch, int(s.rollout_batch_size or rank_batch))
    if measured is None:
        measured = measure(cfg, arch, micro, roll_batch, decode_batch, seq)
    m = measured
    # activations are linear in the batch: a measurement at other batch sizes is rescaled
    s_mb, s_roll, s_dec = micro / m.batches[0], roll_batch / m.batches[1], decode_batch / m.batches[2]
    sp, fsdp = dims.sp, dims.fsdp
    store = parse_dtype(cfg.model.kwargs.get("dtype", "float32")).itemsize
    P, Pt = params["total"], params["trainable"]
    # ---- static: shards of params, grads, optimiser state; in-flight unsharded blocks; frozen models
    mem = {
        "params_shard": P * store / fsdp,
        # frozen denoisers the rollout runs besides the trained one (a second expert): sharded like it, no grads
        "frozen_denoisers_shard": params["frozen_denoisers"] * store / fsdp,
        "grads_shard": Pt * 4 / fsdp,
        "optimizer_shard": Pt * 8 / fsdp,
        # bf16 copies gathered by FSDP2: the block computing and the one prefetched, plus the root's own
        # weights; a model without repeated blocks (a UNet) is gathered whole
        "unsharded_blocks": ((2 * params["largest_block"] + params["root"]) * 2 if params["blocks"]
                             else P * 2),
        "vae": params["vae"] * store,
        "reward_models": sum(_reward_bytes(rc) for rc in cfg.rewards),
    }
    # ---- training micro-step activations (per GPU: Ulysses splits every token-wise tensor over sp)
    frac = float(cfg.parallel.activation_checkpointing or 0.0)
    act = m.train_saved_root
    recompute = 0.0
    for key, attr in arch["blocks"].items():
        n = params["blocks"][attr]["count"]
        n_ck = round(frac * n)
        act += (n - n_ck) * m.train_saved_block.get(key, 0) + n_ck * m.block_input.get(key, 0)
        if n_ck:
            recompute = max(recompute, m.train_saved_block.get(key, 0))
    out_grad = 2 * max(m.block_input.values() or [0])
    mem["train_activations"] = s_mb * (act + recompute + out_grad) / sp
    mem["rollout_activations"] = s_roll * m.rollout_peak / sp
    latent = math.prod(adapter.latent_shape()) * 4
    passes = passes_per_iteration(cfg)
    K = passes["trained_steps"]
    from ..algorithms.objectives import build_objective

    # the kept transitions (z_t, z_s and, for objectives that compare step means, the rollout's mean), the final
    # latents, and the reference / old-policy outputs of every trained step (the objective evaluates them before
    # the first optimiser step)
    per_step = 3 if build_objective(cfg).needs_step_means else 2
    extra_outputs = passes["forward_update"] // max(1, passes["backward"]) - 1
    mem["trajectory"] = rank_batch * (per_step * K * latent + latent) + passes["backward"] * extra_outputs * latent
    # copies of the trainable weights: the KL reference of a full fine-tuning run, DiffusionNFT's old policy
    lora = bool(int(cfg.model.kwargs.get("lora_rank", 0) or 0))
    mem["weight_copies"] = _weight_copies(cfg, lora) * Pt * store / fsdp
    mem["decode_activations"] = s_dec * m.decode_peak
    static = (mem["params_shard"] + mem["frozen_denoisers_shard"] + mem["grads_shard"] + mem["optimizer_shard"]
              + mem["weight_copies"] + mem["vae"] + mem["reward_models"])
    phases = {
        "rollout": static + mem["unsharded_blocks"] + mem["trajectory"] + mem["rollout_activations"],
        "decode": static + mem["trajectory"] + mem["decode_activations"],
        "train": static + mem["unsharded_blocks"] * 1.5 + mem["trajectory"] + mem["train_activations"],
    }
    mem.update({f"peak_{k}": v for k, v in phases.items()})
    mem["peak"] = max(phases.values())
    mem_gib = {k: v / GIB for k, v in mem.items()}
    # ---- FLOPs per iteration per GPU
    fwd_full = m.flops_fwd_root + sum(params["blocks"][attr]["count"] * m.flops_fwd_block.get(key, 0)
                                      for key, attr in arch["blocks"].items())
    # attention in closed form: FlopCounterMode does not count the CPU attention kernel used under fake tensors
    # (it counts the CUDA flash / efficient kernels; the CPU flash kernel is not registered in torch 2.13)
    attn = _attention_flops(adapter, cfg_mult)
    fwd_sample = (fwd_full + attn) / sp  # per prompt-sample, both CFG branches included
    recompute_flops = frac * fwd_sample
    no_grad_update = passes["forward_update"] - passes["backward"]  # reference / old-policy forwards
    flops = {
        "rollout": passes["forward_rollout"] * fwd_sample,
        "train": passes["backward"] * (3 * fwd_sample + recompute_flops) + no_grad_update * fwd_sample,
        "decode": rank_batch * m.decode_flops,
    }
    flops["total"] = sum(flops.values())
    seconds = {gpu: flops["total"] / (spec["tflops"] * 1e12 * mfu) for gpu, spec in GPUS.items()}
    budget = (gpu_mem_gib - RESERVE_GIB) * GIB
    fits = mem["peak"] <= budget
    suggestions = [] if fits else suggest(cfg, mem, params, budget, dims, adapter, arch, m, gpus)
    settings = {"dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate, "sp": sp, "fsdp_degree": fsdp,
                "rank_batch": rank_batch, "micro_batch": micro, "cfg": cfg_mult == 2, "trained_steps_K": K,
                "sampling_steps": s.num_steps, "text_len": seq, "tokens_per_sample": adapter_tokens(adapter),
                "activation_checkpointing": frac, "mfu": mfu, "passes": passes, "reserve_gib": RESERVE_GIB,
                "lora_rank": int(cfg.model.kwargs.get("lora_rank", 0) or 0), "arch_file": arch.get("_path", "")}
    throughput = predicted_throughput(adapter, P, passes, seq, cfg_mult, sp, rank_batch, flops["total"], seconds)
    return Plan(recipe, arch["name"], gpus, gpu_mem_gib, {k: v for k, v in params.items()}, mem_gib, flops, seconds,
                fits, suggestions, settings, m.seconds, m, throughput)


def predicted_throughput(adapter, params: float, passes: Dict[str, int], text_tokens: int, branches: int, sp: int,
                         rank_batch: int, flops_total: float, seconds: Dict[str, float]) -> Dict:
    """What the run's ``throughput/*`` metrics should read (training/throughput.py) at the projected seconds per
    iteration: frames per GPU per second, and the MFU in verl-omni's count (6 N S per trained forward + backward,
    2 N S per forward, attention over the joint sequence; the peak is the datasheet's), next to the planner's own
    op-by-op FLOPs at the same seconds."""
    from ..training.throughput import PEAK_TFLOPS, ModelShape, model_flops

    heads, hd, layers = attention_shape(adapter)
    shape = ModelShape(int(params), image_tokens(adapter), int(text_tokens), heads, hd, layers, branches)
    verl = model_flops(shape, passes["forward_rollout"], passes["forward_update"], passes["backward"])["total"] / sp
    frames = int(getattr(adapter, "num_frames", 1) or 1)  # the video families' frames per sample; images: 1
    out = {"tokens_per_sample": shape.tokens, "frames_per_sample": frames, "model_flops_per_gpu_verl": verl,
           "verl_over_planner_flops": verl / flops_total if flops_total else None}
    for gpu, secs in seconds.items():
        out[gpu] = {"frames_per_gpu_s": rank_batch * frames / (secs * sp), "mfu": verl / (secs * PEAK_TFLOPS[gpu] * 1e12),
                    "peak_tflops": PEAK_TFLOPS[gpu]}
    return out


def passes_per_iteration(cfg) -> Dict[str, int]:
    """Model passes per rank and iteration, per sample, as the trainer counts them (fastvideo_grpo/algorithms/passes.py):
    ``forward_rollout`` (the sampler's forwards per group: every sampling step of every sample, or fewer for a
    tree sharing prefixes; MixGRPO-Flash's compressed grid averaged over the run), ``forward_update`` (each
    trained transition once per epoch, plus the objective's ``extra_forwards_per_trained_step`` once per update:
    the reference model of the KL term, DiffusionNFT's old-policy velocity, DGPO's reference and old errors) and
    ``backward`` (once per epoch). ``trained_steps`` is K, the kept slots per sample: int(tau x the candidate steps) -- the
    trainable window without the last step (``grpo.trainable_window``), or the MixGRPO / Flow-GRPO-Fast window's
    size -- unless the sampler keeps its own; the transitions trained per group are the sampler's count (a tree
    trains a shared transition once)."""
    from ..algorithms.objectives import build_objective
    from ..algorithms.samplers import build_sampler
    from ..algorithms import sde_window
    from ..algorithms.grpo import num_train_steps, trainable_window

    g, s = cfg.grpo, cfg.sampling
    lo, hi = trainable_window(s.num_steps, g.timestep_window, g.train_last_step)
    objective, sampler = build_objective(cfg), build_sampler(cfg)
    K = sampler.kept_per_sample(s.num_steps, (lo, hi),
                                num_train_steps(g.sde_window.size if g.sde_window.mode != "off" else hi - lo, g.tau))
    if g.best_of_n_k:
        trained = g.prompts_per_iteration * 2 * g.best_of_n_k * K
    else:
        trained = g.prompts_per_iteration * sampler.trained_per_group(s.num_steps, g.group_size, (lo, hi), K)
    E = g.num_epochs
    # MixGRPO-Flash's compressed post-window grid: fewer steps, varying with the window (averaged over the run)
    steps = sde_window.mean_rollout_steps(cfg)
    rollout = g.prompts_per_iteration * sampler.forwards_per_group(s.num_steps, g.group_size) * steps / s.num_steps
    return {"trained_steps": K, "forward_rollout": round(rollout),
            "forward_update": trained * (E + objective.extra_forwards_per_trained_step), "backward": trained * E}


def _weight_copies(cfg, lora: bool) -> int:
    from ..algorithms.objectives import build_objective

    return build_objective(cfg).weight_copies(lora)


def _text_len(cfg, adapter=None) -> int:
    """Text tokens per sample: the recipe's max_sequence_length, else the length the family's prompt encoding
    stores (``plan_text_len``, declared in its model file); ValueError for a model that declares none."""
    from ..models import encoding_for

    kw = cfg.model.kwargs
    if kw.get("max_sequence_length"):
        return int(kw["max_sequence_length"])
    try:
        n = encoding_for(cfg.model.name).plan_text_len
    except ValueError as e:
        raise ValueError(f"the planner needs the text length of model {cfg.model.name!r}: {e}; or pass --text-len")
    if not n:
        raise ValueError(f"model {cfg.model.name!r}'s prompt encoding declares no plan_text_len; pass --text-len")
    return int(n)


def _check_sp(adapter, sp: int) -> None:
    heads = attention_shape(adapter)[0]
    if sp > 1 and heads and heads % sp:
        raise ValueError(f"parallel.sp={sp} does not divide the model's {heads} attention heads (Ulysses splits heads)")


def suggest(cfg, mem, params, budget, dims, adapter, arch, m, gpus) -> List[str]:
    """The smallest single changes (each estimated with the same model) that bring the peak under budget."""
    out = []
    trials = []
    if mem["peak_decode"] >= mem["peak"] and cfg.sampling.decode_batch_size != 1:
        trials.append(("sampling.decode_batch_size=1", {"sampling.decode_batch_size": 1}))
    if mem["peak_rollout"] >= mem["peak"] and cfg.sampling.rollout_batch_size != 1:
        trials.append(("sampling.rollout_batch_size=1", {"sampling.rollout_batch_size": 1}))
    if float(cfg.parallel.activation_checkpointing or 0) < 1.0:
        trials.append(("parallel.activation_checkpointing=1.0", {"parallel.activation_checkpointing": 1.0}))
    if cfg.grpo.micro_batch_size != 1:
        trials.append(("grpo.micro_batch_size=1", {"grpo.micro_batch_size": 1}))
    heads = attention_shape(adapter)[0]
    for sp in (2, 4, 8):
        if sp > dims.sp and heads and heads % sp == 0 and gpus % sp == 0:
            trials.append((f"parallel.sp={sp}", {"parallel.sp": sp}))
    if not cfg.model.kwargs.get("lora_rank"):
        trials.append(("model.kwargs.lora_rank=64 (LoRA: no gradients or AdamW state for the base weights)",
                       {"model.kwargs.lora_rank": 64}))
    for label, change in trials:
        c = copy.deepcopy(cfg)
        for k, v in change.items():
            _set(c, k, v)
        try:
            p = plan(c, gpus, budget / GIB + RESERVE_GIB, measured=m, arch=arch)
        except ValueError:  # a change that cannot apply (e.g. sp not dividing the heads) is not suggested
            continue
        if p.fits:
            out.append(f"{label}: peak {p.memory_gib['peak']:.1f} GiB")
    need = math.ceil(gpus * mem["peak"] / budget)
    out.append(f"or more GPUs: about {need} at this per-GPU batch (sharded state shrinks, activations do not)")
    return out


def _set(cfg, dotted: str, value) -> None:
    parts = dotted.split(".")
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p)
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:
        setattr(obj, parts[-1], value)


# ----------------------------------------------------------------------------- output


def render(p: Plan) -> str:
    m = p.memory_gib
    lines = [f"{p.recipe or 'recipe'}: {p.arch} on {p.gpus} GPU(s) x {p.gpu_mem_gib:.0f} GiB "
             f"(fsdp {p.settings['fsdp_degree']}, sp {p.settings['sp']})",
             f"  parameters: {p.params['total'] / 1e9:.2f} B ({p.params['trainable'] / 1e9:.2f} B trained), "
             + (f"frozen denoisers {p.params['frozen_denoisers'] / 1e9:.2f} B, " if p.params["frozen_denoisers"]
                else "") + f"VAE {p.params['vae'] / 1e6:.0f} M",
             f"  per-GPU memory (GiB): params {m['params_shard']:.1f} + "
             + (f"frozen denoisers {m['frozen_denoisers_shard']:.1f} + " if m["frozen_denoisers_shard"] else "")
             + f"grads {m['grads_shard']:.1f} + AdamW "
             f"{m['optimizer_shard']:.1f} + VAE {m['vae']:.1f} + rewards {m['reward_models']:.1f}; "
             f"in-flight blocks {m['unsharded_blocks']:.1f}; trajectories {m['trajectory']:.1f}",
             f"    rollout activations {m['rollout_activations']:.1f}, decode {m['decode_activations']:.1f}, "
             f"training micro-step {m['train_activations']:.1f}",
             f"    peak by phase: rollout {m['peak_rollout']:.1f}, decode {m['peak_decode']:.1f}, "
             f"train {m['peak_train']:.1f}  ->  peak {m['peak']:.1f} GiB",
             f"  FLOPs per iteration per GPU: {p.flops['total'] / 1e15:.1f} PFLOP (rollout "
             f"{p.flops['rollout'] / 1e15:.1f}, train {p.flops['train'] / 1e15:.1f}, decode "
             f"{p.flops['decode'] / 1e15:.2f}); projected "
             + ", ".join(f"{g} {s:.0f} s" for g, s in p.seconds.items()) + f" per iteration at MFU {p.settings['mfu']}",
             "  throughput/* metrics predicted at those seconds (per GPU): " + ", ".join(
                 f"{g} {t['frames_per_gpu_s']:.3g} frames/s, MFU {t['mfu']:.3f}" for g, t in p.throughput.items()
                 if isinstance(t, dict)) + f" (verl-omni's count: {p.throughput.get('verl_over_planner_flops') or 0:.2f}x "
             "the FLOPs above)",
             f"  verdict: {'fits' if p.fits else 'does NOT fit'} ({RESERVE_GIB:.0f} GiB kept free per GPU)"]
    for s in p.suggestions:
        lines.append(f"    - {s}")
    lines.append(f"  (measured in {p.measured_in_s:.1f} s under fake tensors)")
    return "\n".join(lines)


SETUPS = [(8, 80.0), (8, 141.0), (32, 80.0)]  # the docs/recipes.md table: 8 x 80 GB, 8 x 141 GB, 32 x 80 GB


def assumed_gpus(path) -> Optional[int]:
    """The GPU count a recipe's header comment says it assumes ("Assumes 32 GPUs")."""
    import re

    m = re.search(r"[Aa]ssumes (\d+) GPUs", Path(path).read_text())
    return int(m.group(1)) if m else None


def with_global_batch(cfg, gpus: int, global_prompts: int):
    """``cfg`` with ``grpo.prompts_per_iteration`` per rank set so that ``gpus`` GPUs draw ``global_prompts``
    prompts per iteration (rounded up to whole prompts per data-parallel rank)."""
    c = copy.deepcopy(cfg)
    dp = max(1, gpus // max(1, c.parallel.sp))
    c.grpo.prompts_per_iteration = max(1, math.ceil(global_prompts / dp))
    return c


def table(configs, mfu: float = DEFAULT_MFU) -> str:
    """Markdown: per recipe and setup, the per-GPU peak, the verdict and the projected seconds per iteration,
    at the recipe's global batch (its prompts per rank x the GPUs its header assumes)."""
    from ..config import load_config

    rows = ["| recipe | architecture | GPUs | prompts / rank | per-GPU peak (GiB) | verdict | s / iteration | "
            "largest phase |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in configs:
        base = load_config(str(path))
        n0 = assumed_gpus(path) or 8
        global_prompts = base.grpo.prompts_per_iteration * max(1, n0 // base.parallel.sp)
        measured = None
        for gpus, mem in SETUPS:
            cfg = with_global_batch(base, gpus, global_prompts)
            p = plan(cfg, gpus, mem, mfu=mfu, measured=measured, recipe=Path(path).name)
            measured = p._measured
            m = p.memory_gib
            phase = max(("rollout", "decode", "train"), key=lambda k: m[f"peak_{k}"])
            verdict = "fits" if p.fits else "does not fit: " + (p.suggestions[0] if p.suggestions else "")
            arch = Path(p.settings["arch_file"]).stem
            rows.append(f"| {Path(path).name} | {arch} | {gpus} x {mem:.0f} GB | {cfg.grpo.prompts_per_iteration} | "
                        f"{m['peak']:.1f} | {verdict} | {p.seconds['H100']:.0f} | {phase} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> Dict:
    from ..config import load_config

    ap = argparse.ArgumentParser(prog="python -m fastvideo_grpo.cli.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="recipe YAML")
    ap.add_argument("--gpus", type=int, default=8, help="number of GPUs (the world size)")
    ap.add_argument("--table", nargs="*", metavar="RECIPE",
                    help="print the docs/recipes.md table (8 x 80, 8 x 141, 32 x 80 GB) for these recipes "
                         "(default: every recipe in configs/ but the toy one)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (80 for H100, 141 for H200)")
    ap.add_argument("--arch", default=None, help="architecture file (default: found from model.kwargs.model_path)")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for the projection")
    ap.add_argument("--text-len", type=int, default=0, help="text tokens per sample (default: the family's usual)")
    ap.add_argument("--global-prompts", type=int, default=0,
                    help="prompts per iteration over all GPUs: sets grpo.prompts_per_iteration per rank for --gpus "
                         "(default: the recipe's per-rank count as it is)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = ap.parse_known_args(argv)
    if args.table is not None:
        recipes = args.table or [p for p in sorted((ROOT / "configs").glob("*.yaml")) if "toy" not in p.name]
        text = table(recipes, args.mfu)
        print(text, flush=True)
        return {"table": text}
    if not args.config:
        raise ValueError("--config is required (or --table)")
    if args.gpus < 1:
        raise ValueError("--gpus must be >= 1")
    if not 0 < args.mfu <= 1:
        raise ValueError("--mfu must be in (0, 1]")
    cfg = load_config(args.config, overrides)
    if args.global_prompts:
        cfg = with_global_batch(cfg, args.gpus, args.global_prompts)
    p = plan(cfg, args.gpus, args.gpu_mem_gib, args.arch, args.mfu, recipe=Path(args.config).name,
             text_len=args.text_len or None)
    print(json.dumps(p.as_dict()) if args.json else render(p), flush=True)
    return p.as_dict()


def cli(argv=None) -> None:
    from ..training.loop import run_cli

    run_cli(main, argv)


if __name__ == "__main__":
    cli()
