"""The recipes' real architectures, random-init straight on the device: one GRPO iteration each, measured
against the planner (bench/gpu_check.py's ``real_*`` checks; issue 32 item 2).

Each case is a recipe from ``configs/`` with its architecture file from ``configs/arch/`` (the published
diffusers configs). The transformer and VAE are built from those configs directly on the target device in the
stored dtype (no weights folder is written: FLUX.1-dev alone would be 24 GB), wrapped by the recipe's own
adapter (``cli.plan.build_adapter``, the planner's path), given a random prompt encoder and the bench's cheap
brightness reward, and trained through the real ``Trainer``: FSDP2 over a one-GPU group where the case says so.
``bench/iteration.py``'s ``time_trainer`` then runs one warm-up, one GRPO iteration, one pass of the bare model
work and the null-model run, which give seconds per iteration, the first micro-step's ``|ratio - 1|`` and the
overhead ratio; peak memory is ``torch.cuda.max_memory_allocated``. The planner (``cli.plan.plan``) is asked
about the same config and architecture on one GPU, so measured and predicted sit side by side.

The shapes that set the cost (resolution, frames, micro-batch, rollout / decode chunking, LoRA rank,
checkpointing) are the recipe's; what is cut to fit the whole set in ~8 minutes of one H100 / H200 is
the number of samples and of sampling steps (``GPU_OVERRIDES``; stated in the report).

``dry=True`` (CI, CPU) runs the same code on an architecture shrunk generically -- one block of each kind
(the ``blocks`` keys of the architecture file), one attention head, the feed-forward width cut, a narrow VAE,
every other dimension as published -- at a tiny resolution and frame count, in float32. FSDP2's CPU offload
needs an accelerator, so the dry run of ``real_flux_offload`` runs the same FSDP2 case without it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# case -> recipe, architecture, extra overrides, FSDP2 over a one-GPU group
CASES = {
    "real_flux_lora": dict(recipe="flux_hps.yaml", arch="flux1_dev.json", lora_rank=64, dtype="bfloat16", fsdp=False,
                           overrides=[]),
    "real_hunyuan_lora": dict(recipe="hunyuan_t2v_videoalign.yaml", arch="hunyuanvideo.json", lora_rank=64,
                              dtype="bfloat16", fsdp=False, overrides=[]),
    "real_wan_full": dict(recipe="wan_t2v.yaml", arch="wan2.1_t2v_1.3b.json", lora_rank=0, dtype="float32", fsdp=True,
                          overrides=[]),
    # LoRA on bf16 weights: full fine-tuning of 12B would need ~190 GB of host memory for the fp32 weights,
    # gradients and AdamW state offloaded
    "real_flux_offload": dict(recipe="flux_hps.yaml", arch="flux1_dev.json", lora_rank=64, dtype="bfloat16",
                              fsdp=True, overrides=["--parallel.cpu_offload=true"]),
}
# on the GPU: fewer samples and steps than the recipe (the per-sample shapes stay the recipe's)
GPU_OVERRIDES = {
    "real_flux_lora": ["--grpo.group_size=4", "--sampling.num_steps=16"],
    "real_hunyuan_lora": ["--grpo.group_size=2", "--sampling.num_steps=8"],
    "real_wan_full": ["--grpo.group_size=2", "--sampling.num_steps=8"],
    "real_flux_offload": ["--grpo.group_size=2", "--sampling.num_steps=6"],
}
DRY_OVERRIDES = ["--grpo.group_size=2", "--sampling.num_steps=3", "--grpo.tau=0.5"]
# generic shrinking for the dry run: transformer config keys present in an architecture file -> tiny value
TINY_CONFIG = {"num_attention_heads": 1, "ffn_dim": 64}
# and VAE config keys -> tiny value (a list: every level that narrow)
TINY_VAE = {"block_out_channels": 32, "layers_per_block": 1, "base_dim": 16, "num_res_blocks": 1}
TINY_PIXELS, TINY_FRAMES, TINY_TEXT = 32, 5, 8
TEXT_LEN = 512  # the recipes' prompt length on the GPU when the recipe does not set max_sequence_length


def tiny_arch(arch: dict) -> dict:
    """``arch`` with one block of each kind, one attention head and a narrow feed-forward (keys it has)."""
    small = copy.deepcopy(arch)
    conf = small["transformer"]["config"]
    for key in arch["blocks"]:
        conf[key] = 1
    for key, value in TINY_CONFIG.items():
        if key in conf:
            conf[key] = value
    vae = small["vae"]["config"]
    for key, value in TINY_VAE.items():
        if key in vae:
            vae[key] = [value] * len(vae[key]) if isinstance(vae[key], list) else value
    return small


def case_config(name: str, dry: bool):
    """(run config, architecture dict, text length, overrides used) of case ``name``."""
    import iteration as it  # bench/iteration.py: the cheap reward
    from fastvideo_grpo.cli import plan as P
    from fastvideo_grpo.config import load_config

    if name not in CASES:
        raise ValueError(f"unknown real-size case {name!r}; choose from {sorted(CASES)}")
    case = CASES[name]
    it.register_reward()
    base = load_config(str(ROOT / "configs" / case["recipe"]), [])
    kw = base.model.kwargs
    over = ["--rewards=[{name: bench_mean_brightness}]", "--train.eval_every=0", "--train.sample_every=0",
            "--model.kwargs.model_path=none", f"--model.kwargs.lora_rank={case['lora_rank']}",
            f"--parallel.fsdp_one_process={str(case['fsdp']).lower()}"] + list(case["overrides"])
    if dry:  # FSDP2's CPUOffloadPolicy needs an accelerator: on the CPU the offload case runs without it
        over = [o for o in over if o != "--parallel.cpu_offload=true"]
        over += DRY_OVERRIDES + ["--model.kwargs.dtype=float32", "--train.autocast=none"]
        over += [f"--model.kwargs.{k}={TINY_PIXELS}" for k in ("resolution", "height", "width") if k in kw]
        over += [f"--model.kwargs.num_frames={TINY_FRAMES}" for k in ("num_frames",) if k in kw]
        over += [f"--model.kwargs.max_sequence_length={TINY_TEXT}" for k in ("max_sequence_length",) if k in kw]
    else:  # random-init in the case's stored dtype (bf16 for the 12-13B LoRA cases: 24-26 GB of weights)
        over += GPU_OVERRIDES[name] + [f"--model.kwargs.dtype={case['dtype']}"]
    cfg = load_config(str(ROOT / "configs" / case["recipe"]), over)
    arch = P.load_arch(ROOT / "configs" / "arch" / case["arch"])
    if dry:
        arch = tiny_arch(arch)
    text_len = int(cfg.model.kwargs.get("max_sequence_length") or (TINY_TEXT if dry else TEXT_LEN))
    return cfg, arch, text_len, over


def build_trainer(name: str, device: torch.device, dry: bool):
    """The case's Trainer, its model random-init on ``device`` (no folder), and its (cfg, arch, text_len)."""
    import iteration as it
    from fastvideo_grpo.cli import plan as P
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.distributed.fsdp import parallelize
    from fastvideo_grpo.distributed.parallel_dims import ParallelDims
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.training.trainer import Trainer
    from fastvideo_grpo.utils.dtypes import parse_dtype

    cfg, arch, text_len, over = case_config(name, dry)
    stored = parse_dtype(cfg.model.kwargs.get("dtype", "float32"))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(stored)  # built in the stored dtype: no float32 copy of a 12B model on the way
    try:
        with torch.device(device):
            adapter = P.build_adapter(cfg, arch, dtype=str(stored).replace("torch.", ""), vae_dtype=prev)
    finally:
        torch.set_default_dtype(prev)
    if cfg.parallel.fsdp_one_process:
        dims = ParallelDims(world_size=1)
        dims.build_mesh(device.type, one_process=True)
        parallelize(adapter, dims, cfg.parallel, device)
    fns, weights = build_reward_fns(cfg.rewards)
    prompts = [f"prompt_{i}" for i in range(64)]
    trainer = Trainer(cfg, adapter, fns, weights, PromptSource(prompts, it.random_encoder(adapter, text_len), seed=0))
    return trainer, cfg, arch, text_len, over


