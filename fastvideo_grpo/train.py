"""The one training entry point for every model family: ``main(argv)`` used by all train scripts.

``python train_scripts/train_<model>_grpo.py --config configs/<recipe>.yaml [--section.field=value ...]``
or the same under ``torchrun``. In order:

1. config: YAML + ``--section.field=value`` overrides, validated (unknown keys / wrong types rejected);
2. preflight, BEFORE any heavy work: every path in ``model.kwargs`` / reward kwargs exists, the
   embeddings manifest (``data.manifest``) and its shard files exist; a missing piece is a
   FileNotFoundError naming it and what to do;
3. process group from the torchrun environment (``distributed.init``) or a single process;
4. the policy from ``model.name`` / ``model.kwargs`` through ``ADAPTERS`` (LoRA via ``lora_rank`` in
   ``model.kwargs``), identical on every rank; the manifest validated against the adapter's
   ``cond_spec()``; held-out split; parallelisation (AC -> SP -> FSDP2); rewards; ``GRPOTrainer``;
5. ``--resume`` (checkpoint folder, ``latest`` = error when none, ``auto``) through ``checkpoint.py``;
6. the loop: metrics averaged over ranks; rank 0 logs (tqdm bar with ETA, metrics.jsonl, TensorBoard,
   wandb when configured, reward_curve.png with a moving average); DCP checkpoints every
   ``train.save_every`` iterations and at the end; held-out ODE evaluation every ``train.eval_every``
   iterations (and before / after); sample grids every ``train.sample_every`` iterations; final export.

Guard rails: a non-finite loss / gradient (FloatingPointError) or non-finite rewards (ValueError from
the reward checks) stop the run before anything new is saved, naming the last good checkpoint
(``TrainingStopped``; the scripts exit with status 3). CUDA out-of-memory is re-raised as
``TrainingStopped`` listing the config knobs that lower memory (exit status 4). Configuration and
missing-file errors exit with status 2 and the message (no traceback) when run through ``cli``.

Output folder (``train.output_dir``): config.yaml (fully resolved), metrics.jsonl, tensorboard/,
reward_curve.png, eval_curve.png, eval/iter_N.json, samples/iter_N.png, checkpoints/step_N/ +
checkpoints/latest, export/ (diffusers-format weights of the trained denoiser, or LoRA weights).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .config import RewardConfig, RunConfig, load_config, save_config

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_OOM = 4

#: model.kwargs / reward kwargs whose names end like this are paths that must exist at start-up
_PATH_SUFFIXES = ("_path", "checkpoint", "_dir", "_file")

OOM_HINT = (
    "CUDA ran out of memory. Lower memory with (any of): parallel.sp=<2|4|8> (Ulysses sequence parallel: "
    "splits the tokens of each sample over GPUs), parallel.activation_checkpointing=1.0 (recompute all "
    "transformer blocks in backward), parallel.cpu_offload=true (sharded params/grads/optimizer in CPU "
    "memory), fewer frames or a lower resolution (model.kwargs.num_frames / resolution, with matching "
    "embeddings for I2V), grpo.micro_batch_size=1 (samples per forward/backward in training), eval.batch_size=1, "
    "or LoRA (model.kwargs.lora_rank=64: no optimizer state for the base weights)."
)


class TrainingStopped(RuntimeError):
    """The run was stopped on purpose (divergence, OOM); ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- arguments


def recipe_path(name: str) -> str:
    """A recipe path relative to the working directory when it exists there, else to the repository."""
    if Path(name).is_file():
        return name
    return str(Path(__file__).resolve().parents[1] / name)


