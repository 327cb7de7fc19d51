"""The distributed entry point: the same GRPOTrainer single-process or under torchrun.

``run_distributed(cfg, build_adapter, prompts)`` does, in order: process group from the torchrun
environment (init.py) -> ParallelDims checked against the world size -> named mesh -> identical model
init on every rank (``torch.manual_seed(train.seed)`` before ``build_adapter``) -> ``parallelize``
(AC -> SP -> FSDP2) -> ``DistributedPromptSource`` -> ``GRPOTrainer`` (its AdamW is built on the sharded
parameters) -> per-dp-rank seeding -> optional resume -> the loop with metrics averaged over ranks,
logging on rank 0, DCP checkpoints every ``train.save_every`` iterations and at the end -> export of
the trained weights (safetensors) -> barrier + destroy_process_group.

Without torchrun variables it runs as one process (no FSDP, same code path).

``grpo.advantage: global`` (DDPO-style ablation) normalises over the global batch: the trainer
all-gathers the rewards over the dp group. Group-relative advantages need no communication.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoint import export_weights, load_trainer_checkpoint, resolve_resume, save_trainer_checkpoint
from ..config import RunConfig, save_config
from ..models.base import PolicyAdapter
from .fsdp import parallelize
from .init import DistEnv, init_distributed, shutdown
from .parallel_dims import ParallelDims, parallel_dims_from_config
from .sampler import DistributedPromptSource, rank_seed, reduce_metrics


def seed_rank_generators(trainer, seed: int, dp_rank: int, iteration: int = 0) -> int:
    """Seed the trainer's generator and torch's global RNG for dp group ``dp_rank`` (sp peers equal).

    ``iteration`` > 0 is used after resuming on a different world size, where saved per-rank RNG
    states cannot be matched to ranks: the new streams are still distinct per rank and reproducible.
    """
    s = rank_seed(seed + 7_919 * iteration, dp_rank)
    trainer.generator.manual_seed(s)
    torch.manual_seed(s)
    return s


def build_trainer(cfg: RunConfig, env: DistEnv, build_adapter: Callable[[torch.device], PolicyAdapter],
                  prompts, reward_fns=None, reward_weights=None) -> "tuple[object, ParallelDims]":
    """ParallelDims + parallelised adapter + GRPOTrainer for this rank (collective).

    ``prompts``: the training prompts (encoded with ``adapter.encode_prompts``), or a callable
    ``adapter -> (prompts, encode)`` run on the built adapter before it is parallelised (e.g. prompts
    read from a precomputed-embeddings manifest checked against the adapter).
    """
    from ..trainer import GRPOTrainer, build_reward_fns

    dims = parallel_dims_from_config(cfg.parallel, env.world_size)
    one_process = bool(cfg.parallel.fsdp_one_process)
    if one_process and not dist.is_initialized():
        raise ValueError("parallel.fsdp_one_process needs a process group: launch with torchrun --nproc_per_node=1")
    dims.build_mesh(env.device.type, one_process=one_process)
    if reward_fns is None:
        reward_fns, reward_weights = build_reward_fns(cfg.rewards)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    adapter = build_adapter(env.device)
    train_prompts, encode = prompts(adapter) if callable(prompts) else (prompts, adapter.encode_prompts)
    parallelize(adapter, dims, cfg.parallel, env.device)
    dp_rank = dims.dp_rank(env.rank)
    source = DistributedPromptSource(train_prompts, encode, seed=cfg.train.seed, dp_rank=dp_rank, dp_size=dims.dp)
    trainer = GRPOTrainer(cfg, adapter, reward_fns, reward_weights or {k: 1.0 for k in reward_fns}, source,
                          dp_group=dims.group("dp") if dims.dp > 1 else None)
    seed_rank_generators(trainer, cfg.train.seed, dp_rank)
    return trainer, dims


def resume_trainer(trainer, resume, cfg: RunConfig, dims: ParallelDims, env: DistEnv) -> None:
    """Load a DCP checkpoint into ``trainer``; on another world size, reseed the per-rank streams."""
    if not load_trainer_checkpoint(trainer, resume):
        seed_rank_generators(trainer, cfg.train.seed, dims.dp_rank(env.rank), trainer.iteration)
    if env.is_main:
        print(f"resumed from {resume} at iteration {trainer.iteration}", flush=True)


def run_distributed(cfg: RunConfig, build_adapter: Callable[[torch.device], PolicyAdapter], prompts: Sequence[str], *,
                    reward_fns=None, reward_weights=None, stop_after: Optional[int] = None, export: bool = True,
                    on_metrics: Optional[Callable[[Dict, object], None]] = None, progress: bool = False) -> List[Dict]:
    """Train ``cfg.train.num_iterations`` iterations (resuming per ``cfg.train.resume``); returns the
    rank-averaged metrics of the iterations run by this call (on every rank).

    ``stop_after``: stop once this iteration is reached (after its checkpoint, if one is due),
    as a preempted job would; ``export`` writes ``<output_dir>/export`` when training completes;
    ``on_metrics(metrics, trainer)`` is called on every rank after each iteration (may be collective).
    """
    env = init_distributed(cfg.train.device)
    try:
        history = _run(cfg, env, build_adapter, prompts, reward_fns, reward_weights, stop_after, export, on_metrics,
                       progress)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may be stuck elsewhere
        raise
    shutdown()
    return history


def _run(cfg, env, build_adapter, prompts, reward_fns, reward_weights, stop_after, export, on_metrics, progress):
    from ..metrics import MetricsLogger

    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    resume = resolve_resume(cfg.train.resume, ckpt_root)  # FileNotFoundError before any heavy work
    trainer, dims = build_trainer(cfg, env, build_adapter, prompts, reward_fns, reward_weights)
    if resume is not None:
        resume_trainer(trainer, resume, cfg, dims, env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out, enabled=env.is_main, tensorboard=bool(cfg.extra.get("tensorboard", False)))
    history: List[Dict] = []
    last_saved = trainer.iteration if resume is not None else -1
    total = cfg.train.num_iterations
    while trainer.iteration < total:
        t0 = time.perf_counter()
        m = reduce_metrics(trainer.train_iteration())
        m["time/iteration"] = time.perf_counter() - t0
        m["world_size"] = env.world_size
        history.append(m)
        if on_metrics is not None:
            on_metrics(m, trainer)
        if trainer.iteration % max(1, cfg.train.log_every) == 0:
            logger.log(m, step=trainer.iteration)
            if progress and env.is_main:
                print(f"iter {trainer.iteration}/{total} loss {m['train/loss']:.6f} "
                      f"reward {_first_reward(m):.4f}", flush=True)
        every = cfg.train.save_every
        if (every and trainer.iteration % every == 0) or (trainer.iteration == total):
            save_trainer_checkpoint(trainer, ckpt_root, keep_last=cfg.train.keep_last_checkpoints)
            last_saved = trainer.iteration
        if stop_after is not None and trainer.iteration >= stop_after:
            break
    if trainer.iteration >= total and last_saved != trainer.iteration:
        save_trainer_checkpoint(trainer, ckpt_root, keep_last=cfg.train.keep_last_checkpoints)
    if export and trainer.iteration >= total:
        export_weights(trainer.adapter, out / "export")
    logger.close()
    return history


def _first_reward(m: Dict) -> float:
    for k, v in m.items():
        if k.startswith("reward/") and k.endswith("/mean"):
            return float(v)
    return float("nan")