def run(name: str, device: torch.device, dry: bool, gpu_mem_gib: float = 80.0) -> dict:
    """One case: measured seconds, peak memory, ratio and overhead next to the planner's prediction."""
    import iteration as it
    from fastvideo_grpo.cli import plan as P

    it._WALL = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer, cfg, arch, text_len, over = build_trainer(name, device, dry)
    info = {"recipe": CASES[name]["recipe"], "arch": arch["name"], "text_len": text_len,
            "lora_rank": CASES[name]["lora_rank"], "fsdp": bool(cfg.parallel.fsdp_one_process)}
    res = it.time_trainer(trainer, cfg, name, info, reps=1, overrides=over, fsdp=info["fsdp"])
    del trainer
    planned = P.plan(cfg, 1, gpu_mem_gib, arch=arch, text_len=text_len)
    first = res["first_iteration"]
    measured_gib = res["peak_mem_mib"] / 1024
    out = {
        "case": name, "dry_run": dry, "device": str(device), "config": res["config"],
        "seconds_per_iteration": res["iteration_s"]["total"],
        "seconds_split": res["iteration_s"], "bare_model_s": res["bare_s"]["total"],
        "overhead_ratio": res["overhead_ratio"]["overall"], "overhead_ratio_est_null_model": res["overhead_ratio_est"],
        "first_ratio_dev": first["train/first_ratio_dev"], "first_loss": first["train/loss"],
        "peak_mem_gib": measured_gib, "peak_mem_kind": res["peak_mem_kind"],
        "planner": {"peak_gib": planned.memory_gib["peak"], "memory_gib": planned.memory_gib,
                    "seconds": planned.seconds, "fits": planned.fits, "params": planned.params,
                    "throughput": planned.throughput},
        "planned_over_measured_peak": planned.memory_gib["peak"] / measured_gib if measured_gib else None,
    }
    if device.type == "cuda":  # the planner's projected seconds for this GPU kind, next to the measured ones
        kind = next((k for k in planned.seconds if k in torch.cuda.get_device_name(device)), None)
        if kind:
            out["planned_over_measured_seconds"] = planned.seconds[kind] / out["seconds_per_iteration"]
    return out
