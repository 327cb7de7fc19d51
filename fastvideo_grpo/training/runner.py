"""Assembly of a training run, the same for every entry point, then the one loop (loop.fit).

``run(cfg, build_adapter, prompts)`` does, in order: process group from the torchrun environment (or one
process) -> ParallelDims checked against the world size -> named mesh -> identical model init on every
rank (``torch.manual_seed(train.seed)`` before ``build_adapter``) -> prompt sets -> parallelisation
(AC -> SP -> FSDP2) -> ``Trainer`` (its AdamW over the sharded parameters) -> per-dp-rank seeding ->
resume (``train.resume``; a folder that a graceful stop left is resumed without it, preemption.py) -> the output
folder (one run at a time: a lock; a used folder only with ``--resume`` / ``--overwrite``; config.yaml recorded
once built; metrics.jsonl trimmed on resume) -> the standard components (EMA update, NaN guard, evaluator, sample
writer, logger, graceful stop, checkpointer, exporter) plus any the caller adds -> ``fit`` (SIGTERM / SIGINT
handled) -> summary.json (+ stopped.json and one line after a graceful stop, which then raises
``preemption.RunStopped``) -> barrier + destroy_process_group.

Used by ``cli/train.py`` (real models, precomputed embeddings), ``cli/demo.py`` (the CPU demo) and
``train_scripts/train_toy_distributed.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..distributed.collectives import any_rank, reduce_metrics
from ..distributed.fsdp import parallelize
from ..distributed.heartbeat import active as active_heartbeat, is_collective_failure, start_heartbeat
from ..distributed.init import DistEnv, init_distributed, shutdown
from ..distributed.parallel_dims import ParallelDims, parallel_dims_from_config
from ..distributed.seeding import seed_rank_generators
from .loop import (Checkpointer, Component, EMAUpdate, Evaluator, Exporter, Logger, NaNGuard, SampleWriter, fit,
                   prepare_metrics_file)
from . import preemption
from ..models.base import PolicyAdapter
from .run_folder import RunLock, check_fresh_start, check_resume_settings, clear_run, record_config, remove_leftovers
from .watchdog import build_watchdog
from ..utils.diskspace import is_out_of_space
from ..utils.threads import set_num_threads


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
    """(Trainer, ParallelDims, PromptSets) for this rank (collective)."""
    from ..data.prompt_source import PromptSource
    from ..rewards.build import build_reward_fns
    from .trainer import Trainer

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
    trainer = Trainer(cfg, adapter, reward_fns, reward_weights or {k: 1.0 for k in reward_fns}, source,
                          dp_group=dims.group("dp") if dims.dp > 1 else None)
    seed_rank_generators(trainer.generator, cfg.train.seed, dp_rank)
    trainer.throughput.gpus_per_sample = dims.sp  # the sp ranks of a group share each sample's work
    trainer.show_progress = bool(cfg.log.progress) and env.is_main
    return trainer, dims, sets


_MISMATCH = ("Missing key", "Unexpected key", "size mismatch", "shape mismatch", "does not match")


def _describe(error: BaseException) -> str:
    """One line for a load error: DCP wraps the cause in a multi-line CheckpointException."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if any(m in ln for m in _MISMATCH)), None)
    cause = cause or next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), None) or (lines or [""])[0]
    return f"{type(error).__name__}: {cause[:300]}"