def build_parser(default_config: Optional[str] = None, description: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any config field can be overridden: --section.field=value (e.g. "
                                       "--grpo.group_size=12 --train.output_dir=outputs/x --rewards.0.weight=0.5).")
    p.add_argument("--config", default=default_config, help=f"YAML recipe (default: {default_config})")
    p.add_argument("--resume", default=None,
                   help="checkpoint folder, 'latest' (error when there is none) or 'auto' (latest if any); "
                        "sets train.resume")
    p.add_argument("--output-dir", default=None, help="sets train.output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (sets log.progress=false)")
    p.add_argument("--check", action="store_true",
                   help="only resolve the config and run the start-up checks (files present), then exit")
    return p


def parse_args(argv=None, default_config: Optional[str] = None, description: Optional[str] = None
               ) -> Tuple[argparse.Namespace, RunConfig]:
    args, overrides = build_parser(default_config, description).parse_known_args(argv)
    overrides = list(overrides)
    if args.resume is not None:
        overrides.append(f"--train.resume={args.resume}")
    if args.output_dir is not None:
        overrides.append(f"--train.output_dir={args.output_dir}")
    if args.no_progress:
        overrides.append("--log.progress=false")
    cfg = load_config(args.config, overrides)
    return args, cfg


# ----------------------------------------------------------------------------- preflight


def _path_like_values(kwargs: Dict, where: str):
    for k, v in (kwargs or {}).items():
        if isinstance(v, str) and v and (k.endswith(_PATH_SUFFIXES) or k == "checkpoint"):
            yield f"{where}.{k}", v


def _missing_subfolders(factory, model_path: str) -> List[str]:
    """Subfolders the adapter will load (``model_subfolder`` + ``vae``), read from the class the factory
    returns (its return annotation): checked here so that nothing heavy is loaded before the message."""
    import typing

    try:
        cls = typing.get_type_hints(factory).get("return")
    except Exception:
        return []
    sub = getattr(cls, "model_subfolder", None)
    if not isinstance(cls, type) or not sub or not getattr(cls, "vae_class", None):
        return []
    from .models.diffusers_base import require_subfolders

    try:
        require_subfolders(model_path, (sub, "vae"))
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    return []


def preflight(cfg: RunConfig) -> dict:
    """Cheap start-up checks; raises FileNotFoundError / ValueError naming what is missing.

    Returns the loaded (file-checked) training manifest.
    """
    from .models import ADAPTERS
    from .rewards import REWARDS

    factory = ADAPTERS.get(cfg.model.name)  # unknown adapter -> ValueError listing the known ones
    problems: List[str] = []
    for where, path in _path_like_values(cfg.model.kwargs, "model.kwargs"):
        if not Path(path).expanduser().exists():
            problems.append(f"{where} = {path!r} does not exist (the model weights folder; download it first, "
                            f"e.g. `huggingface-cli download <repo> --local-dir {path}`, see docs/recipes.md)")
        elif where.endswith(".model_path"):
            problems += _missing_subfolders(factory, path)
    reward_cfgs = list(cfg.rewards) + list(cfg.eval.rewards)
    for i, rc in enumerate(reward_cfgs):
        REWARDS.get(rc.name)
        n = len(cfg.rewards)
        where = f"rewards[{i}] ({rc.key or rc.name})" if i < n else f"eval.rewards[{i - n}]"
        for w, path in _path_like_values(rc.kwargs, where + ".kwargs"):
            if not Path(path).expanduser().exists():
                problems.append(f"{w} = {path!r} does not exist (reward model weights; see docs/rewards.md)")
    if not cfg.data.manifest:
        problems.append("data.manifest is not set: training reads precomputed prompt embeddings. Run data_prep "
                        "(docs/data_prep.md) and set data.manifest to the written manifest.json")
    for where in ("manifest", "eval_manifest"):
        path = getattr(cfg.data, where)
        if path and not (Path(path).expanduser().is_file() or (Path(path).expanduser() / "manifest.json").is_file()):
            problems.append(f"data.{where} = {path!r} does not exist: run data_prep first (docs/data_prep.md), e.g. "
                            f"`python data_prep/prep_embeddings.py --family <family> --model-path <model folder> "
                            f"--prompts <prompts.txt> --out {Path(path).parent if path.endswith('.json') else path}`")
    if problems:
        raise FileNotFoundError("cannot start training:\n  - " + "\n  - ".join(problems))
    from .data.manifest import load_manifest, validate_manifest

    manifest = validate_manifest(load_manifest(cfg.data.manifest), None, check_files=True,
                                     verify_hashes=cfg.data.verify_hashes, dedupe=cfg.data.dedupe)
    if cfg.data.eval_manifest:
        validate_manifest(load_manifest(cfg.data.eval_manifest), None, check_files=True, verify_hashes=False,
                          dedupe=cfg.data.dedupe)
    return manifest


# ----------------------------------------------------------------------------- building blocks


def build_policy(cfg: RunConfig, device) -> "object":
    """The adapter named by ``model.name`` with ``model.kwargs`` (plus ``device`` unless given)."""
    from .models import ADAPTERS

    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("device", str(device))
    return ADAPTERS.build(cfg.model.name, **kwargs)


class EmbeddingLookup:
    """prompt strings -> batched conditioning on ``device``, read from a ``PromptEmbeddingDataset``."""

    def __init__(self, datasets: Sequence, device):
        self.datasets = list(datasets)
        self.device = torch.device(device)
        self.where: Dict[str, Tuple[int, int]] = {}
        for d, ds in enumerate(self.datasets):
            for i, p in enumerate(ds.prompts):
                self.where.setdefault(p, (d, i))

    def __call__(self, prompts: Sequence[str]):
        from .data.dataset import collate_prompt_embeddings

        missing = [p for p in prompts if p not in self.where]
        if missing:
            raise ValueError(f"no precomputed embeddings for prompt(s) {missing[:3]}; rerun data_prep with them")
        items = [self.datasets[d][i] for d, i in (self.where[p] for p in prompts)]
        cond = collate_prompt_embeddings(items)["cond"]
        return {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}


def build_prompt_sets(cfg: RunConfig, adapter, manifest: Optional[dict], device):
    """(train prompts, held-out prompts, encode fn) from ``data.*``; validated against ``cond_spec()``."""
    from .data.dataset import PromptEmbeddingDataset

    spec = adapter.cond_spec() if hasattr(adapter, "cond_spec") else None
    names = list(spec) if spec is not None else None
    common = dict(names=names, expected=spec, max_open_shards=cfg.data.max_open_shards, dedupe=cfg.data.dedupe)
    d = cfg.data
    if d.eval_manifest:
        train = PromptEmbeddingDataset(manifest, split="all", **common)
        held = PromptEmbeddingDataset(d.eval_manifest, split="all", **common)
    else:
        train = PromptEmbeddingDataset(manifest, split="train", eval_fraction=d.eval_fraction, split_salt=d.split_salt,
                                       **common)
        held = PromptEmbeddingDataset(manifest, split="eval", eval_fraction=d.eval_fraction, split_salt=d.split_salt,
                                      **common)
    if len(train) == 0:
        raise ValueError(f"no training prompts left in {d.manifest} after holding out data.eval_fraction="
                         f"{d.eval_fraction}; lower it")
    encode = EmbeddingLookup([train, held], device)
    return train.prompts, held.prompts, encode


def build_eval_reward_fns(cfg: RunConfig, train_fns: Dict):
    """``eval.rewards`` when given; else the training rewards in continuous form (thresholds dropped)."""
    from .trainer import build_reward_fns

    if cfg.eval.rewards:
        return build_reward_fns(cfg.eval.rewards)[0]
    plain = [RewardConfig(name=rc.name, key=rc.key or rc.name, weight=rc.weight, kwargs=rc.kwargs,
                          batch_size=rc.batch_size, offload=rc.offload)
             for rc in cfg.rewards if rc.threshold is not None]
    if not plain:
        return train_fns  # no binary rewards: the same instances (no second copy of the reward models)
    fns = {k: v for k, v in train_fns.items()}
    for k in [k for k in fns if k.endswith("_bin")]:
        del fns[k]
    fns.update(build_reward_fns(plain)[0])
    return fns


# ----------------------------------------------------------------------------- distributed evaluation


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_evaluate(adapter, prompts: Sequence[str], reward_fns: Dict, num_steps: int, encode: Callable, *,
                         samples_per_prompt: int, batch_size: int, seed: int, dp_rank: int, dp_size: int,
                         return_images: bool = False, max_frames: Optional[int] = 8,
                         autocast_dtype: Optional[torch.dtype] = None, **memory) -> Dict:
    """ODE evaluation split over data-parallel ranks (collective on every rank, FSDP-safe).

    Prompts are cut into fixed batches of ``batch_size // samples_per_prompt`` prompts; batch j uses
    noise seed ``seed + j`` whatever the world size, so results are comparable across runs and
    checkpoints. Batches go round-robin to dp ranks; every rank runs the same number of batches
    (padding with repeats that are dropped), then per-sample scores are gathered on all ranks.
    ``return_images``: also gather the samples as uint8 (videos cut to ``max_frames`` evenly spaced
    frames first), returned as floats in [0, 1] under "images". ``memory``: chunk sizes and VAE residency
    (``rollout.sampling_memory``), passed to ``evaluate_policy``.
    """
    from .evaluate import evaluate_policy

    per = max(1, batch_size // samples_per_prompt)
    batches = [list(prompts[i:i + per]) for i in range(0, len(prompts), per)]
    rounds = math.ceil(len(batches) / dp_size) if batches else 0
    local = []
    for r in range(rounds):
        j = r * dp_size + dp_rank
        real = j < len(batches)
        ev = evaluate_policy(adapter, batches[j if real else 0], reward_fns, num_steps, encode=encode,
                             samples_per_prompt=samples_per_prompt, seed=seed + (j if real else 0),
                             batch_size=per * samples_per_prompt, return_images=return_images,
                             autocast_dtype=autocast_dtype, **memory)
        if real:
            local.append((j, ev["per_sample"], _compact(ev.get("images"), max_frames), ev["extras_mean"]))
    if _dist_on():
        gathered: List = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        allb = {}
        for part in gathered:
            for j, s, im, ex in part:
                allb.setdefault(j, (s, im, ex))  # sp peers computed the same batch: keep one
    else:
        allb = {j: (s, im, ex) for j, s, im, ex in local}
    order = sorted(allb)
    per_sample: Dict[str, List[float]] = {}
    for j in order:
        for k, v in allb[j][0].items():
            per_sample.setdefault(k, []).extend(v)
    out = {
        "num_samples": sum(len(batches[j]) for j in order) * samples_per_prompt,
        "mean": {k: float(sum(v) / len(v)) for k, v in per_sample.items() if v},
        "per_sample": per_sample,
        "prompts": [p for j in order for p in batches[j] for _ in range(samples_per_prompt)],
    }
    if return_images and order:
        out["images"] = torch.cat([allb[j][1] for j in order]).float() / 255.0
    return out


def _compact(images: Optional[torch.Tensor], max_frames: Optional[int]) -> Optional[torch.Tensor]:
    """Samples for gathering / grids: uint8 on CPU, videos cut to ``max_frames`` evenly spaced frames."""
    if images is None:
        return None
    if images.ndim == 5 and max_frames and images.shape[1] > max_frames:
        idx = torch.linspace(0, images.shape[1] - 1, max_frames).round().long()
        images = images[:, idx]
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def frames_for_grid(images: torch.Tensor, max_frames: int) -> Tuple[torch.Tensor, int]:
    """(N, 3, H, W) -> itself, nrow 1; videos (N, F, 3, H, W) -> frame strips (N * f, 3, H, W), nrow f."""
    if images.ndim == 4:
        return images, 1
    F = images.shape[1]
    f = max(1, min(max_frames, F))
    idx = torch.linspace(0, F - 1, f).round().long()
    strips = images[:, idx]
    return strips.reshape(-1, *strips.shape[2:]), f


# ----------------------------------------------------------------------------- the run


def _is_non_finite(e: Exception) -> bool:
    import re

    return re.search(r"non-finite|\b(nan|inf)\b", str(e).lower()) is not None


def _first(m: Dict, keys: Sequence[str]):
    return {k.split("/")[1][:10]: f"{m[k]:.4f}" for k in keys if k in m}


def _prepare_metrics_file(out: Path, resumed_iteration: Optional[int]) -> List[Dict]:
    """Fresh run: drop an old metrics.jsonl; resumed: keep only rows up to the resumed iteration."""
    from .io import atomic_write_text
    from .metrics import read_jsonl
    import json

    path = out / "metrics.jsonl"
    if resumed_iteration is None:
        path.unlink(missing_ok=True)
        return []
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= resumed_iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run(cfg: RunConfig, manifest: Optional[dict] = None, *, stop_after: Optional[int] = None) -> Dict:
    """Train per ``cfg`` (after ``preflight``); returns a summary dict on every rank."""
    from .distributed.init import init_distributed

    env = init_distributed(cfg.train.device)
    try:
        summary = _run(cfg, env, manifest, stop_after)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: other ranks may be stuck in a collective
        raise
    from .distributed.init import shutdown

    shutdown()
    return summary


def _run(cfg: RunConfig, env, manifest, stop_after) -> Dict:
    from .checkpoint import export_weights, resolve_resume, save_trainer_checkpoint
    from .distributed.launch import build_trainer, resume_trainer
    from .distributed.sampler import reduce_metrics
    from .io import atomic_write_json
    from .metrics import MetricsLogger, plot_reward_curves, save_image_grid
    from .trainer import build_reward_fns

    t_start = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if manifest is None:
        manifest = preflight(cfg)
    main_rank = env.is_main
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    resume = resolve_resume(cfg.train.resume, ckpt_root)  # FileNotFoundError before the model is loaded
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- model, data, rewards, trainer (same initial weights on every rank)
    reward_fns, reward_weights = build_reward_fns(cfg.rewards)  # before the policy: missing weights fail fast
    eval_fns = build_eval_reward_fns(cfg, reward_fns)
    prompt_sets: Dict[str, object] = {}

    def training_prompts(adapter):
        train, held, encode = build_prompt_sets(cfg, adapter, manifest, env.device)
        prompt_sets.update(train=train, held=held, encode=encode)
        return train, encode

    trainer, dims = build_trainer(cfg, env, lambda device: build_policy(cfg, device), training_prompts,
                                  reward_fns, reward_weights)
    adapter, dp_rank = trainer.adapter, dims.dp_rank(env.rank)
    train_prompts, held_prompts, encode = prompt_sets["train"], prompt_sets["held"], prompt_sets["encode"]
    if resume is not None:
        resume_trainer(trainer, resume, cfg, dims, env)
    last_good = str(resume) if resume is not None else None

    # ---- logging (rank 0)
    prior_rows = _prepare_metrics_file(out, trainer.iteration if resume is not None else None) if main_rank else []
    logger = MetricsLogger(out, enabled=main_rank, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project)
    reward_keys = [f"reward/{k}/mean" for k in reward_fns]
    total = cfg.train.num_iterations
    if main_rank:
        g = cfg.grpo
        print(f"{cfg.model.name}: {env.world_size} process(es), dp={dims.dp} sp={dims.sp}; "
              f"{len(train_prompts)} train / {len(held_prompts)} held-out prompts; per iteration "
              f"{g.prompts_per_iteration} prompts/rank x G={g.group_size} = "
              f"{g.prompts_per_iteration * g.group_size * dims.dp} samples globally", flush=True)

    eval_steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    held = held_prompts[: cfg.train.num_eval_prompts] if cfg.train.num_eval_prompts else list(held_prompts)
    grid_prompts = (held or list(train_prompts))[: cfg.eval.num_sample_prompts]
    ev_kw = dict(samples_per_prompt=cfg.eval.samples_per_prompt, batch_size=cfg.eval.batch_size,
                 seed=cfg.eval.seed, dp_rank=dp_rank, dp_size=dims.dp, autocast_dtype=trainer.autocast_dtype,
                 **trainer.memory)
    eval_rows: List[Dict] = [r for r in prior_rows if "eval/reward" in r]

    def do_eval(step: int):
        if not held:
            return {}
        ev = distributed_evaluate(adapter, held, eval_fns, eval_steps, encode, **ev_kw)
        m = {f"eval/{k}": v for k, v in ev["mean"].items()}
        m["eval/reward"] = sum(ev["mean"].values()) / max(1, len(ev["mean"]))
        if main_rank:
            atomic_write_json(out / "eval" / f"iter_{step:06d}.json", {"iteration": step, **ev})
            eval_rows.append({"step": step, **m})
            plot_reward_curves(eval_rows, ["eval/reward"] + [f"eval/{k}" for k in ev["mean"]],
                               out / "eval_curve.png", window=1, title="held-out reward (ODE sampler)")
        return m

    def do_samples(step: int):
        if not grid_prompts:
            return
        kw = dict(ev_kw, samples_per_prompt=1)
        ev = distributed_evaluate(adapter, grid_prompts, eval_fns, eval_steps, encode, return_images=True,
                                  max_frames=cfg.eval.max_frames_in_grid, **kw)
        if main_rank and "images" in ev:
            imgs, nrow = frames_for_grid(ev["images"], cfg.eval.max_frames_in_grid)
            labels = [f"{p[:40]} | " + " ".join(f"{k}={v[i]:.3f}" for k, v in ev["per_sample"].items())
                      for i, p in enumerate(ev["prompts"])]
            if nrow == 1:  # images: one row of all prompts
                nrow, labels = len(ev["prompts"]), None
            save_image_grid(imgs, out / "samples" / f"iter_{step:06d}.png", nrow=nrow, upscale=1, row_labels=labels)

    history: List[Dict] = []
    start_iteration = trainer.iteration
    if start_iteration == 0 and total > 0:
        first = do_eval(0)
        if first:
            logger.log(first, step=0)
        if cfg.train.sample_every:
            do_samples(0)

    bar = None
    if main_rank and cfg.log.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_iteration, desc="GRPO", dynamic_ncols=True, unit="it")
    last_saved = trainer.iteration if resume is not None else -1
    try:
        while trainer.iteration < total:
            it = trainer.iteration + 1
            t0 = time.perf_counter()
            try:
                m = trainer.train_iteration()
            except (FloatingPointError, ValueError) as e:
                if isinstance(e, ValueError) and not _is_non_finite(e):
                    raise  # a user error (e.g. a prompt without embeddings), not a divergence
                hint = "check the reward model / its inputs" if isinstance(e, ValueError) else "lower optim.lr"
                raise TrainingStopped(
                    f"iteration {it} stopped: {e}. Nothing was saved for this iteration; the last good checkpoint "
                    f"is {last_good or '(none: no checkpoint was written yet)'}. Fix the cause ({hint}) and resume "
                    f"with --resume latest.", EXIT_DIVERGED) from e
            m = reduce_metrics(m)
            m["time/iteration"] = time.perf_counter() - t0
            m["samples_per_s_global"] = m.get("samples_per_s", 0.0) * dims.dp
            m["world_size"] = env.world_size
            if cfg.train.eval_every and it % cfg.train.eval_every == 0 and it < total:
                m.update(do_eval(it))
            if cfg.train.sample_every and (it % cfg.train.sample_every == 0 or it == total):
                do_samples(it)
            history.append(m)
            if it % max(1, cfg.train.log_every) == 0 or it == total:
                logger.log(m, step=it)
            if main_rank and cfg.log.curve_every and (it % cfg.log.curve_every == 0 or it == total):
                plot_reward_curves(prior_rows + logger.history, reward_keys, out / "reward_curve.png",
                                   window=cfg.log.curve_window)
            if bar is not None:
                bar.set_postfix({**_first(m, reward_keys), "clip": f"{m.get('train/clipfrac', 0):.3f}",
                                 "kl": f"{m.get('train/approx_kl', 0):.1e}"})
                bar.update(1)
            every = cfg.train.save_every
            if (every and it % every == 0) or it == total:
                last_good = str(save_trainer_checkpoint(trainer, ckpt_root, keep_last=cfg.train.keep_last_checkpoints))
                last_saved = it
            if stop_after is not None and it >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    final_eval = {}
    if trainer.iteration >= total and total > start_iteration:
        final_eval = do_eval(trainer.iteration)
        if final_eval:
            logger.log(final_eval, step=trainer.iteration)
    if trainer.iteration >= total and last_saved != trainer.iteration and total > 0:
        last_good = str(save_trainer_checkpoint(trainer, ckpt_root, keep_last=cfg.train.keep_last_checkpoints))
    exported = None
    if cfg.train.export and trainer.iteration >= total and total > 0:
        exported = export_weights(adapter, out / "export")
    if main_rank and cfg.log.curve_every == 0 and logger.history:
        plot_reward_curves(prior_rows + logger.history, reward_keys, out / "reward_curve.png",
                           window=cfg.log.curve_window)
    logger.close()
    summary = {
        "iteration": trainer.iteration,
        "iterations_run": len(history),
        "last_checkpoint": last_good,
        "export": str(exported) if exported else None,
        "final_eval": final_eval,
        "last_metrics": history[-1] if history else {},
        "wall_time_s": time.perf_counter() - t_start,
        "world_size": env.world_size,
    }
    if main_rank:
        atomic_write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- entry points


def main(argv=None, default_config: Optional[str] = None, description: Optional[str] = None) -> Dict:
    """Parse, check, train. Raises on errors (see ``cli`` for exit codes)."""
    args, cfg = parse_args(argv, default_config, description)
    manifest = preflight(cfg)
    if args.check:
        print("config and files OK", flush=True)
        return {"checked": True}
    try:
        return run(cfg, manifest)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingStopped(f"{OOM_HINT}\n(original error: {str(e).splitlines()[0] if str(e) else e!r})",
                              EXIT_OOM) from e


def cli(argv=None, default_config: Optional[str] = None, description: Optional[str] = None) -> None:
    """``main`` for scripts: user errors print one clear message and exit non-zero (no traceback)."""
    try:
        main(argv, default_config, description)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    cli()
