"""Run configuration: dataclasses, YAML loading, ``--section.field=value`` overrides, validation.

Units are stated per field: "per rank" counts are what one data-parallel rank processes, "global"
counts are summed over ranks. Unknown keys and wrong types are rejected with a message naming the
offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

#: the domains of the config's choice fields (the modules that act on a choice import its domain from here)
ETA_FORMS = ("constant", "flow_grpo")
ODE_SOLVERS = ("euler", "dpmpp_2m")
WINDOW_MODES = ("off", "sliding", "random")
STD_ESTIMATORS = ("bessel", "population")
#: how a full fine-tune's export holds the base model's other components (training/export.py)
EXPORT_COMPONENTS = ("link", "copy", "symlink")


def _either(allowed) -> str:
    names = [repr(a) for a in allowed]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(value, allowed, key: str, why: str = "") -> None:
    _require(value in allowed, f"{key} must be {_either(allowed)}, got {value!r}{why}")


def _finite(value, key: str, low: float, strict: bool, why: str = "") -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _require(ok, f"{key} must be a finite number {'>' if strict else '>='} {low:g}, got {value}{why}")


@dataclass
class ModelConfig:
    name: str = "toy"  # adapter name in fastvideo_grpo.models.ADAPTERS
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the adapter factory (paths, resolution, ...)


@dataclass
class SamplingConfig:
    num_steps: int = 10  # SDE steps per rollout (paper: 50 SD, 25 FLUX / HunyuanVideo)
    eval_num_steps: int = 0  # ODE steps for evaluation; 0 = same as num_steps
    eta: float = 0.3  # noise level e_t of the SDE (paper: 0.3); a list gives a per-step schedule
    eta_schedule: Optional[List[float]] = None  # per-step eta; overrides eta when set
    # "constant": eta as given; "flow_grpo": eta (or each eta_schedule entry) is Flow-GRPO's a, and the SDE's
    # eta at a step from sigma is a * sqrt(sigma / (1 - sigma)) (flow models only; Flow-GRPO: a = 0.7)
    eta_form: str = "constant"
    # Memory of the rollout / evaluation phases (docs/performance.md, "Memory at real sizes"). The noise is
    # the same whatever the chunking; samples differ only by the kernels' batch-shape rounding (last bits).
    # Set rollout_batch_size = grpo.micro_batch_size: re-scoring then sees the rollout's shapes (ratio 1).
    rollout_batch_size: int = 0  # samples per denoiser forward in rollout and evaluation, per rank; 0 = whole batch
    decode_batch_size: int = 0  # samples per VAE decode call, per rank; 0 = whole batch
    offload_vae: bool = False  # keep the VAE in host memory between decodes (copied to the GPU for each decode)
    offload_rewards: bool = False  # default of rewards[*].offload: reward models in host memory between calls
    # eta = 0 at the last step. null = the schedule's default: yes for flow models (the step to sigma 0 is
    # then the clean prediction z - sigma * u, the image the released code rewards), no for DDIM (released SD)
    deterministic_last_step: Optional[bool] = None
    # solver of the deterministic (eta 0) rollout steps: "euler" or "dpmpp_2m" (DPM-Solver++(2M), flow models
    # only; MixGRPO-Flash). Stochastic steps and evaluation always use the SDE / Euler steps
    ode_solver: str = "euler"
    rollout: str = "sde"  # registered rollout sampler (algorithms/samplers.py): "sde" = DanceGRPO's

    def validate(self, where: str = "sampling") -> None:
        _require(self.num_steps >= 1, f"{where}.num_steps must be >= 1")
        _finite(self.eta, f"{where}.eta", 0, strict=False)
        if self.eta_schedule is not None:
            _require(all(math.isfinite(e) and e >= 0 for e in self.eta_schedule),
                     f"{where}.eta_schedule entries must be finite and >= 0, got {self.eta_schedule}")
            _require(len(self.eta_schedule) == self.num_steps, f"{where}.eta_schedule needs one entry per sampling step")
        _one_of(self.eta_form, ETA_FORMS, f"{where}.eta_form")
        _one_of(self.ode_solver, ODE_SOLVERS, f"{where}.ode_solver")
        for name in ("rollout_batch_size", "decode_batch_size"):
            _require(getattr(self, name) >= 0,
                     f"{where}.{name} must be >= 0 (0 = the whole batch), got {getattr(self, name)}")

    def eta_per_step(self) -> List[float]:
        """The configured eta of each sampling step (``eta_schedule``, else ``eta`` at every step)."""
        return list(self.eta_schedule) if self.eta_schedule is not None else [self.eta] * self.num_steps


@dataclass
class SDEWindowConfig:
    """A window of ``size`` consecutive steps, changing with the iteration, that alone is sampled with the SDE
    and trained (eta 0 outside it); it lies inside the trainable steps (grpo.timestep_window without the last
    step). See fastvideo_grpo/algorithms/sde_window.py and docs/algorithms.md."""

    mode: str = "off"  # "off" (static), "sliding" (MixGRPO) or "random" (Flow-GRPO-Fast: new position each iteration)
    size: int = 4  # W: steps in the window (MixGRPO: 4; Flow-GRPO-Fast: 1 or 2)
    start: int = 0  # sliding: first position, in steps after the start of the trainable steps
    stride: int = 1  # sliding: steps the window moves at each shift
    shift_every: int = 25  # sliding: iterations between shifts (MixGRPO: 25)
    roll_back: bool = False  # sliding: after the last position, start again from `start` (else stay at the end)

    def validate(self, where: str = "grpo.sde_window") -> None:
        """Its own fields; whether it fits in the trainable steps is sde_window.training_window's check."""
        _one_of(self.mode, WINDOW_MODES, f"{where}.mode")
        if self.mode == "off":
            return
        for name in ("size", "stride", "shift_every"):
            _require(getattr(self, name) >= 1, f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.start >= 0, f"{where}.start must be >= 0, got {self.start}")