def resume_trainer(trainer, resume: Path, cfg: RunConfig, dims: ParallelDims, env: DistEnv) -> Path:
    """Load a DCP checkpoint into ``trainer``; on another world size, reseed the per-rank streams.

    A checkpoint that cannot be read (a truncated shard or extra file) is named with the error and the
    previous checkpoint; with ``train.resume: auto`` the newest readable older one is used instead,
    with a warning. A checkpoint of another model (LoRA toggled, another family) is a ValueError saying
    so. Returns the checkpoint actually loaded."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    from .checkpoint import checkpoints_up_to, load_trainer_checkpoint

    step = int(resume.name.split("_")[1]) if resume.name.startswith("step_") else None
    older = [p for p in reversed(checkpoints_up_to(resume.parent, step - 1))] if step is not None else []
    candidates = [resume] + (older if cfg.train.resume == "auto" else [])
    for i, path in enumerate(candidates):
        error = None
        try:
            exact = load_trainer_checkpoint(trainer, path)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            error = e
        if not any_rank(error is not None):
            if not exact:
                seed_rank_generators(trainer.generator, cfg.train.seed, dims.dp_rank(env.rank), trainer.iteration)
            if env.is_main:
                print(f"resumed from {path} at iteration {trainer.iteration}", flush=True)
            return path
        what = _describe(error) if error is not None else "failed on another rank"
        if error is not None and any(m in str(error) for m in _MISMATCH):
            raise ValueError(f"checkpoint {path} does not match the model of this config ({what}); was it written "
                             "with other model.kwargs (LoRA on/off, lora_rank, another model)? Resume with the run's "
                             "own config.yaml, or start a fresh run") from error
        if i + 1 < len(candidates):
            warnings.warn(f"checkpoint {path} cannot be read ({what}); --resume auto falls back to "
                          f"{candidates[i + 1]}", stacklevel=2)
            continue
        prev = older[0] if older and cfg.train.resume != "auto" else None
        hint = (f"; the previous checkpoint is {prev}: resume from it with --resume {prev} (or --resume auto, "
                "which falls back by itself)") if prev else "; no older readable checkpoint is left"
        raise ValueError(f"checkpoint {path} cannot be read ({what}){hint}") from error
    raise AssertionError("unreachable")


@dataclass
class RunSpec:
    """What ``run`` trains besides the config: the policy's factory and the prompts, and what a caller may
    supply instead of the config's (rewards) or add (components, a callback once everything is built)."""

    build_adapter: Callable[[torch.device], PolicyAdapter]
    prompts: Prompts
    reward_fns: Optional[Dict] = None  # None: built from ``rewards``
    reward_weights: Optional[Dict] = None
    eval_fns: Optional[Dict] = None  # None: ``eval.rewards`` (or the training rewards, continuous)
    stop_after: Optional[int] = None  # stop once this iteration is done, as a preempted job would (resume tests)
    extra_components: Optional[Callable[[RunParts], List[Component]]] = None
    keep_eval_images: bool = False  # the evaluator keeps the first and last evaluations' samples
    on_built: Optional[Callable[[RunParts], None]] = None


@dataclass
class RunFolder:
    """Where the run writes (``train.output_dir``) and the checkpoint it resumes from (None: a fresh start)."""

    out: Path
    resume: Optional[Path] = None

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def run(cfg: RunConfig, build_adapter: Callable[[torch.device], PolicyAdapter], prompts: Prompts, **options) -> Dict:
    """Train per ``cfg``; returns the summary on every rank (also written to ``<output_dir>/summary.json``).
    ``options``: the optional fields of ``RunSpec``."""
    import time

    spec = RunSpec(build_adapter, prompts, **options)
    started = time.monotonic()  # train.max_wall_time counts from here
    env = init_distributed(cfg.train.device, timeout_s=cfg.parallel.init_timeout_s)
    # the stall watch (distributed/heartbeat.py): names a rank that stops answering or falls behind, exit status 6
    hb = start_heartbeat(env.rank, env.world_size, init_timeout_s=cfg.parallel.init_timeout_s,
                         train_timeout_s=cfg.parallel.train_timeout_s, resume_hint=lambda: _resume_hint(cfg))
    try:
        summary = _run(cfg, env, spec, started)
    except BaseException as e:
        if hb is not None:
            hb.stop()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: other ranks may be stuck in a collective
        from .loop import EXIT_NO_SPACE, EXIT_STALLED, TrainingStopped

        if is_out_of_space(e):  # any write of the run: one line, the last whole checkpoint kept
            from .checkpoint import no_space_message

            raise TrainingStopped(no_space_message(e, cfg.train.output_dir), EXIT_NO_SPACE) from e
        if hb is not None and is_collective_failure(e):  # timed out, or a peer went away: which rank, where
            raise TrainingStopped(hb.describe_failure(e), EXIT_STALLED) from e
        raise
    if hb is not None:
        hb.mark("end", summary.get("iteration", 0))
    shutdown(before_destroy=hb.stop if hb is not None else None)
    request = summary.get("stop_request")
    if request:  # a graceful stop (signal, stop file, time budget): saved, said, then train.stop_exit_code
        raise preemption.RunStopped(request["line"], request["exit_code"], announced=True)
    if summary.get("stopped"):  # the watchdog's alarm with train.watchdog.stop: saved, then a documented exit
        from .loop import EXIT_WATCHDOG, TrainingStopped

        raise TrainingStopped(summary["stopped"], EXIT_WATCHDOG)
    return summary


