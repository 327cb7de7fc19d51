"""Cost of one GRPO iteration against the bare model work it contains; prints ONE JSON line.

For each case (a random-init diffusers FLUX-like or HunyuanVideo-like transformer + VAE, saved to a
temporary folder and loaded through the real adapter), in a fresh subprocess (so peak RSS is per
case), with interleaved repetitions and medians:

* one ``Trainer.train_iteration`` split into rollout (SDE sampling + VAE decode), reward (a cheap
  registered ``bench_mean_brightness`` reward) and training (``update``, the objective's update);
* the bare model work of that iteration in plain loops with no GRPO code: T no-grad transformer
  forwards at the rollout batch, the VAE decode of the final latents (counted in the bare rollout
  time and also reported alone as ``bare_decode_s``), and K * (row chunks) forward + backward passes
  at the training micro-batch followed by the same number of ``optimizer.step`` calls as the update
  (AdamW; reported alone as ``bare_optim_s``; gradient clipping is counted as GRPO overhead).

``overhead_ratio`` = iteration time / bare time, per phase (rollout, train) and overall (reward time
is pure overhead in the overall ratio). Peak memory is the subprocess's max RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU).

    python bench/iteration.py --json             # tiny + small FLUX / HunyuanVideo cases, ~3 min on 2 CPU cores
    python bench/iteration.py --json --quick     # tiny cases, 1 repetition (CI)
    python bench/iteration.py --json --knobs     # per-iteration time of the compute knobs on flux_small
    python bench/iteration.py --json --memory    # the memory knobs on a video case: time and peak memory per phase
    python bench/iteration.py --json --memory --quick --cases whole_batch,video_recipe   # (CI: tiny case)

Peak memory per phase (rollout forwards, decode, reward, training) is reported as ``phase_peak_mem_mib``:
``torch.cuda.max_memory_allocated`` reset at each phase's start on a GPU, the process's peak resident set
reset the same way on a Linux CPU (/proc/self/clear_refs), which includes the weights and allocator caches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TEXT_LEN = 16

# name -> model/vae sizes and the GRPO shapes of the iteration. Optional keys (defaults in
# ``build_folder``): latent_channels, vae_levels (VAE down-sampling = 2 ** (levels - 1)), vae_width,
# patch (spatial patch of the video transformer), text_dim, pooled_dim, text_len, micro_batch.
CASES = {
    "flux_tiny": dict(family="flux", width=32, double=1, single=1, heads=2, head_dim=16, resolution=32,
                      prompts=2, group=2, steps=4, tau=0.6, updates=2),
    "hunyuan_tiny": dict(family="hunyuan_t2v", width=32, double=1, single=1, heads=2, head_dim=16, resolution=32,
                         num_frames=5, prompts=2, group=2, steps=4, tau=0.6, updates=2),
    "flux_small": dict(family="flux", width=512, double=2, single=4, heads=8, head_dim=64, resolution=32,
                       prompts=2, group=2, steps=6, tau=0.6, updates=2),
    "hunyuan_small": dict(family="hunyuan_t2v", width=512, double=2, single=4, heads=8, head_dim=64, resolution=32,
                          num_frames=5, prompts=2, group=2, steps=6, tau=0.6, updates=2),
    # GPU sizes (bench/gpu_check.py): ~1.1B-parameter transformers at the recipes' token counts --
    # FLUX at 720 px (45 x 45 = 2025 image tokens + 512 text tokens), HunyuanVideo at 480 x 480 x 17
    # frames (5 x 30 x 30 = 4500 video tokens + 256 text tokens); real latent channels and VAE factors,
    # narrow VAEs; 16 sampling steps as the recipes
    "flux_1b_720px": dict(family="flux", width=2048, double=4, single=8, heads=16, head_dim=128, resolution=720,
                          latent_channels=16, vae_levels=4, vae_width=32, text_dim=4096, pooled_dim=768,
                          text_len=512, prompts=2, group=4, steps=16, tau=0.6, updates=2, micro_batch=4),
    "hunyuan_1b_480p_17f": dict(family="hunyuan_t2v", width=2048, double=4, single=8, heads=16, head_dim=128,
                                resolution=480, num_frames=17, latent_channels=16, vae_levels=4, vae_width=32,
                                patch=2, text_dim=4096, pooled_dim=768, text_len=256, prompts=1, group=4,
                                steps=16, tau=0.6, updates=2, micro_batch=2),
}
# the memory sweep's video case (``--memory``): activations large against the weights on a CPU -- 128 x 128
# frames, 9 frames (3 latent frames), 8 videos per rank -- so that the chunk sizes show in the phases' peaks
CASES["hunyuan_mem"] = dict(family="hunyuan_t2v", width=128, double=1, single=1, heads=2, head_dim=64,
                            resolution=128, num_frames=9, prompts=2, group=4, steps=4, tau=0.5, updates=1,
                            micro_batch=1)
DEFAULT_CASES = ["flux_tiny", "hunyuan_tiny", "flux_small", "hunyuan_small"]
QUICK_CASES = ["flux_tiny", "hunyuan_tiny"]


# ----------------------------------------------------------------------------- models


def vae_arch(family: str, latent_channels: int = 4, width: int = 8, levels: int = 2):
    """(diffusers class name, config) of a narrow VAE with the real one's latent channels and compression:
    ``AutoencoderKL`` (2 ** (levels - 1) x spatial) or HunyuanVideo's (8 x spatial, 4 x temporal)."""
    if family == "flux":
        return "AutoencoderKL", dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=[width] * levels,
            layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)
    return "AutoencoderKLHunyuanVideo", dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels, down_block_types=["HunyuanVideoDownBlock3D"] * 4,
        up_block_types=["HunyuanVideoUpBlock3D"] * 4, block_out_channels=[width] * 4, layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True)


