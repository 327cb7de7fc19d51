"""Assembly of a training run, the same for every entry point, then the one loop (loop.fit).

``run(cfg, build_adapter, prompts)`` does, in order: process group from the torchrun environment (or one
process) -> ParallelDims checked against the world size -> named mesh -> identical model init on every
rank (``torch.manual_seed(train.seed)`` before ``build_adapter``) -> prompt sets -> parallelisation
(AC -> SP -> FSDP2) -> ``GRPOTrainer`` (its AdamW over the sharded parameters) -> per-dp-rank seeding ->
resume (``train.resume``) -> the output folder (config.yaml, metrics.jsonl trimmed on resume) -> the
standard components (NaN guard, evaluator, sample writer, logger, checkpointer, exporter) plus any the
caller adds -> ``fit`` -> summary.json -> barrier + destroy_process_group.

Used by ``train.py`` (real models, precomputed embeddings), ``toy/demo.py`` (the CPU demo) and
``train_scripts/train_toy_distributed.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .config import RunConfig, save_config
from .distributed.collectives import reduce_metrics
from .distributed.fsdp import parallelize
from .distributed.init import DistEnv, init_distributed, shutdown
from .distributed.parallel_dims import ParallelDims, parallel_dims_from_config
from .distributed.seeding import seed_rank_generators
from .loop import (Checkpointer, Component, Evaluator, Exporter, Logger, NaNGuard, SampleWriter, fit,
                   prepare_metrics_file)
from .models.base import PolicyAdapter


@dataclass
class PromptSets:
    """Training and held-out prompts, and how to turn prompts into conditioning."""

    train: Sequence[str]
    held: Sequence[str] = ()
    encode: Optional[Callable] = None  # None: the adapter's own ``encode_prompts``


#: the prompts of a run: fixed sets, or built from the adapter (e.g. embeddings checked against it)
Prompts = Union[PromptSets, Callable[[PolicyAdapter], PromptSets]]


@dataclass
class RunParts:
    """What ``run`` built, handed to ``extra_components`` so callers can add their own components."""

    cfg: RunConfig
    trainer: object
    env: DistEnv
    dims: ParallelDims
    prompts: PromptSets
    out: Path
    evaluator: Evaluator
    reward_fns: Dict = field(default_factory=dict)
    eval_fns: Dict = field(default_factory=dict)


def build_trainer(cfg: RunConfig, env: DistEnv, build_adapter: Callable[[torch.device], PolicyAdapter],
                  prompts: Prompts, reward_fns=None, reward_weights=None):
    """(GRPOTrainer, ParallelDims, PromptSets) for this rank (collective)."""
    from .data.prompt_source import PromptSource
    from .rewards.build import build_reward_fns
    from .trainer import GRPOTrainer

    dims = parallel_dims_from_config(cfg.parallel, env.world_size)
    one_process = bool(cfg.parallel.fsdp_one_process)
    if one_process and not dist.is_initialized():
        raise ValueError("parallel.fsdp_one_process needs a process group: launch with torchrun --nproc_per_node=1")
    dims.build_mesh(env.device.type, one_process=one_process)
    if reward_fns is None:
        reward_fns, reward_weights = build_reward_fns(cfg.rewards)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    adapter = build_adapter(env.device)
    sets = prompts(adapter) if callable(prompts) else prompts
    if isinstance(sets, (list, tuple)):
        sets = PromptSets(train=list(sets))
    if sets.encode is None:
        sets.encode = adapter.encode_prompts
    parallelize(adapter, dims, cfg.parallel, env.device)
    dp_rank = dims.dp_rank(env.rank)
    source = PromptSource(sets.train, sets.encode, seed=cfg.train.seed, dp_rank=dp_rank, dp_size=dims.dp)
    trainer = GRPOTrainer(cfg, adapter, reward_fns, reward_weights or {k: 1.0 for k in reward_fns}, source,
                          dp_group=dims.group("dp") if dims.dp > 1 else None)
    seed_rank_generators(trainer, cfg.train.seed, dp_rank)
    return trainer, dims, sets


def resume_trainer(trainer, resume, cfg: RunConfig, dims: ParallelDims, env: DistEnv) -> None:
    """Load a DCP checkpoint into ``trainer``; on another world size, reseed the per-rank streams."""
    from .checkpoint import load_trainer_checkpoint

    if not load_trainer_checkpoint(trainer, resume):
        seed_rank_generators(trainer, cfg.train.seed, dims.dp_rank(env.rank), trainer.iteration)
    if env.is_main:
        print(f"resumed from {resume} at iteration {trainer.iteration}", flush=True)


def run(cfg: RunConfig, build_adapter: Callable[[torch.device], PolicyAdapter], prompts: Prompts, *,
        reward_fns=None, reward_weights=None, eval_fns=None, stop_after: Optional[int] = None,
        extra_components: Optional[Callable[[RunParts], List[Component]]] = None, keep_eval_images: bool = False,
        on_built: Optional[Callable[[RunParts], None]] = None) -> Dict:
    """Train per ``cfg``; returns the summary on every rank (also written to ``<output_dir>/summary.json``).

    ``stop_after``: stop once this iteration is done, as a preempted job would (tests of resume).
    ``keep_eval_images``: the evaluator keeps the first and last evaluations' samples.
    """
    env = init_distributed(cfg.train.device)
    try:
        summary = _run(cfg, env, build_adapter, prompts, reward_fns, reward_weights, eval_fns, stop_after,
                       extra_components, keep_eval_images, on_built)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: other ranks may be stuck in a collective
        raise
    shutdown()
    return summary


def _run(cfg, env, build_adapter, prompts, reward_fns, reward_weights, eval_fns, stop_after, extra_components,
         keep_eval_images, on_built) -> Dict:
    from .checkpoint import resolve_resume
    from .evaluate import distributed_evaluate, frames_for_grid
    from .io import atomic_write_json
    from .metrics import save_image_grid
    from .rewards.build import build_eval_reward_fns, build_reward_fns

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    resume = resolve_resume(cfg.train.resume, ckpt_root)  # FileNotFoundError before the model is loaded
    main_rank = env.is_main
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if reward_fns is None:  # before the policy: missing reward weights fail fast
        reward_fns, reward_weights = build_reward_fns(cfg.rewards)
    if eval_fns is None:
        eval_fns = build_eval_reward_fns(cfg, reward_fns)
    trainer, dims, sets = build_trainer(cfg, env, build_adapter, prompts, reward_fns, reward_weights)
    if resume is not None:
        resume_trainer(trainer, resume, cfg, dims, env)
    adapter, dp_rank = trainer.adapter, dims.dp_rank(env.rank)
    prior_rows = prepare_metrics_file(out, trainer.iteration if resume is not None else None) if main_rank else []

    eval_steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    n_eval = cfg.train.num_eval_prompts
    held = list(sets.held)[:n_eval] if n_eval else list(sets.held)
    grid_prompts = (held or list(sets.train))[: cfg.eval.num_sample_prompts]
    ev_kw = dict(samples_per_prompt=cfg.eval.samples_per_prompt, batch_size=cfg.eval.batch_size,
                 seed=cfg.eval.seed, dp_rank=dp_rank, dp_size=dims.dp, autocast_dtype=trainer.autocast_dtype,
                 max_frames=cfg.eval.max_frames_in_grid)

    def evaluate(images: bool) -> Dict:
        return distributed_evaluate(adapter, held, eval_fns, eval_steps, sets.encode, return_images=images,
                                    **ev_kw) if held else {}

    def write_samples(step: int) -> None:
        if not grid_prompts:
            return
        ev = distributed_evaluate(adapter, grid_prompts, eval_fns, eval_steps, sets.encode, return_images=True,
                                  **dict(ev_kw, samples_per_prompt=1))
        if main_rank and "images" in ev:
            imgs, nrow = frames_for_grid(ev["images"], cfg.eval.max_frames_in_grid)
            labels = [f"{p[:40]} | " + " ".join(f"{k}={v[i]:.3f}" for k, v in ev["per_sample"].items())
                      for i, p in enumerate(ev["prompts"])]
            if nrow == 1:  # images: one row of all prompts
                nrow, labels = len(ev["prompts"]), None
            save_image_grid(imgs, out / "samples" / f"iter_{step:06d}.png", nrow=nrow, upscale=1, row_labels=labels)

    evaluator = Evaluator(evaluate, cfg.train.eval_every, keep_images_at_ends=keep_eval_images, prior_rows=prior_rows)
    lg = cfg.log
    components: List[Component] = [
        NaNGuard(),
        evaluator,
        SampleWriter(write_samples, cfg.train.sample_every),
        Logger(out, enabled=main_rank, reward_keys=[f"reward/{k}/mean" for k in reward_fns],
               log_every=cfg.train.log_every, curve_every=lg.curve_every, curve_window=lg.curve_window,
               tensorboard=lg.tensorboard, wandb_project=lg.wandb_project, progress=lg.progress,
               total=cfg.train.num_iterations, initial=trainer.iteration, prior_rows=prior_rows),
        Checkpointer(ckpt_root, cfg.train.save_every, cfg.train.keep_last_checkpoints,
                     resumed_at=trainer.iteration if resume is not None else None),
    ]
    if cfg.train.export:
        components.append(Exporter(out / "export"))
    parts = RunParts(cfg, trainer, env, dims, sets, out, evaluator, reward_fns, eval_fns)
    if extra_components is not None:
        components += list(extra_components(parts))
    if on_built is not None:
        on_built(parts)
    if main_rank:
        g = cfg.grpo
        print(f"{cfg.model.name}: {env.world_size} process(es), dp={dims.dp} sp={dims.sp}; {len(sets.train)} train / "
              f"{len(sets.held)} held-out prompts; per iteration {g.prompts_per_iteration} prompts/rank x "
              f"G={g.group_size} = {g.prompts_per_iteration * g.group_size * dims.dp} samples globally", flush=True)

    def per_iteration(m: Dict) -> None:
        m["samples_per_s_global"] = m.get("samples_per_s", 0.0) * dims.dp
        m["world_size"] = env.world_size

    summary = fit(trainer, components, total=cfg.train.num_iterations, out=out, is_main=main_rank,
                  last_checkpoint=str(resume) if resume is not None else None, stop_after=stop_after,
                  reduce=reduce_metrics, per_iteration=per_iteration)
    summary["world_size"] = env.world_size
    if main_rank:
        atomic_write_json(out / "summary.json", summary)
    return summary