def _resume_hint(cfg: RunConfig) -> str:
    """How to continue after a stall: the checkpoint a rerun with --resume latest starts from."""
    from .checkpoint import latest_complete

    last = latest_complete(Path(cfg.train.output_dir) / "checkpoints")
    where = f"from {last}" if last is not None else "(no checkpoint was written yet: it starts over)"
    return f"rerun the same command with --resume latest to continue {where}"


def _run(cfg: RunConfig, env: DistEnv, spec: RunSpec, started: float) -> Dict:
    """The output folder's checks and lock around the run (before the model is loaded)."""
    from .checkpoint import resolve_resume
    from .metrics import check_loggers

    check_loggers(cfg.log)  # a requested logger that is not installed: an error before anything is loaded
    set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.train.output_dir)
    resume = preemption.resume_after_stop(cfg.train.resume, out, env.is_main)  # the same command resumes a stop
    folder = RunFolder(out, resolve_resume(resume, out / "checkpoints"))  # FileNotFoundError first
    check_fresh_start(out, resuming=folder.resume is not None, overwrite=cfg.train.overwrite)
    if folder.resume is not None:
        check_resume_settings(cfg, out)
    lock = RunLock(out, enabled=env.is_main).acquire()
    if active_heartbeat() is not None:  # a stall ends the process at once: release the folder first
        active_heartbeat().before_exit.append(lock.release)
    try:
        if env.is_main:
            gone = remove_leftovers(out)
            if gone:
                print(f"removed {len(gone)} temporary file(s) left by an interrupted run in {out}: "
                      f"{', '.join(str(p.relative_to(out)) for p in gone[:5])}{' ...' if len(gone) > 5 else ''}",
                      flush=True)
        return _run_locked(cfg, env, spec, folder, started)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, env: DistEnv, spec: RunSpec, folder: RunFolder, started: float) -> Dict:
    from ..utils.io import atomic_write_json
    from ..rewards.build import build_eval_reward_fns, build_reward_fns

    main_rank, out = env.is_main, folder.out
    reward_fns, reward_weights = spec.reward_fns, spec.reward_weights
    if reward_fns is None:  # before the policy: missing reward weights fail fast
        reward_fns, reward_weights = build_reward_fns(cfg.rewards)
    eval_fns = spec.eval_fns if spec.eval_fns is not None else build_eval_reward_fns(cfg, reward_fns)
    trainer, dims, sets = build_trainer(cfg, env, spec.build_adapter, spec.prompts, reward_fns, reward_weights)
    resumed = folder.resume is not None
    if resumed:
        folder.resume = resume_trainer(trainer, folder.resume, cfg, dims, env)
    if main_rank:  # everything is built and loaded: only now does the folder change
        if cfg.train.overwrite and not resumed:
            clear_run(out)
        record_config(cfg, out, resumed=resumed)
    prior_rows = (prepare_metrics_file(out, trainer.iteration if resumed else None, cfg.train.num_iterations)
                  if main_rank else [])
    watchdog, gold_fns = (build_watchdog(cfg, trainer, out, main_rank, trainer.iteration if resumed else None)
                          if cfg.train.watchdog.enabled else (None, {}))
    image_sinks: List[Callable] = []  # where sample grids go besides samples/ (TensorBoard / wandb)
    evaluate, write_samples = _evaluation(cfg, trainer, sets, eval_fns, dims, env, out, gold_fns, image_sinks)
    evaluator = Evaluator(watchdog.wrap(evaluate) if watchdog else evaluate, cfg.train.eval_every,
                          keep_images_at_ends=spec.keep_eval_images, prior_rows=prior_rows)
    components = _standard_components(cfg, trainer, folder, evaluator, write_samples, reward_fns, main_rank,
                                      prior_rows, watchdog, image_sinks)
    signals = preemption.StopSignals(env.rank)
    checkpointer = next(c for c in components if isinstance(c, Checkpointer))
    stop_file = _stop_file(cfg, out)
    graceful = preemption.GracefulStop(signals, stop_file=stop_file, max_wall_time=cfg.train.max_wall_time,
                                       started=started, save_seconds=lambda: checkpointer.seconds,
                                       exit_code=cfg.train.stop_exit_code)
    components.insert(components.index(checkpointer), graceful)  # decides before the checkpointer saves
    parts = RunParts(cfg, trainer, env, dims, sets, out, evaluator, reward_fns, eval_fns)
    if spec.extra_components is not None:
        components += list(spec.extra_components(parts))
    if spec.on_built is not None:
        spec.on_built(parts)
    if main_rank:
        g = cfg.grpo
        print(f"{cfg.model.name}: {env.world_size} process(es), dp={dims.dp} sp={dims.sp}; {len(sets.train)} train / "
              f"{len(sets.held)} held-out prompts; per iteration {g.prompts_per_iteration} prompts/rank x "
              f"G={g.group_size} = {g.prompts_per_iteration * g.group_size * dims.dp} samples globally", flush=True)

    def per_iteration(m: Dict) -> None:
        m["samples_per_s_global"] = m.get("samples_per_s", 0.0) * dims.dp
        m["world_size"] = env.world_size
        if active_heartbeat() is not None:  # after the first iteration: parallel.train_timeout_s
            active_heartbeat().first_iteration_done()

    with signals:  # SIGTERM / SIGINT: stop after the iteration, saved (preemption.py)
        summary = fit(trainer, components, total=cfg.train.num_iterations, out=out, is_main=main_rank,
                      last_checkpoint=str(folder.resume) if resumed else None, stop_after=spec.stop_after,
                      reduce=reduce_metrics, per_iteration=per_iteration)
        summary["world_size"] = env.world_size
        if not summary["last_metrics"] and prior_rows:  # resumed at the end: the last iteration's, from the file
            last = [r for r in prior_rows if "time/iteration" in r]
            summary["last_metrics"] = {k: v for k, v in last[-1].items() if k != "step"} if last else {}
        request = summary.get("stop_request")
        if main_rank:
            atomic_write_json(out / "summary.json", summary)
        line = preemption.finish(request, summary, out, is_main=main_rank, total=cfg.train.num_iterations,
                                 stop_file=stop_file)
        if request is not None:
            request["line"] = line
    return summary