@dataclass
class GRPOConfig:
    group_size: int = 8  # G: samples per prompt, all from one initial noise (paper: 12)
    prompts_per_iteration: int = 4  # prompts per rank per iteration (paper: 32 global)
    tau: float = 0.6  # fraction of the trainable steps trained on: int(tau * (T - 1)) (paper: 0.6)
    timestep_window: Optional[List[int]] = None  # [lo, hi): train only steps in this range (ablations)
    train_last_step: bool = False  # also train the last sampling step (the released code never does)
    clip_range: float = 1e-4  # PPO clip epsilon (paper: 1e-4)
    adv_clip_max: float = 5.0  # advantages are clamped to +-this
    num_updates_per_iteration: int = 4  # optimiser steps per iteration (paper: 4, or 1 with CFG)
    micro_batch_size: int = 0  # samples per forward/backward in training; 0 = whole rank batch
    kl_coef: float = 0.0  # KL to a frozen copy of the starting policy (off in the paper; > 0 holds a 2nd copy)
    shared_noise: bool = True  # one initial noise per group (paper: essential)
    advantage: str = "group"  # registered estimator (algorithms/advantages.py): "group" (GRPO) or "global" (DDPO-style)
    advantage_std: str = "bessel"  # std of the normalisation: "bessel" (n - 1, + 1e-8: released code) or "population"
    best_of_n_k: int = 0  # >0: train on top-k and bottom-k of each group only (best-of-N)
    # best-of-N advantages: "group" = computed over the whole group, then the 2k selected (released code);
    # "selected" = recomputed over the 2k selected samples only
    best_of_n_advantages: str = "group"
    sde_window: SDEWindowConfig = field(default_factory=SDEWindowConfig)  # per-iteration SDE/training window
    # what the update trains: a registered objective (fastvideo_grpo/algorithms/objectives/): "ppo_clip" (alias
    # "grpo": PPO-clip on the SDE's log-probs, DanceGRPO) or "diffusion_nft" (alias "nft": flow matching on the
    # clean samples, contrasting implicit positive / negative policies; no log-probs, so any sampler, eta 0 included)
    objective: str = "ppo_clip"
    objective_kwargs: Dict[str, Any] = field(default_factory=dict)  # the objective's own options (its constructor's)
    nft_beta: float = 1.0  # diffusion_nft's beta: v+- = v_old +- beta (v_theta - v_old)

    def validate(self, where: str = "grpo") -> None:
        _require(self.group_size >= 2,
                 f"{where}.group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        _require(0.0 < self.tau <= 1.0, f"{where}.tau must be in (0, 1], got {self.tau}")
        _require(self.clip_range > 0, f"{where}.clip_range must be > 0, got {self.clip_range}")
        _require(self.prompts_per_iteration >= 1, f"{where}.prompts_per_iteration must be >= 1")
        _require(self.num_updates_per_iteration >= 1, f"{where}.num_updates_per_iteration must be >= 1")
        batch = self.group_size * self.prompts_per_iteration
        _require(not self.micro_batch_size or batch % self.micro_batch_size == 0,
                 f"{where}.micro_batch_size={self.micro_batch_size} must divide the rank batch "
                 f"group_size * prompts_per_iteration = {batch}")
        _one_of(self.advantage_std, STD_ESTIMATORS, f"{where}.advantage_std")
        _one_of(self.best_of_n_advantages, ("group", "selected"), f"{where}.best_of_n_advantages")
        _require(not self.best_of_n_k or 1 <= self.best_of_n_k <= self.group_size // 2,
                 f"{where}.best_of_n_k must be in [1, group_size // 2], got {self.best_of_n_k}")
        _require(self.kl_coef >= 0, f"{where}.kl_coef must be >= 0 (0 = no KL term), got {self.kl_coef}")
        _finite(self.nft_beta, f"{where}.nft_beta", 0, strict=True)
        self.sde_window.validate(f"{where}.sde_window")


@dataclass
class OptimConfig:
    lr: float = 1e-5  # AdamW learning rate (paper: 1e-5)
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # paper: 1.0
    warmup_iterations: int = 0  # linear LR warm-up length in iterations

    def validate(self, where: str = "optim") -> None:
        _finite(self.lr, f"{where}.lr", 0, strict=True)
        _finite(self.max_grad_norm, f"{where}.max_grad_norm", 0, strict=True, why=" (a negative norm reverses every "
                "update and 0 freezes the weights; the paper uses 1.0)")


@dataclass
class RewardConfig:
    name: str = "toy_geneval"  # registry name of the reward
    key: Optional[str] = None  # name in logs/advantages; lets one reward appear twice (e.g. VQ and MQ)
    weight: float = 1.0  # weight of this reward's normalised advantage in the sum
    threshold: Optional[float] = None  # set -> binary reward (r >= threshold)
    batch_size: int = 0  # samples per call of the reward (the decoded batch is scored in chunks); 0 = whole batch
    offload: Optional[bool] = None  # model in host memory between calls; None = sampling.offload_rewards
    kwargs: Dict[str, Any] = field(default_factory=dict)  # factory arguments (weights folder, dtype: bfloat16, ...)

    def validate(self, where: str) -> None:
        _require(self.batch_size >= 0, f"{where}.batch_size must be >= 0 (0 = the whole batch), got {self.batch_size}")


@dataclass
class WatchdogConfig:
    """The reward-hacking watchdog (docs/watchdog.md): at every held-out evaluation it also measures *gold*
    rewards the run never trains on and the diversity of the samples, and raises an alarm when the trained
    reward rises while a gold reward or a diversity statistic falls. Off while ``gold`` is empty and
    ``diversity`` is "off"."""

    gold: List[RewardConfig] = field(default_factory=list)  # held-out gold rewards, never trained on (eval/gold/<key>)
    # diversity of the held-out samples, within each prompt's group and across prompts: "off", "pixel" (mean
    # pairwise RMS distance of the images, area-downsampled to at most `diversity_size` px a side) or
    # "embedding" (mean pairwise 1 - cosine of the image embeddings of `diversity_model`)
    diversity: str = "off"
    diversity_size: int = 64
    diversity_model: Dict[str, Any] = field(default_factory=dict)  # embedding: {model_path: <CLIP folder>, ...}
    threshold: float = 0.05  # alarm when a watched value is more than this below its best evaluation so far ...
    relative: bool = False  # ... (a fraction of that best value instead of an absolute amount)
    min_rise: float = 0.0  # ... while the trained reward is more than this above its value at that evaluation ...
    patience: int = 2  # ... at this many consecutive evaluations (N)
    stop: bool = False  # the alarm stops the run after saving a checkpoint (exit status 5)
    best_by: Optional[str] = None  # gold key choosing the `best` export (default: the first gold); "off": none

    @property
    def enabled(self) -> bool:
        return bool(self.gold) or self.diversity != "off"

    def validate(self, where: str = "train.watchdog") -> None:
        """The section's own fields; the checks against other sections (evaluation schedule, samples per prompt,
        gold rewards that are trained on) are ``training.watchdog.check_watchdog``'s."""
        _one_of(self.diversity, ("off", "pixel", "embedding"), f"{where}.diversity")
        if not self.enabled:
            _require(not self.stop, f"{where}.stop is set but the watchdog watches nothing: name {where}.gold rewards "
                     f"and/or set {where}.diversity")
            return
        _finite(self.threshold, f"{where}.threshold", 0.0, strict=False)
        _finite(self.min_rise, f"{where}.min_rise", 0.0, strict=False)
        _require(self.patience >= 1, f"{where}.patience (N consecutive evaluations) must be >= 1, got {self.patience}")
        if self.diversity != "off":
            _require(self.diversity_size >= 1, f"{where}.diversity_size must be >= 1 pixel, got {self.diversity_size}")
            _require(self.diversity != "embedding" or bool(self.diversity_model.get("model_path")),
                     f"{where}.diversity: embedding needs {where}.diversity_model.model_path (a CLIP model folder, "
                     "transformers format)")
            _require(self.diversity != "pixel" or not self.diversity_model,
                     f"{where}.diversity_model is only used with {where}.diversity: embedding")
        keys = []
        for i, rc in enumerate(self.gold):
            key = rc.key or rc.name
            _require(rc.threshold is None, f"{where}.gold[{i}].threshold: gold rewards are watched in their "
                     "continuous form; remove the threshold")
            _require(key not in keys, f"{where}.gold: the key {key!r} is listed twice (set a distinct key:)")
            keys.append(key)
        _require(self.best_by is None or self.best_by == "off" or self.best_by in keys,
                 f"{where}.best_by must name a gold reward key ({keys or 'none listed'}) or be 'off', got {self.best_by!r}")


@dataclass
class TrainConfig:
    num_iterations: int = 100
    seed: int = 0
    output_dir: str = "outputs/run"
    log_every: int = 1  # iterations between console/JSONL logs
    save_every: int = 0  # iterations between checkpoints; 0 = only at the end
    eval_every: int = 0  # iterations between held-out evaluations; 0 = before and after only
    num_eval_prompts: int = 32
    sample_every: int = 0  # iterations between saved sample grids; 0 = never
    device: str = "auto"  # "auto", "cpu" or "cuda"
    autocast: str = "bf16"  # autocast dtype on GPU: "bf16" or "none" (fp16 is refused: no gradient scaler)
    cudnn_attention: bool = False  # allow cuDNN's SDPA backend (failed on an H200 with torch 2.11; see cuda_settings.py)
    deterministic: bool = False
    num_threads: int = 0  # CPU intra-op threads; 0 = torch's default
    resume: Optional[str] = None  # checkpoint folder, "latest" (error if none) or "auto" (latest if any)
    keep_last_checkpoints: int = 0  # delete older checkpoints beyond this many; 0 = keep all
    export: bool = True  # write the trained weights to <output_dir>/export at the end (diffusers format; docs/export.md)
    # EMA of the trainable weights, updated once per iteration (released FLUX 8-GPU script: 0.995); 0 = off.
    # When set, held-out evaluation, sample grids and the export use the EMA weights; checkpoints hold it
    ema_decay: float = 0.0
    overwrite: bool = False  # start over in an output_dir that holds a run (deletes its outputs); else refused
    # Graceful stop (docs/reliability.md, training/preemption.py): SIGTERM / SIGINT, this file appearing (relative:
    # inside output_dir; null = off) or the time budget (seconds from the start; 0 = none) end the run after the
    # current iteration, saved; the process then exits with stop_exit_code (0; or the cluster's requeue code,
    # e.g. SLURM's RequeueExit value). The same command resumes.
    stop_file: Optional[str] = None
    max_wall_time: float = 0.0
    stop_exit_code: int = 0
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # reward-hacking alarm (docs/watchdog.md)
    # a full fine-tune's export is a whole pipeline folder: the trained denoiser plus the base model's other
    # components, "link"ed (hard links: no extra space; copied where the file system refuses), "copy"ed, or
    # "symlink"ed to the base folder (the export then needs that folder to stay where it is)
    export_components: str = "link"

    def validate(self, where: str = "train") -> None:
        _one_of(self.export_components, EXPORT_COMPONENTS, f"{where}.export_components")
        _require(self.keep_last_checkpoints >= 0, f"{where}.keep_last_checkpoints must be >= 0 (0 = keep all), got "
                 f"{self.keep_last_checkpoints}")
        _require(0.0 <= self.ema_decay < 1.0, f"{where}.ema_decay must be in [0, 1) (0 = no EMA; the released FLUX "
                 f"script uses 0.995), got {self.ema_decay}")
        _one_of(self.autocast, ("bf16", "none"), f"{where}.autocast", " (fp16 would need a gradient scaler, which the "
                "trainer does not have: bf16 has fp32's range and needs none)")
        for name in ("save_every", "eval_every", "sample_every", "log_every", "num_iterations", "num_threads"):
            _require(getattr(self, name) >= 0, f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        _finite(self.max_wall_time, f"{where}.max_wall_time", 0.0, strict=False, why=" (seconds; 0 = no time budget)")
        _require(0 <= self.stop_exit_code <= 255, f"{where}.stop_exit_code must be an exit status in [0, 255] (0, or "
                 f"the cluster's requeue code such as SLURM's RequeueExit), got {self.stop_exit_code}")
        self.watchdog.validate(f"{where}.watchdog")


@dataclass
class ParallelConfig:
    """Distributed degrees (see fastvideo_grpo/distributed/parallel_dims.py); product = world size."""

    dp_replicate: int = 1  # HSDP replica groups (replicated across, sharded within)
    dp_shard: int = -1  # FSDP shard degree; -1 = world_size // (dp_replicate * sp)
    sp: int = 1  # Ulysses sequence-parallel degree (divides heads and tokens)
    activation_checkpointing: float = 0.0  # fraction of transformer blocks recomputed in backward
    param_dtype: str = "bf16"  # FSDP compute dtype on GPU (fp32 on CPU always)
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype on GPU
    cpu_offload: bool = False  # keep sharded params / grads / optimizer state in CPU memory
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3); False = ZeRO-2
    attention_backend: str = "native"  # diffusers' attention dispatcher: native (torch SDPA), flash, _flash_3, sage, ...
    timeout_s: float = 1800.0  # collective timeout: how long the other ranks wait for a stopped (not killed) rank
    fsdp_one_process: bool = False  # FSDP2 in a one-process torchrun too (bf16 compute over fp32 master weights, as on many GPUs)

    def validate(self, where: str = "parallel") -> None:
        _require(self.timeout_s > 0, f"{where}.timeout_s must be > 0 seconds, got {self.timeout_s}")


@dataclass
class DataConfig:
    """Where the training / held-out prompts come from (embeddings precomputed by data_prep)."""

    manifest: Optional[str] = None  # manifest.json (or its folder) from data_prep; required by fastvideo_grpo.cli.train
    eval_manifest: Optional[str] = None  # separate held-out manifest; None = split `manifest` by prompt hash
    eval_fraction: float = 0.0  # share of `manifest` prompts held out for evaluation (by hash), in [0, 1)
    split_salt: str = ""  # salt of the prompt hash that decides the split (change it for another split)
    verify_hashes: bool = False  # sha256 every shard at start-up (reads every byte; slow for big sets)
    verify_on_read: bool = True  # sha256 of each shard when a process first reads it (~1 s per GB, once)
    dedupe: bool = False  # drop repeated prompts instead of failing
    max_open_shards: int = 4  # safetensors shards kept open per process (LRU)
    # Prompts straight in (instead of a data_prep manifest): a .txt / .jsonl / .csv file or "hf:NAME[:split]"
    # (a Hugging Face dataset; needs `datasets`). Their embeddings are computed on first use with the family's
    # prompt encoding (data_prep's code), cached by content hash, and data.manifest is set to the cached manifest
    prompts: Optional[str] = None
    eval_prompts: Optional[str] = None  # held-out prompts the same way (else data.eval_fraction of `prompts`)
    prompt_field: str = "prompt"  # jsonl field / csv column / dataset column holding the prompt
    embedding_cache: Optional[str] = None  # where computed embeddings are cached; None = <output_dir>/embeddings
    encoding: Dict[str, Any] = field(default_factory=dict)  # data_prep's options: dtype, batch_size, t5_max_length, ...

    def validate(self, where: str = "data") -> None:
        _require(0.0 <= self.eval_fraction < 1.0, f"{where}.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _require(not self.eval_prompts or bool(self.prompts), f"{where}.eval_prompts is set without {where}.prompts: "
                 f"set {where}.prompts too (or give held-out embeddings as {where}.eval_manifest)")


@dataclass
class EvalConfig:
    """Held-out evaluation (deterministic ODE sampler) and sample grids during training."""

    samples_per_prompt: int = 1  # ODE samples per held-out prompt (fixed seeds: comparable across checkpoints)
    batch_size: int = 4  # samples per evaluation forward, per rank
    seed: int = 1234  # seed of the evaluation noise (same noise for every checkpoint)
    num_sample_prompts: int = 4  # prompts (rows) in the sample grid saved every train.sample_every iterations
    max_frames_in_grid: int = 8  # video samples: frames shown per row (evenly spaced)
    rewards: List[RewardConfig] = field(default_factory=list)  # evaluation rewards; empty = the training rewards

    def validate(self, where: str = "eval") -> None:
        _require(self.samples_per_prompt >= 1 and self.batch_size >= 1,
                 f"{where}.samples_per_prompt and {where}.batch_size must be >= 1")


@dataclass
class LogConfig:
    """Rank-0 logging: console progress bar, metrics.jsonl, TensorBoard / wandb, reward-curve PNG."""

    progress: bool = True  # tqdm bar with ETA on rank 0
    # <output_dir>/tensorboard: null = when tensorboard is installed (a warning when not), true = required
    tensorboard: Optional[bool] = None
    wandb_project: Optional[str] = None  # log to wandb too (required: an error at start-up when not installed)
    run_name: Optional[str] = None  # the run's name in wandb / TensorBoard; None = the output folder's name
    curve_every: int = 1  # iterations between redraws of reward_curve.png; 0 = only at the end
    curve_window: int = 10  # moving-average window of the curve, in iterations
    # peak dense bf16 TFLOP/s of one GPU for throughput/mfu; 0 = the datasheet value of the GPU's name
    # (training/throughput.py), a nominal 1.0 on a CPU (throughput/peak_nominal = 1: not comparable)
    peak_tflops: float = 0.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: List[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    extra: Dict[str, Any] = field(default_factory=dict)  # recipe-specific settings (e.g. toy pretraining)

    def validate(self) -> "RunConfig":
        """Every section checks its own fields (their domains); the checks across sections live in the
        builders that combine them (the trainable steps and SDE window: sde_window.training_window; the
        objective against the sampler: algorithms/objectives/build.py; the schedule against the model:
        trainer.build_schedule), which preflight runs before anything heavy is loaded."""
        for name in ("sampling", "grpo", "optim", "train", "parallel", "data", "eval"):
            getattr(self, name).validate(name)
        if not self.rewards:
            raise ValueError("at least one reward is required under 'rewards'")
        for where, rcs in (("rewards", self.rewards), ("eval.rewards", self.eval.rewards),
                           ("train.watchdog.gold", self.train.watchdog.gold)):
            for i, rc in enumerate(rcs):
                rc.validate(f"{where}[{i}]")
                if rc.offload is None:  # the default of every reward: one value per reward for build_reward_fns
                    rc.offload = self.sampling.offload_rewards
        return self

    @property
    def eta(self):
        """What the adapter's ``make_schedule`` takes: the per-step schedule when set, else the scalar."""
        return self.sampling.eta_schedule if self.sampling.eta_schedule is not None else self.sampling.eta


# ----------------------------------------------------------------------------- building from dicts


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, List, Sequence):
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _accepts_float(tp) -> bool:
    return tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp))