def case_arch(case: dict) -> dict:
    """The case's architecture in the planner's format (``fastvideo_grpo.cli.plan``): diffusers class names and
    configs of the transformer and the (narrow) VAE, and the repeated-block lists."""
    hd = case["head_dim"]
    lc, vw, levels = case.get("latent_channels", 4), case.get("vae_width", 8), case.get("vae_levels", 2)
    text_dim, pooled = case.get("text_dim", 64), case.get("pooled_dim", 32)
    blocks = {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"}
    if case["family"] == "flux":
        rope = [hd // 4, 3 * hd // 8, 3 * hd // 8] if hd >= 16 else [4, 6, 6]
        tr = ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=4 * lc, num_layers=case["double"], num_single_layers=case["single"],
            attention_head_dim=hd, num_attention_heads=case["heads"], joint_attention_dim=text_dim,
            pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=rope))
        vae = vae_arch("flux", lc, vw, levels)
    else:
        tr = ("HunyuanVideoTransformer3DModel", dict(
            in_channels=lc, out_channels=lc, num_attention_heads=case["heads"], attention_head_dim=hd,
            num_layers=case["double"], num_single_layers=case["single"], num_refiner_layers=1,
            patch_size=case.get("patch", 1), patch_size_t=1, guidance_embeds=True, text_embed_dim=text_dim,
            pooled_projection_dim=pooled, rope_axes_dim=[hd // 4, 3 * hd // 8, 3 * hd // 8]))
        vae = vae_arch("hunyuan_t2v", lc, vw)
    return {"name": case.get("name", case["family"]), "_path": "", "blocks": blocks,
            "transformer": {"class": tr[0], "config": tr[1]}, "vae": {"class": vae[0], "config": vae[1]}}


def case_adapter_kwargs(case: dict) -> dict:
    kw = dict(resolution=case["resolution"])
    if case["family"] != "flux":
        kw["num_frames"] = case["num_frames"]
    return kw


def build_folder(case: dict, root: Path, device="cpu") -> dict:
    """Write a random-init diffusers folder for ``case``; returns the adapter kwargs.

    ``device``: where the random initialisation runs (a GPU initialises a 1B model in a fraction of the
    CPU's time); the folder is the same format either way."""
    with torch.device(device):
        return _build_folder(case, root)


def _build_folder(case: dict, root: Path) -> dict:
    from fastvideo_grpo.models.diffusers_base import component_from_config

    torch.manual_seed(0)
    assert case["heads"] * case["head_dim"] == case["width"] or case["width"] == 32
    arch = case_arch(case)
    tr = component_from_config(arch["transformer"]["class"], arch["transformer"]["config"])
    vae = component_from_config(arch["vae"]["class"], arch["vae"]["config"])
    tr.cpu().save_pretrained(str(root / "transformer"))
    vae.cpu().save_pretrained(str(root / "vae"))
    return case_adapter_kwargs(case)


def random_encoder(adapter, text_len: int = TEXT_LEN):
    """A stand-in prompt encoder: fixed random embeddings per prompt (seeded by the prompt's index)."""
    spec = adapter.cond_spec()

    def encode(prompts):
        cond = {}
        for key, trailing in spec.items():
            rows = []
            for p in prompts:
                g = torch.Generator().manual_seed(int(p.split("_")[-1]))
                shape = tuple(text_len if d is None else d for d in trailing)
                rows.append(torch.ones(shape, dtype=torch.int64) if key.endswith("attention_mask")
                            else torch.randn(shape, generator=g))
            cond[key] = torch.stack(rows).to(adapter.device)
        return cond

    return encode


def register_reward():
    """``bench_mean_brightness``: mean pixel value per sample (cheap, so reward time is not model time)."""
    from fastvideo_grpo.rewards.base import REWARDS

    if "bench_mean_brightness" in REWARDS.names():
        return

    @REWARDS.register("bench_mean_brightness")
    def build(**_):
        def fn(images, prompts, **meta):
            return images.flatten(1).mean(1).float().cpu(), {}

        return fn


# ----------------------------------------------------------------------------- bare model work


def bare_inputs(adapter, z, t, cond):
    """Keyword arguments of one direct transformer call at latents z (built once, outside the timed loops)."""
    from fastvideo_grpo.models.flux import image_ids, pack_latents

    c = {k: cond[k] for k in adapter.branch_keys}
    if type(adapter).__name__ == "FluxAdapter":
        B, _, H, W = z.shape
        return dict(hidden_states=pack_latents(z), timestep=t / 1000.0,
                    guidance=torch.full((B,), adapter.guidance_scale, device=z.device),
                    pooled_projections=c["pooled_prompt_embeds"], encoder_hidden_states=c["prompt_embeds"],
                    txt_ids=torch.zeros(c["prompt_embeds"].shape[1], 3, device=z.device),
                    img_ids=image_ids(H, W, z.device, z.dtype), return_dict=False)
    if "pooled_prompt_embeds" not in c:  # text by cross-attention (Wan); with CFG both branches in one call
        n = 2 if getattr(adapter, "uses_cfg", False) else 1
        return dict(hidden_states=torch.cat([z] * n), timestep=torch.cat([t] * n),
                    encoder_hidden_states=torch.cat([c["prompt_embeds"]] * n), return_dict=False)
    return dict(hidden_states=z, timestep=t, encoder_hidden_states=c["prompt_embeds"],
                encoder_attention_mask=c["prompt_attention_mask"].to(z.dtype),
                pooled_projections=c["pooled_prompt_embeds"],
                guidance=torch.full((z.shape[0],), adapter.guidance_scale * 1000.0, device=z.device),
                return_dict=False)


def clock() -> float:
    """CPU time of this process on CPU runs (robust to other processes on a shared machine: the bench
    runs one intra-op thread), wall time when a GPU is in use (set by ``--device``)."""
    return time.perf_counter() if _WALL else time.process_time()


_WALL = False


class _PhasePeak:
    """Peak memory of one phase: ``torch.cuda.max_memory_allocated`` since the phase began on a GPU;
    on the CPU the process's peak resident set since it began (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM; None where that is not available). Both counters are reset per phase, so the largest
    value seen over the run is kept here for the run's overall figure (``_peak_mem``)."""

    overall_mib = 0.0

    @staticmethod
    def _read(device):
        if torch.device(device).type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            with open("/proc/self/status") as f:
                line = next(l for l in f if l.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024.0
        except (OSError, StopIteration, ValueError):
            return None

    @classmethod
    def start(cls, device):
        now = cls._read(device)
        if now is not None:
            cls.overall_mib = max(cls.overall_mib, now)
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    @classmethod
    def stop(cls, device):
        now = cls._read(device)
        if now is not None:
            cls.overall_mib = max(cls.overall_mib, now)
        return now


class _PhaseClock:
    """Times the phases of the real ``Trainer.train_iteration`` by wrapping the functions it calls
    (the trainer's ``sampler``; ``decode_latents``, ``compute_rewards``, ``update`` in
    fastvideo_grpo.training.trainer) with clocks, and records each phase's peak memory (``_PhasePeak``) in
    ``last_peaks``."""

    PHASES = {"sampler": "rollout_forward", "decode_latents": "decode", "compute_rewards": "reward",
              "update": "train"}

    @staticmethod
    def run(trainer) -> dict:
        import fastvideo_grpo.training.trainer as tr

        spent = {key: 0.0 for key in _PhaseClock.PHASES.values()}
        peaks = {}
        owner = {name: trainer if name == "sampler" else tr for name in _PhaseClock.PHASES}
        originals = {name: getattr(owner[name], name) for name in _PhaseClock.PHASES}
        dev = trainer.adapter.device

        class Timed:  # ``fn`` with a clock; its attributes (a sampler's declarations) pass through
            def __init__(self, key, fn):
                self.key, self.fn = key, fn

            def __getattr__(self, name):
                return getattr(self.fn, name)

            def __call__(self, *a, **k):
                _sync(dev)  # on a GPU, queued work is charged to the phase that queued it
                _PhasePeak.start(dev)
                t = clock()
                try:
                    return self.fn(*a, **k)
                finally:
                    _sync(dev)
                    spent[self.key] += clock() - t
                    peak = _PhasePeak.stop(dev)
                    if peak is not None:
                        peaks[self.key] = max(peaks.get(self.key, 0.0), peak)

        for name, key in _PhaseClock.PHASES.items():
            setattr(owner[name], name, Timed(key, originals[name]))
        try:
            _sync(dev)
            w0, c0 = time.perf_counter(), clock()
            metrics = trainer.train_iteration()
            _sync(dev)
            total, wall = clock() - c0, time.perf_counter() - w0
        finally:
            for name, fn in originals.items():
                setattr(owner[name], name, fn)
        _PhaseClock.last_metrics = metrics
        _PhaseClock.last_peaks = peaks
        # rollout = everything before the rewards (prompt batch, timestep subsets, sampling, decode)
        return {"rollout": total - spent["reward"] - spent["train"], "decode": spent["decode"],
                "reward": spent["reward"], "train": spent["train"], "total": total, "wall_total": wall}

    last_metrics: dict = {}
    last_peaks: dict = {}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_rollout(adapter, kw, num_steps, z, autocast_dtype=None):
    """num_steps no-grad transformer forwards + one VAE decode; returns (total_s, decode_s)."""
    from fastvideo_grpo.utils.dtypes import autocast_context

    model, dev = adapter.model, z.device
    model.eval()
    _sync(dev)
    t0 = clock()
    with torch.no_grad():
        for _ in range(num_steps):
            with autocast_context(dev, autocast_dtype):
                model(**kw)
        _sync(dev)
        t1 = clock()
        adapter.vae.decode(z, return_dict=False)
    _sync(dev)
    t2 = clock()
    return t2 - t0, t2 - t1


def bare_train(adapter, kw, num_passes, num_optim_steps, optimizer, autocast_dtype=None):
    """num_passes forward+backward passes + num_optim_steps optimiser updates (gradient clipping + AdamW
    step, what any fine-tuning loop does); returns (total_s, optim_s)."""
    from fastvideo_grpo.utils.dtypes import autocast_context

    model = adapter.model
    model.train()
    dev = kw["hidden_states"].device
    from fastvideo_grpo.algorithms.grpo import update_chunks

    per_chunk = [len(r) for r in update_chunks(1, num_passes, 0, num_optim_steps)[1]]
    optim_s = 0.0
    _sync(dev)
    t0 = clock()
    for n in per_chunk:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(n):
            with autocast_context(dev, autocast_dtype):
                out = model(**kw)[0]
            out.float().square().mean().backward()
        _sync(dev)
        ts = clock()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        _sync(dev)
        optim_s += clock() - ts
    _sync(dev)
    return clock() - t0, optim_s


class _NullTransformer(torch.nn.Module):
    """A zero-cost stand-in for the transformer (output = input * w), to time the GRPO code alone."""

    def __init__(self, config):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.config = config

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states * self.w,)


def null_model_overhead(trainer, kw_roll, kw_train, num_steps, num_passes, z, reps) -> float:
    """Seconds of non-model work per iteration, measured with the transformer swapped for a zero-cost
    stand-in: median(GRPO iteration) - median(the bare loops) with that stand-in (the VAE decode, the
    same in both, cancels). Low-noise, because almost nothing model-sized runs; it leaves out costs
    that scale with the parameter count (none in the GRPO path besides the optimiser update)."""
    adapter = trainer.adapter
    real = adapter.model
    adapter.model = _NullTransformer(real.config).to(z.device)
    its, bares = [], []
    try:
        for r in range(reps + 1):
            it = _PhaseClock.run(trainer)["total"]
            amp = trainer.autocast_dtype
            b = bare_rollout(adapter, kw_roll, num_steps, z, amp)[0] + bare_train(
                adapter, kw_train, num_passes, trainer.cfg.grpo.num_updates_per_iteration, trainer.optimizer, amp)[0]
            if r:  # the first round warms up
                its.append(it)
                bares.append(b)
    finally:
        adapter.model = real
    return statistics.median(its) - statistics.median(bares)


# ----------------------------------------------------------------------------- one case


def case_overrides(case: dict, fsdp: bool = False) -> list:
    """The run config of a case, as command-line overrides (the trainer's and the planner's)."""
    return [
        f"--model.name={case['family']}", f"--sampling.num_steps={case['steps']}", "--sampling.eta=0.3",
        f"--grpo.group_size={case['group']}", f"--grpo.prompts_per_iteration={case['prompts']}",
        f"--grpo.tau={case['tau']}", f"--grpo.num_updates_per_iteration={case['updates']}",
        f"--grpo.micro_batch_size={case.get('micro_batch', 0)}",
        "--grpo.clip_range=1e-4", "--optim.lr=1e-5", "--rewards=[{name: bench_mean_brightness}]",
        f"--parallel.fsdp_one_process={str(bool(fsdp)).lower()}", "--parallel.activation_checkpointing=0.0",
    ]


def plan_case(case: dict, gpu_mem_gib: float = 80.0):
    """The planner's estimate (``fastvideo_grpo.cli.plan``) for one GPU running ``case`` (full fine-tuning, FSDP2)."""
    from fastvideo_grpo.cli import plan as P
    from fastvideo_grpo.config import load_config

    register_reward()
    kw = ", ".join(f"{k}: {v}" for k, v in case_adapter_kwargs(case).items())
    cfg = load_config(None, case_overrides(case, fsdp=True) + [f"--model.kwargs={{model_path: none, {kw}}}"])
    return P.plan(cfg, 1, gpu_mem_gib, arch=case_arch(case), text_len=case.get("text_len", TEXT_LEN))


def make_trainer(case: dict, root: Path, overrides=(), adapter_kwargs=None, device="cpu", fsdp=False):
    """A Trainer over a random-init model of ``case`` written to ``root`` and loaded by the real adapter.

    ``fsdp``: shard the transformer with FSDP2 over a one-rank mesh (``parallel.fsdp_one_process``;
    needs an initialised one-process group): on CUDA that is bf16 compute over fp32 master weights,
    the multi-GPU code path."""
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.distributed.fsdp import parallelize
    from fastvideo_grpo.distributed.parallel_dims import ParallelDims
    from fastvideo_grpo.models import ADAPTERS
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.training.trainer import Trainer

    register_reward()
    kw = build_folder(case, root, device)
    kw.update(adapter_kwargs or {})
    adapter = ADAPTERS.build(case["family"], model_path=str(root), device=device, **kw)
    cfg = load_config(None, case_overrides(case, fsdp) + list(overrides))
    if fsdp:
        dims = ParallelDims(world_size=1)
        dims.build_mesh(torch.device(device).type, one_process=True)
        parallelize(adapter, dims, cfg.parallel, torch.device(device))
    fns, weights = build_reward_fns(cfg.rewards)
    prompts = [f"prompt_{i}" for i in range(64)]
    encode = random_encoder(adapter, case.get("text_len", TEXT_LEN))
    trainer = Trainer(cfg, adapter, fns, weights, PromptSource(prompts, encode, seed=0))
    return trainer, cfg


def _peak_mem(device) -> float:
    """The run's peak: the largest per-phase peak seen (the phase counters are reset) or the counter now."""
    if torch.device(device).type == "cuda":
        now = torch.cuda.max_memory_allocated() / 2**20
    else:
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    return max(now, _PhasePeak.overall_mib)


def run_case(name: str, reps: int, overrides=(), adapter_kwargs=None, device="cpu", compile_model=False,
             fsdp=False, keep_trainer=False) -> dict:
    """Time ``reps`` GRPO iterations and bare loops of case ``name`` (see the module docstring).

    ``fsdp``: FSDP2 over a one-rank mesh (see ``make_trainer``). ``keep_trainer``: return the trainer
    under "trainer" (not JSON) to keep training it. The first GRPO iteration's ``first_ratio_dev`` and
    loss are reported: the ratio before any update must be 1."""
    case = CASES[name]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = make_trainer(case, Path(tmp), overrides, adapter_kwargs, device, fsdp=fsdp)
    return time_trainer(trainer, cfg, name, case, reps, overrides, adapter_kwargs, compile_model, fsdp, keep_trainer)


def time_trainer(trainer, cfg, name: str, case: dict, reps: int, overrides=(), adapter_kwargs=None,
                 compile_model=False, fsdp=False, keep_trainer=False) -> dict:
    """``run_case``'s measurement of a trainer built elsewhere (``case``: what to report of it, and its
    ``text_len``; bench/real_size.py builds the real architectures straight on the device)."""
    adapter = trainer.adapter
    amp = trainer.autocast_dtype
    compile_s = 0.0
    if compile_model:
        adapter.model = torch.compile(adapter.model)  # what an option in the trainer would wrap
    g = cfg.grpo
    B = g.prompts_per_iteration * g.group_size
    T = trainer.schedule.num_steps
    from fastvideo_grpo.algorithms.grpo import num_train_steps, trainable_window

    lo, hi = trainable_window(T, g.timestep_window, g.train_last_step)

    K = num_train_steps(hi - lo, g.tau)
    mb = g.micro_batch_size or B
    row_chunks = math.ceil(B / mb)
    cond = random_encoder(adapter, case.get("text_len", TEXT_LEN))([f"prompt_{i}" for i in range(B)])
    z = adapter.initial_noise(B, torch.Generator().manual_seed(0), device=adapter.device)
    t = torch.full((B,), 500.0, device=adapter.device)
    kw_roll = bare_inputs(adapter, z, t, cond)
    kw_train = bare_inputs(adapter, z[:mb], t[:mb], {k: v[:mb] for k, v in cond.items()})
    # warm-up (allocator, lazy init, compilation): one no-grad forward, one forward+backward, one decode
    tc = time.perf_counter()
    bare_rollout(adapter, kw_roll, 1, z, amp)
    bare_train(adapter, kw_train, 1, 1, trainer.optimizer, amp)
    first = None
    if compile_model:
        _PhaseClock.run(trainer)  # compiles the shapes the GRPO path uses too
        first = _PhaseClock.last_metrics
        compile_s = time.perf_counter() - tc
    rows = {k: [] for k in ("it_rollout", "it_decode", "it_reward", "it_train", "it_total", "it_wall_total",
                            "bare_rollout", "bare_decode", "bare_train", "bare_optim", "bare_wall_total")}
    phase_peaks = {}
    for r in range(reps):
        order = ("iter", "bare") if r % 2 == 0 else ("bare", "iter")  # interleaved, alternating order
        for what in order:
            if what == "iter":
                ph = _PhaseClock.run(trainer)
                first = first or _PhaseClock.last_metrics
                for k, v in ph.items():
                    rows["it_" + k].append(v)
                for k, v in _PhaseClock.last_peaks.items():
                    phase_peaks[k] = max(phase_peaks.get(k, 0.0), v)
            else:
                w0 = time.perf_counter()
                tot, dec = bare_rollout(adapter, kw_roll, T, z, amp)
                rows["bare_rollout"].append(tot)
                rows["bare_decode"].append(dec)
                tot, opt = bare_train(adapter, kw_train, K * row_chunks, g.num_updates_per_iteration, trainer.optimizer,
                                      amp)
                rows["bare_train"].append(tot)
                rows["bare_optim"].append(opt)
                rows["bare_wall_total"].append(time.perf_counter() - w0)
    med = {k: statistics.median(v) for k, v in rows.items()}
    null = null_model_overhead(trainer, kw_roll, kw_train, T, K * row_chunks, z, max(3, reps))
    bare_total = med["bare_rollout"] + med["bare_train"]
    params = sum(p.numel() for p in adapter.model.parameters())
    out = {
        "case": name,
        "config": dict(case, params_M=round(params / 1e6, 2), batch=B, num_steps_T=T, train_steps_K=K, micro_batch=mb,
                       latent=list(adapter.latent_shape()), window=[lo, hi],
                       overrides=list(overrides), adapter_kwargs=adapter_kwargs or {}, compile=compile_model,
                       fsdp=fsdp, autocast=str(amp).replace("torch.", "") if amp is not None else None),
        "reps": reps,
        "first_iteration": {k: first.get(k) for k in ("train/first_ratio_dev", "train/loss", "train/grad_norm",
                                                      "train/clipfrac")},
        "iteration_s": {"rollout": med["it_rollout"], "decode": med["it_decode"], "reward": med["it_reward"],
                        "train": med["it_train"], "total": med["it_total"]},
        "bare_s": {"rollout": med["bare_rollout"], "decode": med["bare_decode"], "train": med["bare_train"],
                   "optim": med["bare_optim"], "total": bare_total},
        "overhead_ratio": {"rollout": med["it_rollout"] / med["bare_rollout"],
                           "train": med["it_train"] / med["bare_train"],
                           "overall": med["it_total"] / bare_total,
                           "overall_wall": med["it_wall_total"] / med["bare_wall_total"]},
        "clock": "wall" if _WALL else "cpu_process_time",
        "samples_per_s": B / med["it_wall_total"],
        "grpo_overhead_s_null_model": null,
        "overhead_ratio_est": 1.0 + null / bare_total,
        "peak_mem_mib": _peak_mem(adapter.device),
        "peak_mem_kind": "cuda_max_allocated" if adapter.device.type == "cuda" else "cpu_max_rss_process",
        # per phase of the GRPO iteration (rollout forwards, decode, reward, training): the peak while it ran
        "phase_peak_mem_mib": phase_peaks,
    }
    if compile_model:
        out["compile_s"] = compile_s
    if keep_trainer:
        out["trainer"] = trainer
    return out


# ----------------------------------------------------------------------------- driver


def _window_knob(T):
    """Train only the first half of the steps; eta = 0 (deterministic ODE step) after it."""
    hi = (T + 1) // 2
    return [f"--grpo.timestep_window=[0, {hi}]", f"--sampling.eta_schedule={[0.3] * hi + [0.0] * (T - hi)}"]


KNOBS = {
    # name -> (case overrides as a function of the case's sampling steps T, adapter kwargs, compile)
    "baseline_tau0.6": (lambda T: [], {}, False),
    "tau1.0": (lambda T: ["--grpo.tau=1.0"], {}, False),
    "window_first_half_eta0_outside": (_window_knob, {}, False),
    "rollout_steps_two_thirds": (lambda T: [f"--sampling.num_steps={max(1, round(2 * T / 3))}",
                                            f"--sampling.eval_num_steps={T}"], {}, False),
    "activation_checkpointing": (lambda T: [], {"gradient_checkpointing": True}, False),
    "torch_compile": (lambda T: [], {}, True),
}


# the memory sweep (``--memory``): name -> (overrides, adapter kwargs). Small VAE tiles (32 px, stride 24)
# so that tiling cuts the case's 128-px frames the way diffusers' 256-px tiles cut 480-px ones.
_TILES = {"tile_sample_min_height": 32, "tile_sample_min_width": 32, "tile_sample_stride_height": 24,
          "tile_sample_stride_width": 24}
_PLAIN_VAE = {"vae_tiling": False, "vae_slicing": False}
MEMORY = {
    "whole_batch": ([], _PLAIN_VAE),  # before issue 23: one denoiser batch, one VAE call
    "rollout_bs4": (["--sampling.rollout_batch_size=4"], _PLAIN_VAE),
    "rollout_bs1": (["--sampling.rollout_batch_size=1"], _PLAIN_VAE),  # = grpo.micro_batch_size: ratio exactly 1
    "decode_bs1": (["--sampling.decode_batch_size=1"], _PLAIN_VAE),
    "vae_slicing": ([], {"vae_tiling": False, "vae_slicing": True}),
    "vae_tiling_slicing": ([], {"vae_tiling": _TILES, "vae_slicing": True}),
    # the recipes' sets, training micro-batch included (= rollout chunk: the PPO ratio is exactly 1 whatever the case)
    "image_recipe": (["--sampling.rollout_batch_size=2", "--sampling.decode_batch_size=4", "--grpo.micro_batch_size=2"],
                     _PLAIN_VAE),  # FLUX's set
    "video_recipe": (["--sampling.rollout_batch_size=1", "--sampling.decode_batch_size=1", "--grpo.micro_batch_size=1",
                      "--sampling.offload_vae=true", "--sampling.offload_rewards=true"],
                     {"vae_tiling": _TILES, "vae_slicing": True}),
}


def run_memory_setting(case_name: str, reps: int, overrides=(), adapter_kwargs=None, device="cpu") -> dict:
    """GRPO iterations only (no bare loops): seconds and peak memory per phase, median / max over ``reps``
    after one warm-up iteration; the largest |ratio - 1| at the first micro-step over them."""
    case = CASES[case_name]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = make_trainer(case, Path(tmp), overrides, adapter_kwargs, device)
    _PhaseClock.run(trainer)  # warm-up
    times, peaks, ratio_dev = {}, {}, 0.0
    for _ in range(reps):
        for k, v in _PhaseClock.run(trainer).items():
            times.setdefault(k, []).append(v)
        for k, v in _PhaseClock.last_peaks.items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        ratio_dev = max(ratio_dev, _PhaseClock.last_metrics["train/first_ratio_dev"])
    g = cfg.grpo
    return {"case": case_name, "overrides": list(overrides), "adapter_kwargs": adapter_kwargs or {},
            "batch": g.prompts_per_iteration * g.group_size, "micro_batch": g.micro_batch_size, "reps": reps,
            "iteration_s": {k: statistics.median(v) for k, v in times.items()},
            "phase_peak_mem_mib": peaks, "peak_mem_mib": _peak_mem(trainer.adapter.device),
            "peak_mem_kind": "cuda_max_allocated" if trainer.adapter.device.type == "cuda" else "cpu_peak_rss",
            "first_ratio_dev_max": ratio_dev, "clock": "wall" if _WALL else "cpu_process_time"}


def _child(args) -> dict:
    global _WALL
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _WALL = torch.device(args.device).type == "cuda"
    spec = json.loads(args.child)
    if spec.get("memory"):
        return run_memory_setting(spec["case"], spec["reps"], spec.get("overrides", ()), spec.get("adapter_kwargs"),
                                  args.device)
    return run_case(spec["case"], spec["reps"], spec.get("overrides", ()), spec.get("adapter_kwargs"),
                    args.device, spec.get("compile", False))


def _spawn(spec: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--threads", str(args.threads),
           "--device", args.device]
    env = dict(os.environ, PYTHONHASHSEED="0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    if p.returncode != 0:
        return {"case": spec["case"], "error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON line (the default output anyway)")
    ap.add_argument("--quick", action="store_true", help="tiny cases, 1 repetition (CI)")
    ap.add_argument("--knobs", action="store_true", help="time the compute knobs on flux_small instead")
    ap.add_argument("--memory", action="store_true",
                    help="the memory knobs (chunk sizes, VAE tiling / slicing, offload) on hunyuan_mem instead: "
                         "seconds and peak memory per phase")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all, or tiny with --quick)")
    ap.add_argument("--reps", type=int, default=0, help="interleaved repetitions per case (default 5; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case-timeout", type=float, default=900.0)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    reps = args.reps or (1 if args.quick else 5)
    t0 = time.perf_counter()
    result = {"bench": "iteration", "device": args.device, "threads": args.threads, "torch": torch.__version__,
              "quick": args.quick, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    if args.memory:
        names = [n for n in MEMORY if not args.cases or n in args.cases.split(",")]
        base = "hunyuan_tiny" if args.quick else "hunyuan_mem"
        result["memory_case"] = base
        result["memory"] = {}
        for n in names:
            ov, akw = MEMORY[n]
            result["memory"][n] = _spawn({"case": base, "reps": reps, "overrides": ov, "adapter_kwargs": akw,
                                          "memory": True}, args)
    elif args.knobs:
        base = "flux_tiny" if args.quick else "flux_small"
        names = [n for n in KNOBS if not args.cases or n in args.cases.split(",")]
        knobs = {}
        for n in names:
            ov_fn, akw, comp = KNOBS[n]
            ov = ov_fn(CASES[base]["steps"])
            if args.quick and comp:
                continue
            r = _spawn({"case": base, "reps": reps, "overrides": ov, "adapter_kwargs": akw, "compile": comp}, args)
            knobs[n] = r
        result["knob_case"] = base
        result["knobs"] = {n: ({"error": r["error"]} if "error" in r else {
            "iteration_s": r["iteration_s"]["total"], "rollout_s": r["iteration_s"]["rollout"],
            "train_s": r["iteration_s"]["train"], "overhead_ratio": r["overhead_ratio"]["overall"],
            "peak_mem_mib": r["peak_mem_mib"], "train_steps_K": r["config"]["train_steps_K"],
            "rollout_steps": r["config"]["num_steps_T"], "overrides": r["config"]["overrides"],
            "adapter_kwargs": r["config"]["adapter_kwargs"],
            **({"compile_s": r["compile_s"]} if "compile_s" in r else {})}) for n, r in knobs.items()}
    else:
        names = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
        result["cases"] = [_spawn({"case": n, "reps": reps}, args) for n in names]
    result["loadavg_end"] = os.getloadavg()[0]
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