def _stop_file(cfg: RunConfig, out: Path) -> Optional[Path]:
    """``train.stop_file`` as a path (relative: inside the output folder); None when unset."""
    if not cfg.train.stop_file:
        return None
    path = Path(cfg.train.stop_file)
    return path if path.is_absolute() else out / path


def _evaluation(cfg: RunConfig, trainer, sets: PromptSets, eval_fns: Dict, dims: ParallelDims, env: DistEnv,
                out: Path, gold_fns: Dict, image_sinks: Sequence[Callable] = ()):
    """(held-out evaluation, sample-grid writer) of the run, both with the EMA weights when it keeps them; the
    held-out evaluation also scores the watchdog's gold rewards (``gold_fns``, keyed ``gold/<key>``)."""
    from .ema import weights_for_eval
    from .evaluate import distributed_evaluate, frames_for_grid
    from .metrics import save_image_grid

    eval_steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    n_eval = cfg.train.num_eval_prompts
    held = list(sets.held)[:n_eval] if n_eval else list(sets.held)
    grid_prompts = (held or list(sets.train))[: cfg.eval.num_sample_prompts]
    ev_kw = dict(samples_per_prompt=cfg.eval.samples_per_prompt, batch_size=cfg.eval.batch_size,
                 seed=cfg.eval.seed, dp_rank=dims.dp_rank(env.rank), dp_size=dims.dp,
                 autocast_dtype=trainer.autocast_dtype, max_frames=cfg.eval.max_frames_in_grid, **trainer.memory)
    progress = bool(cfg.log.progress) and env.is_main

    def evaluate(images: bool) -> Dict:
        if not held:
            return {}
        with weights_for_eval(trainer.ema):
            return distributed_evaluate(trainer.adapter, held, {**eval_fns, **gold_fns}, eval_steps, sets.encode,
                                        return_images=images, progress=progress, **ev_kw)

    def write_samples(step: int) -> None:
        if not grid_prompts:
            return
        with weights_for_eval(trainer.ema):
            ev = distributed_evaluate(trainer.adapter, grid_prompts, eval_fns, eval_steps, sets.encode,
                                      return_images=True, **dict(ev_kw, samples_per_prompt=1))
        if env.is_main and "images" in ev:
            imgs, nrow = frames_for_grid(ev["images"], cfg.eval.max_frames_in_grid)
            labels = [f"{p[:40]} | " + " ".join(f"{k}={v[i]:.3f}" for k, v in ev["per_sample"].items())
                      for i, p in enumerate(ev["prompts"])]
            if nrow == 1:  # images: one row of all prompts
                nrow, labels = len(ev["prompts"]), None
            grid = save_image_grid(imgs, out / "samples" / f"iter_{step:06d}.png", nrow=nrow, upscale=1,
                                   row_labels=labels)
            for sink in image_sinks:
                sink("samples", grid, step)

    return evaluate, write_samples