def _float_or_same(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def _build(cls, data: Dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"config section '{where or 'root'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        hint = "".join(f" (did you mean '{s}'?)" for s in filter(None, (suggest_key(where, k) for k in sorted(unknown))))
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in section '{where or 'root'}'{hint}; "
                         f"known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        elif typing.get_origin(tp) in (list, List) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            inner = typing.get_args(tp)[0]
            if not isinstance(value, list):
                raise ValueError(f"config key '{path}' must be a list")
            kwargs[key] = [_build(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            if _accepts_float(tp) and isinstance(value, str):
                value = _float_or_same(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
            if _accepts_float(tp) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not _type_ok(value, tp):
                raise ValueError(f"config key '{path}' expects {tp}, got {value!r} ({type(value).__name__})")
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(d: Dict[str, Any], dotted: str, value):
    keys = dotted.split(".")
    cur = d
    for depth, k in enumerate(keys[:-1]):
        if k.isdigit() and isinstance(cur, list):
            cur = cur[_list_index(cur, k, dotted, keys[:depth])]
            continue
        cur = cur.setdefault(k, {})
        if not isinstance(cur, (dict, list)):
            raise ValueError(f"override '{dotted}': '{k}' is not a section")
    last = keys[-1]
    if last.isdigit() and isinstance(cur, list):
        cur[_list_index(cur, last, dotted, keys[:-1])] = value
    else:
        cur[last] = value


def _list_index(lst: list, key: str, dotted: str, parent) -> int:
    i = int(key)
    if i >= len(lst):
        where = ".".join(parent)
        raise ValueError(f"override '--{dotted}': {where} has {len(lst)} entr{'y' if len(lst) == 1 else 'ies'} "
                         f"(indices 0..{len(lst) - 1}); set the whole list instead, e.g. --{where}='[...]'")
    return i


def parse_overrides(args: Sequence[str]) -> List[tuple]:
    """['--grpo.tau=0.5', '--train.seed', '3'] -> [('grpo.tau', 0.5), ('train.seed', 3)] (YAML-typed)."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"expected --section.field=value, got {a!r}")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {a} has no value")
            key, raw = a[2:], args[i + 1]
            i += 2
        out.append((key, yaml.safe_load(raw)))
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), cls=RunConfig) -> RunConfig:
    """Defaults <- YAML file (over the recipe it names as ``base``, if any) <- command-line overrides, then
    validated."""
    data: Dict[str, Any] = to_dict(cls())
    if path is not None:
        _merge(data, read_recipe(Path(path)))
    for key, value in parse_overrides(overrides):
        _set_path(data, key, value)
    return _build(cls, data, "").validate()


def read_recipe(p: Path, _chain: Sequence[Path] = ()) -> Dict[str, Any]:
    """A recipe file's mapping, merged over its ``base:`` recipe (a path relative to the file; bases may
    have bases). A derived recipe states only what it changes (configs/algorithms/)."""
    files = recipe_chain(p, _chain)
    data = files[0][1]
    for _, loaded in files[1:]:
        _merge(data, loaded)
    return data


def recipe_chain(p: Path, _chain: Sequence[Path] = ()) -> List[tuple]:
    """[(file, its own mapping without ``base``)] from the deepest base recipe to ``p``."""
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found" + (f" (the base of {_chain[-1]})" if _chain else ""))
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config file {p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if loaded is None:
        raise ValueError(f"config file {p} is empty; a recipe sets at least model: and rewards: (see configs/)")
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {p} must hold a mapping at top level")
    base = loaded.pop("base", None)
    if base is None:
        return [(p, loaded)]
    if not isinstance(base, str):
        raise ValueError(f"config file {p}: base must be the path of another recipe, got {base!r}")
    here = p.resolve()
    target = (here.parent / base).resolve()
    if target in (*_chain, here):
        raise ValueError(f"config file {p}: its bases form a cycle through {target}")
    return recipe_chain(target, (*_chain, here)) + [(p, loaded)]


def _merge(base: Dict[str, Any], new: Dict[str, Any]):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("kwargs", "extra", "objective_kwargs"):
            _merge(base[k], v)
        else:
            base[k] = v


def save_config(cfg: RunConfig, path) -> None:
    from .utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- help for the user: did you mean, where from

#: mappings a recipe replaces whole instead of merging key by key (``_merge``)
_WHOLE = ("kwargs", "extra", "objective_kwargs", "encoding", "diversity_model")


def config_paths(cls=None, prefix: str = "") -> List[str]:
    """Every dotted field path of the config (``optim.lr``, ``grpo.sde_window.size``, ``rewards.name``, ...)."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, List) and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            out += config_paths(tp, path + ".")
        elif inner is not None and dataclasses.is_dataclass(inner):
            out += [path] + config_paths(inner, path + ".")
        else:
            out.append(path)
    return out


#: names other trainers use for a field (diffusers' / transformers' training arguments)
_ECOSYSTEM_NAMES = {"learning_rate": "lr", "adam_weight_decay": "weight_decay", "mixed_precision": "autocast",
                    "max_train_steps": "num_iterations", "checkpointing_steps": "save_every", "report_to": "wandb_project"}


def _field_names(section: str) -> List[str]:
    """The field names of the section at dotted ``section`` ("" = the root)."""
    cls = RunConfig
    for part in filter(None, section.split(".")):
        tp = typing.get_type_hints(cls).get(part)
        if typing.get_origin(tp) in (list, List) and typing.get_args(tp):
            tp = typing.get_args(tp)[0]
        if tp is None or not dataclasses.is_dataclass(tp):
            return []
        cls = tp
    return [f.name for f in dataclasses.fields(cls)]


def suggest_key(where: str, key: str) -> Optional[str]:
    """The field meant by an unknown ``key`` in section ``where`` (``train.lr`` -> ``optim.lr``): a close
    name in the same section, else the same or a close name in another section; None when nothing is close."""
    import difflib
    import re

    section = re.sub(r"\[\d+\]", "", where)  # rewards[0] -> rewards
    paths = config_paths()
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key, _field_names(section), n=1, cutoff=0.75)
    if close:
        return f"{where}.{close[0]}" if where else close[0]
    key = _ECOSYSTEM_NAMES.get(key, key)
    same = [p for p in paths if p.rsplit(".", 1)[-1] == key and not p.startswith(prefix)]
    if same:
        return min(same, key=len)
    by_leaf: Dict[str, List[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    close = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.8)
    return min(by_leaf[close[0]], key=len) if close else None


def config_sources(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, str]:
    """Where each set value comes from, by dotted path: ``recipe file <f>``, ``base recipe <f>`` or
    ``command line`` (a path not listed, nor any of its parents: ``default``)."""
    sources: Dict[str, str] = {}

    def put(key: str, label: str) -> None:
        for k in [k for k in sources if k.startswith(key + ".")]:
            del sources[k]
        sources[key] = label

    def walk(data: Dict[str, Any], prefix: str, label: str) -> None:
        for k, v in data.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k not in _WHOLE and v:
                walk(v, key + ".", label)
            else:
                put(key, label)

    if path is not None:
        chain = recipe_chain(Path(path))
        for i, (f, data) in enumerate(chain):
            walk(data, "", f"recipe file {f}" if i == len(chain) - 1 else f"base recipe {f}")
    for key, _ in parse_overrides(overrides):
        put(key, "command line")
    return sources


def source_of(sources: Dict[str, str], dotted: str) -> str:
    """The source of ``dotted`` (its own, else its nearest parent's, else ``default``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        label = sources.get(".".join(parts[:n]))
        if label is not None:
            return label
    return "default"


def annotated_yaml(cfg, sources: Dict[str, str]) -> str:
    """The resolved config as YAML, each value followed by ``# <where it came from>`` (``--print-config``).
    Lists and mappings are written in flow style on one line, so the text loads back to ``to_dict(cfg)``."""
    lines: List[str] = []

    def flow(v) -> str:
        text = yaml.safe_dump(v, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
        return text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()

    def emit(obj, prefix: str, indent: int) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            dotted = f"{prefix}{f.name}"
            pad = "  " * indent
            if dataclasses.is_dataclass(v):
                lines.append(f"{pad}{f.name}:")
                emit(v, dotted + ".", indent + 1)
                continue
            plain = to_dict(v) if dataclasses.is_dataclass(v) else (
                [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v] if isinstance(v, list) else v)
            where = source_of(sources, dotted)
            if isinstance(v, dict):  # a mapping set key by key (--model.kwargs.model_path=...): the keys set elsewhere
                other = [f"{k}: {source_of(sources, f'{dotted}.{k}')}" for k in v
                         if source_of(sources, f"{dotted}.{k}") != where]
                where = "; ".join([where] + other)
            lines.append(f"{pad}{f.name}: {flow(plain)}  # {where}")

    emit(cfg, "", 0)
    return "\n".join(lines) + "\n"


def load_config_with_sources(path: Optional[str] = None, overrides: Sequence[str] = (), cls=None):
    """(``load_config(path, overrides)``, ``config_sources(path, overrides)``)."""
    cfg = load_config(path, overrides, cls or RunConfig)
    return cfg, config_sources(path, overrides)