def _standard_components(cfg: RunConfig, trainer, folder: RunFolder, evaluator: Evaluator, write_samples,
                         reward_fns: Dict, main_rank: bool, prior_rows, watchdog=None,
                         image_sinks: Optional[List[Callable]] = None) -> List[Component]:
    """The components every run has, in the order they must run (loop.py)."""
    from ..config import to_dict
    from ..distributed.collectives import any_rank
    from .ema import weights_for_eval

    lg, resumed_at = cfg.log, trainer.iteration if folder.resume is not None else None
    logger = Logger(folder.out, enabled=main_rank, reward_keys=[f"reward/{k}/mean" for k in reward_fns],
                    log_every=cfg.train.log_every, curve_every=lg.curve_every, curve_window=lg.curve_window,
                    tensorboard=lg.tensorboard, wandb_project=lg.wandb_project, progress=lg.progress,
                    total=cfg.train.num_iterations, initial=trainer.iteration, prior_rows=prior_rows,
                    run_name=lg.run_name, config=to_dict(cfg))
    images = any_rank(logger.logger.wants_images)  # every rank samples the grid (collective); rank 0 logs it
    if images and image_sinks is not None:
        image_sinks.append(logger.log_image)
    components: List[Component] = [
        EMAUpdate(),  # first: the evaluator, exporter and checkpointer see this iteration's average
        NaNGuard(),
        evaluator,
        *([watchdog] if watchdog else []),  # right after the evaluator: it reads that evaluation (train.watchdog)
        SampleWriter(write_samples, cfg.train.sample_every, at_evaluations=images, eval_every=cfg.train.eval_every),
        logger,
        Checkpointer(folder.checkpoints, cfg.train.save_every, cfg.train.keep_last_checkpoints, resumed_at=resumed_at),
    ]
    if cfg.train.export:
        from .export import export_options

        weights = "ema" if trainer.ema is not None else "raw"
        components.append(Exporter(folder.out / "export", weights=lambda: weights_for_eval(trainer.ema),
                                   options=lambda st: export_options(cfg, st.trainer.adapter, st.out, st.iteration,
                                                                     weights)))
    return components
