"""Run configuration: dataclasses, YAML loading, ``--section.field=value`` overrides, validation.

Units are stated per field: "per rank" counts are what one data-parallel rank processes, "global"
counts are summed over ranks. Unknown keys and wrong types are rejected with a message naming the
offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

#: the domains of the config's choice fields (the modules that act on a choice import its domain from here)
ETA_FORMS = ("constant", "flow_grpo", "cps")  # their schedules: sde.ETA_FORMS
ODE_SOLVERS = ("euler", "dpmpp_2m")
WINDOW_MODES = ("off", "sliding", "random")
STD_ESTIMATORS = ("bessel", "population")
DPM_APPLY = ("all", "post")
TRAIN_GUIDANCE = ("both", "detach_uncond", "none")
KL_FORMS = ("exact", "flow_grpo")
UPDATE_SPLITS = ("steps", "samples")
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


# ----------------------------------------------------------------------------- the domains of numeric fields


@dataclass(frozen=True)
class Domain:
    """What a numeric config value may be, declared next to the field (``num``): a finite number (an integer
    when the field is ``int``) inside ``[low, high]`` (either end open, either missing), or one of ``special``'s
    values, each with its documented meaning (e.g. ``0``: the whole batch); ``null``, when set, is the meaning
    of null (YAML ``null``; with ``off`` also ``off`` / ``false``). A list field applies it to every entry."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    special: Tuple[Tuple[float, str], ...] = ()
    null: Optional[str] = None
    off: bool = False
    why: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            rng = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            rng = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            rng = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            rng = ""
        extras = [f"{v:g} ({meaning})" for v, meaning in self.special]
        if self.null is not None:
            extras.append(f"{'null / off' if self.off else 'null'} ({self.null})")
        return kind + rng + "".join(f", or {e}" for e in extras)

    def admits(self, value) -> bool:
        """Whether ``value`` (a number, not None) lies in the domain."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if any(value == v for v, _ in self.special):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _parse_range(spec: str) -> Dict[str, Any]:
    """``"any"``, ``"> 0"``, ``">= 1"``, ``"< 1"``, ``"<= 1"`` or an interval ``"(0, 1]"`` -> Domain fields."""
    s = spec.replace(" ", "")
    if s == "any":
        return {}
    for op, key, open_ in ((">=", "low", False), ("<=", "high", False), (">", "low", True), ("<", "high", True)):
        if s.startswith(op):
            return {key: float(s[len(op):]), f"{key}_open": open_}
    if s[:1] in "([" and s[-1:] in ")]" and "," in s:
        lo, hi = s[1:-1].split(",")
        return {"low": float(lo), "high": float(hi), "low_open": s[0] == "(", "high_open": s[-1] == ")"}
    raise ValueError(f"bad domain spec {spec!r}")  # a programming error in this file


def num(default: Any = dataclasses.MISSING, domain: str = "any", *, factory: Any = dataclasses.MISSING,
        special: Optional[Dict[float, str]] = None, null: Optional[str] = None, off: bool = False, why: str = ""):
    """A numeric config field and its domain (``Domain``; ``domain`` as ``"> 0"``, ``">= 1"``, ``"[0, 1)"`` or
    ``"any"`` finite value; integers when the field is ``int``). ``special``: values outside the range that mean
    something ({0: "the whole batch"}); ``null``: what null means (``off``: ``off`` is accepted for it)."""
    meta = {"domain": dict(_parse_range(domain), special=tuple((special or {}).items()), null=null, off=off, why=why)}
    return field(default=default, default_factory=factory, metadata=meta)


def _numeric_kind(tp) -> Optional[Tuple[type, bool, bool]]:
    """(int or float, is a list, may be None) of a numeric field's type hint; None for other fields."""
    nullable = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None
        tp = args[0]
    is_list = typing.get_origin(tp) in (list, List)
    if is_list:
        tp = (typing.get_args(tp) or (Any,))[0]
    return (tp, is_list, nullable) if tp in (int, float) else None


def field_domain(cls, name: str) -> Optional[Domain]:
    """The declared domain of ``cls.name`` (None for non-numeric fields); a numeric field without one is a
    TypeError, so that no numeric key can be added unchecked."""
    return _domains(cls)[name]


@functools.lru_cache(maxsize=None)
def _domains(cls) -> Dict[str, Optional[Domain]]:
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        kind = _numeric_kind(hints[f.name])
        if kind is not None and "domain" not in f.metadata:
            raise TypeError(f"config field {cls.__name__}.{f.name} is numeric but declares no domain: define it "
                            "with config.num(default, '<domain>')")
        out[f.name] = None if kind is None else Domain(integer=kind[0] is int, **f.metadata["domain"])
    return out


def domain_error(key: str, domain: Domain, value) -> str:
    return f"{key} must be {domain.describe()}, got {value!r}{domain.why}"


def check_fields(obj, where: str = "") -> None:
    """Every numeric field of the dataclass ``obj`` (not of the sections inside it) against its declared
    domain: a ValueError naming the key and its domain."""
    for name, domain in _domains(type(obj)).items():
        if domain is None:
            continue
        key = f"{where}.{name}" if where else name
        value = getattr(obj, name)
        if value is None:
            _require(domain.null is not None, domain_error(key, domain, value))
        elif isinstance(value, list):
            _require(all(domain.admits(v) for v in value),
                     f"each entry of {key} must be {domain.describe()}, got {value!r}{domain.why}")
        else:
            _require(domain.admits(value), domain_error(key, domain, value))


def check_domains(obj, where: str = "") -> None:
    """``check_fields`` on ``obj`` and on every section inside it (nested dataclasses and lists of them)."""
    check_fields(obj, where)
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_domains(value, key)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    check_domains(v, f"{key}[{i}]")


@dataclass
class ModelConfig:
    name: str = "toy"  # adapter name in fastvideo_grpo.models.ADAPTERS
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the adapter factory (paths, resolution, ...)


@dataclass
class SamplingConfig:
    num_steps: int = num(10, ">= 1")  # SDE steps per rollout (paper: 50 SD, 25 FLUX / HunyuanVideo)
    eval_num_steps: int = num(0, ">= 1", special={0: "as sampling.num_steps"})  # ODE steps for evaluation
    eta: float = num(0.3, ">= 0")  # noise level e_t of the SDE (paper: 0.3); a list gives a per-step schedule
    eta_schedule: Optional[List[float]] = num(None, ">= 0", null="eta at every step")  # per-step eta, over eta
    # "constant": eta as given; "flow_grpo": eta (or each eta_schedule entry) is Flow-GRPO's a, and the SDE's
    # eta at a step from sigma is a * sqrt(sigma / (1 - sigma)) (flow models only; Flow-GRPO: a = 0.7); "cps": eta
    # (in [0, 1]) is the noise level of the coefficients-preserving step, std = sigma_next sin(eta pi / 2) (flow only)
    eta_form: str = "constant"
    # Memory of the rollout / evaluation phases (docs/performance.md, "Memory at real sizes"). The noise is
    # the same whatever the chunking; samples differ only by the kernels' batch-shape rounding (last bits).
    # Set rollout_batch_size = grpo.micro_batch_size: re-scoring then sees the rollout's shapes (ratio 1).
    # samples per denoiser forward in rollout and evaluation, per rank
    rollout_batch_size: int = num(0, ">= 1", special={0: "the whole batch"})
    decode_batch_size: int = num(0, ">= 1", special={0: "the whole batch"})  # samples per VAE decode call, per rank
    offload_vae: bool = False  # keep the VAE in host memory between decodes (copied to the GPU for each decode)
    offload_rewards: bool = False  # default of rewards[*].offload: reward models in host memory between calls
    # eta = 0 at the last step. null = the schedule's default: yes for flow models (the step to sigma 0 is
    # then the clean prediction z - sigma * u, the image the released code rewards), no for DDIM (released SD)
    deterministic_last_step: Optional[bool] = None
    # solver of the deterministic (eta 0) rollout steps: "euler" or "dpmpp_2m" (DPM-Solver++(2M), flow models
    # only; MixGRPO-Flash). Stochastic steps and evaluation always use the SDE / Euler steps
    ode_solver: str = "euler"
    # with ode_solver dpmpp_2m, which deterministic steps take it: "all" of them, or (MixGRPO-Flash's "post",
    # released dpm_apply_strategy) only those after the last stochastic step -- Euler before it
    dpm_apply: str = "all"
    # "post" only: the steps after the last stochastic step on a grid of int((T - last) * ratio) points from that
    # point's time down to 0, shifted like the grid (MixGRPO-Flash: 0.4; 1.0 = the grid's own steps)
    dpm_post_compress_ratio: float = num(1.0, "(0, 1]")
    rollout: str = "sde"  # registered rollout sampler (algorithms/samplers/): "sde" = DanceGRPO's, "tree" = branching
    rollout_kwargs: Dict[str, Any] = field(default_factory=dict)  # the sampler's own options (its constructor's)

    def validate(self, where: str = "sampling") -> None:
        """The checks between its fields (each field's own domain is check_domains')."""
        if self.eta_schedule is not None:
            _require(len(self.eta_schedule) == self.num_steps, f"{where}.eta_schedule needs one entry per sampling step")
        _one_of(self.eta_form, ETA_FORMS, f"{where}.eta_form")
        _one_of(self.ode_solver, ODE_SOLVERS, f"{where}.ode_solver")
        _one_of(self.dpm_apply, DPM_APPLY, f"{where}.dpm_apply")
        _require(self.dpm_apply == "all" or self.ode_solver == "dpmpp_2m",
                 f"{where}.dpm_apply: {self.dpm_apply} applies DPM-Solver++ after the window: set "
                 f"{where}.ode_solver: dpmpp_2m")
        _require(self.dpm_post_compress_ratio == 1.0 or self.dpm_apply == "post",
                 f"{where}.dpm_post_compress_ratio compresses the steps after the last stochastic step, which only "
                 f"{where}.dpm_apply: post samples apart; set it (MixGRPO-Flash) or the ratio to 1.0")

    def eta_per_step(self) -> List[float]:
        """The configured eta of each sampling step (``eta_schedule``, else ``eta`` at every step)."""
        return list(self.eta_schedule) if self.eta_schedule is not None else [self.eta] * self.num_steps


@dataclass
class SDEWindowConfig:
    """A window of ``size`` consecutive steps, changing with the iteration, that alone is sampled with the SDE
    and trained (eta 0 outside it); it lies inside the trainable steps (grpo.timestep_window without the last
    step). See fastvideo_grpo/algorithms/sde_window.py and docs/algorithms.md."""

    mode: str = "off"  # "off" (static), "sliding" (MixGRPO) or "random" (Flow-GRPO-Fast: new position each iteration)
    size: int = num(4, ">= 1")  # W: steps in the window (MixGRPO: 4; Flow-GRPO-Fast: 1 or 2)
    start: int = num(0, ">= 0")  # sliding: first position, in steps after the start of the trainable steps
    stride: int = num(1, ">= 1")  # sliding: steps the window moves at each shift
    shift_every: int = num(25, ">= 1")  # sliding: iterations between shifts (MixGRPO: 25)
    roll_back: bool = False  # sliding: after the last position, start again from `start` (else stay at the end)

    def validate(self, where: str = "grpo.sde_window") -> None:
        """Its own fields; whether it fits in the trainable steps is sde_window.training_window's check."""
        _one_of(self.mode, WINDOW_MODES, f"{where}.mode")


@dataclass
class GRPOConfig:
    # G: samples per prompt, all from one initial noise (paper: 12)
    group_size: int = num(8, ">= 2", why=" (group-relative advantages need 2 samples per prompt)")
    prompts_per_iteration: int = num(4, ">= 1")  # prompts per rank per iteration (paper: 32 global)
    tau: float = num(0.6, "(0, 1]")  # fraction of the trainable steps trained on: int(tau * (T - 1)) (paper: 0.6)
    # [lo, hi): train only steps in this range (ablations)
    timestep_window: Optional[List[int]] = num(None, ">= 0", null="every step")
    train_last_step: bool = False  # also train the last sampling step (the released code never does)
    # PPO clip epsilon (paper: 1e-4); null (or off) trains on the unclipped ratio -- never .inf, which is refused
    clip_range: Optional[float] = num(1e-4, "> 0", null="no clipping", off=True)
    adv_clip_max: Optional[float] = num(5.0, "> 0", null="no clamp", off=True)  # advantages clamped to +-this
    num_updates_per_iteration: int = num(4, ">= 1")  # optimiser steps per iteration (paper: 4, or 1 with CFG)
    # passes (epochs) of the update over one iteration's rollout, each of num_updates_per_iteration optimiser
    # steps; pi_old stays the rollout policy throughout (Flow-DPPO trains several epochs per rollout)
    num_epochs: int = num(1, ">= 1")
    # how the iteration is split among them: "steps" (each optimiser step sees every sample at a consecutive
    # chunk of the kept steps) or "samples" (each sees every kept step of a consecutive chunk of micro-batches: the
    # released DanceGRPO / Flow-GRPO gradient accumulation over samples)
    update_split: str = "steps"
    micro_batch_size: int = num(0, ">= 1", special={0: "the whole rank batch"})  # samples per forward/backward
    # KL to the starting policy (off in the DanceGRPO paper): with LoRA the reference is the model with the adapter
    # switched off; otherwise a frozen copy of the weights, sharded like them (one more copy of the model)
    kl_coef: float = num(0.0, ">= 0")
    shared_noise: bool = True  # one initial noise per group (paper: essential)
    advantage: str = "group"  # registered estimator (algorithms/advantages.py): "group" (GRPO) or "global" (DDPO-style)
    advantage_std: str = "bessel"  # std of the normalisation: "bessel" (n - 1, + 1e-8: released code) or "population"
    # epsilon of the normalisation; null = the estimator's default (group: 1e-8, released DanceGRPO;
    # group_global_std: 1e-4 added to the std, released Flow-GRPO / DiffusionNFT stat_tracking.py)
    advantage_eps: Optional[float] = num(None, "> 0", null="the estimator's default")
    # drop the samples whose advantage is exactly 0 from the update (released Flow-GRPO, train_sd3.py 796-817): the
    # loss is then the mean over the others; their count is padded with dropped ones (drawn at random) to a multiple
    # of the micro-batches, whose size shrinks accordingly
    drop_zero_advantage: bool = False
    # classifier-free guidance in the training forwards (the rollout always guides with both branches):
    # "both" (both branches carry gradient: DanceGRPO's SD code, DDPO), "detach_uncond" (the unconditional
    # branch is detached: released Flow-GRPO train_sd3.py 189-195) or "none" (the conditional branch alone)
    train_guidance: str = "both"
    # the form of the KL to the reference: "exact" (the Gaussian KL of the step, |dmean|^2 / (2 std^2) with the
    # step's std eta_t sqrt(-dt)) or "flow_grpo" (released Flow-GRPO, train_sd3.py 895: / (2 eta_t^2), without
    # the step's sqrt(-dt); its kl_coef values assume this form; flow models only)
    kl_form: str = "exact"
    best_of_n_k: int = num(0, ">= 1", special={0: "off"})  # train on the top-k and bottom-k of each group only
    # best-of-N advantages: "group" = computed over the whole group, then the 2k selected (released code);
    # "selected" = recomputed over the 2k selected samples only
    best_of_n_advantages: str = "group"
    sde_window: SDEWindowConfig = field(default_factory=SDEWindowConfig)  # per-iteration SDE/training window
    # what the update trains: a registered objective (fastvideo_grpo/algorithms/objectives/): "ppo_clip" (alias
    # "grpo": PPO-clip on the SDE's log-probs, DanceGRPO) or "diffusion_nft" (alias "nft": flow matching on the
    # clean samples, contrasting implicit positive / negative policies; no log-probs, so any sampler, eta 0 included)
    objective: str = "ppo_clip"
    objective_kwargs: Dict[str, Any] = field(default_factory=dict)  # the objective's own options (its constructor's)
    nft_beta: float = num(1.0, "> 0")  # diffusion_nft's beta: v+- = v_old +- beta (v_theta - v_old)

    def validate(self, where: str = "grpo") -> None:
        batch = self.group_size * self.prompts_per_iteration
        _require(not self.micro_batch_size or batch % self.micro_batch_size == 0,
                 f"{where}.micro_batch_size={self.micro_batch_size} must divide the rank batch "
                 f"group_size * prompts_per_iteration = {batch}")
        _one_of(self.advantage_std, STD_ESTIMATORS, f"{where}.advantage_std")
        _one_of(self.best_of_n_advantages, ("group", "selected"), f"{where}.best_of_n_advantages")
        _require(not self.best_of_n_k or 1 <= self.best_of_n_k <= self.group_size // 2,
                 f"{where}.best_of_n_k must be in [1, group_size // 2], got {self.best_of_n_k}")
        _one_of(self.kl_form, KL_FORMS, f"{where}.kl_form")
        _one_of(self.update_split, UPDATE_SPLITS, f"{where}.update_split")
        _one_of(self.train_guidance, TRAIN_GUIDANCE, f"{where}.train_guidance")
        self.sde_window.validate(f"{where}.sde_window")


@dataclass
class OptimConfig:
    lr: float = num(1e-5, "> 0")  # AdamW learning rate (paper: 1e-5)
    weight_decay: float = num(1e-4, ">= 0")
    betas: List[float] = num(factory=lambda: [0.9, 0.999], domain="[0, 1)")  # AdamW's (beta1, beta2)
    eps: float = num(1e-8, "> 0")
    max_grad_norm: float = num(1.0, "> 0", why=" (a negative norm reverses every update and 0 freezes the weights; "
                               "the paper uses 1.0)")  # paper: 1.0
    warmup_iterations: int = num(0, ">= 0")  # linear LR warm-up length in iterations

    def validate(self, where: str = "optim") -> None:
        _require(len(self.betas) == 2, f"{where}.betas must be [beta1, beta2], got {self.betas}")


@dataclass
class RewardConfig:
    name: str = "toy_geneval"  # registry name of the reward
    key: Optional[str] = None  # name in logs/advantages; lets one reward appear twice (e.g. VQ and MQ)
    weight: float = num(1.0, "any")  # weight of this reward's normalised advantage in the sum
    threshold: Optional[float] = num(None, "any", null="the continuous reward")  # set -> binary reward (r >= threshold)
    # samples per call of the reward (the decoded batch is scored in chunks)
    batch_size: int = num(0, ">= 1", special={0: "the whole batch"})
    offload: Optional[bool] = None  # model in host memory between calls; None = sampling.offload_rewards
    kwargs: Dict[str, Any] = field(default_factory=dict)  # factory arguments (weights folder, dtype: bfloat16, ...)

    def validate(self, where: str) -> None:
        """Nothing between its fields yet (each field's own domain is check_domains')."""


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
    diversity_size: int = num(64, ">= 1")  # pixels a side
    diversity_model: Dict[str, Any] = field(default_factory=dict)  # embedding: {model_path: <CLIP folder>, ...}
    # alarm when a watched value is more than this below its best evaluation so far ...
    threshold: float = num(0.05, ">= 0")
    relative: bool = False  # ... (a fraction of that best value instead of an absolute amount)
    # ... while the trained reward is more than this above its value at that evaluation ...
    min_rise: float = num(0.0, ">= 0")
    patience: int = num(2, ">= 1")  # ... at this many consecutive evaluations (N)
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
        if self.diversity != "off":
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
    num_iterations: int = num(100, ">= 0")
    seed: int = num(0, ">= 0")
    output_dir: str = "outputs/run"
    log_every: int = num(1, ">= 1", special={0: "every iteration, as 1"})  # iterations between console/JSONL logs
    save_every: int = num(0, ">= 1", special={0: "only at the end"})  # iterations between checkpoints
    eval_every: int = num(0, ">= 1", special={0: "before and after only"})  # iterations between held-out evaluations
    num_eval_prompts: int = num(32, ">= 1", special={0: "every held-out prompt"})
    sample_every: int = num(0, ">= 1", special={0: "never"})  # iterations between saved sample grids; 0 = never
    device: str = "auto"  # "auto", "cpu" or "cuda"
    autocast: str = "bf16"  # autocast dtype on GPU: "bf16" or "none" (fp16 is refused: no gradient scaler)
    cudnn_attention: bool = False  # allow cuDNN's SDPA backend (failed on an H200 with torch 2.11; see cuda_settings.py)
    deterministic: bool = False
    num_threads: int = num(0, ">= 1", special={0: "torch's default"})  # CPU intra-op threads; 0 = torch's default
    resume: Optional[str] = None  # checkpoint folder, "latest" (error if none) or "auto" (latest if any)
    keep_last_checkpoints: int = num(0, ">= 1", special={0: "keep all"})  # delete older ones beyond this many
    export: bool = True  # write the trained weights to <output_dir>/export at the end (diffusers format; docs/export.md)
    # EMA of the trainable weights, updated once per iteration (released FLUX 8-GPU script: 0.995); 0 = off.
    # When set, held-out evaluation, sample grids and the export use the EMA weights; checkpoints hold it
    ema_decay: float = num(0.0, "[0, 1)", why=" (0 = no EMA; the released FLUX script uses 0.995)")
    overwrite: bool = False  # start over in an output_dir that holds a run (deletes its outputs); else refused
    # Graceful stop (docs/reliability.md, training/preemption.py): SIGTERM / SIGINT, this file appearing (relative:
    # inside output_dir; null = off) or the time budget (seconds from the start; 0 = none) end the run after the
    # current iteration, saved; the process then exits with stop_exit_code (0; or the cluster's requeue code,
    # e.g. SLURM's RequeueExit value). The same command resumes.
    stop_file: Optional[str] = None
    max_wall_time: float = num(0.0, ">= 0", why=" (seconds; 0 = no time budget)")
    stop_exit_code: int = num(0, "[0, 255]", why=" (an exit status: 0, or the cluster's requeue code such as SLURM's "
                              "RequeueExit)")
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # reward-hacking alarm (docs/watchdog.md)
    # a full fine-tune's export is a whole pipeline folder: the trained denoiser plus the base model's other
    # components, "link"ed (hard links: no extra space; copied where the file system refuses), "copy"ed, or
    # "symlink"ed to the base folder (the export then needs that folder to stay where it is)
    export_components: str = "link"

    def validate(self, where: str = "train") -> None:
        _one_of(self.export_components, EXPORT_COMPONENTS, f"{where}.export_components")
        _one_of(self.autocast, ("bf16", "none"), f"{where}.autocast", " (fp16 would need a gradient scaler, which the "
                "trainer does not have: bf16 has fp32's range and needs none)")
        self.watchdog.validate(f"{where}.watchdog")


@dataclass
class ParallelConfig:
    """Distributed degrees (see fastvideo_grpo/distributed/parallel_dims.py); product = world size."""

    dp_replicate: int = num(1, ">= 1")  # HSDP replica groups (replicated across, sharded within)
    dp_shard: int = num(-1, ">= 1", special={-1: "world_size // (dp_replicate * sp)"})  # FSDP shard degree
    sp: int = num(1, ">= 1")  # Ulysses sequence-parallel degree (divides heads and tokens)
    activation_checkpointing: float = num(0.0, "[0, 1]")  # fraction of transformer blocks recomputed in backward
    param_dtype: str = "bf16"  # FSDP compute dtype on GPU (fp32 on CPU always)
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype on GPU
    cpu_offload: bool = False  # keep sharded params / grads / optimizer state in CPU memory
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3); False = ZeRO-2
    attention_backend: str = "native"  # diffusers' attention dispatcher: native (torch SDPA), flash, _flash_3, sage, ...
    # Collective timeouts and the stall watch (docs/reliability.md, "A stalled or dead rank"): start-up and the
    # first iteration (model loading, first-use compilation) get init_timeout_s; after it, a collective waits at
    # most train_timeout_s, and a rank that stops answering or falls behind the others for that long is named by
    # the others, which exit with status 6. Checkpoint saves and the export wait init_timeout_s (rank 0 writes alone)
    init_timeout_s: float = num(600.0, "> 0")
    train_timeout_s: float = num(300.0, "> 0")
    fsdp_one_process: bool = False  # FSDP2 in a one-process torchrun too (bf16 compute over fp32 master weights, as on many GPUs)

    def validate(self, where: str = "parallel") -> None:
        """Nothing between its fields yet (each field's own domain is check_domains')."""


@dataclass
class DataConfig:
    """Where the training / held-out prompts come from (embeddings precomputed by data_prep)."""

    manifest: Optional[str] = None  # manifest.json (or its folder) from data_prep; required by fastvideo_grpo.cli.train
    eval_manifest: Optional[str] = None  # separate held-out manifest; None = split `manifest` by prompt hash
    eval_fraction: float = num(0.0, "[0, 1)")  # share of `manifest` prompts held out for evaluation (by hash), in [0, 1)
    split_salt: str = ""  # salt of the prompt hash that decides the split (change it for another split)
    verify_hashes: bool = False  # sha256 every shard at start-up (reads every byte; slow for big sets)
    verify_on_read: bool = True  # sha256 of each shard when a process first reads it (~1 s per GB, once)
    dedupe: bool = False  # drop repeated prompts instead of failing
    max_open_shards: int = num(4, ">= 1")  # safetensors shards kept open per process (LRU)
    # Prompts straight in (instead of a data_prep manifest): a .txt / .jsonl / .csv file or "hf:NAME[:split]"
    # (a Hugging Face dataset; needs `datasets`). Their embeddings are computed on first use with the family's
    # prompt encoding (data_prep's code), cached by content hash, and data.manifest is set to the cached manifest
    prompts: Optional[str] = None
    eval_prompts: Optional[str] = None  # held-out prompts the same way (else data.eval_fraction of `prompts`)
    prompt_field: str = "prompt"  # jsonl field / csv column / dataset column holding the prompt
    embedding_cache: Optional[str] = None  # where computed embeddings are cached; None = <output_dir>/embeddings
    encoding: Dict[str, Any] = field(default_factory=dict)  # data_prep's options: dtype, batch_size, t5_max_length, ...

    def validate(self, where: str = "data") -> None:
        """The checks between its fields (each field's own domain is check_domains')."""
        _require(not self.eval_prompts or bool(self.prompts), f"{where}.eval_prompts is set without {where}.prompts: "
                 f"set {where}.prompts too (or give held-out embeddings as {where}.eval_manifest)")


@dataclass
class EvalConfig:
    """Held-out evaluation (deterministic ODE sampler) and sample grids during training."""

    samples_per_prompt: int = num(1, ">= 1")  # ODE samples per held-out prompt (fixed seeds)
    batch_size: int = num(4, ">= 1")  # samples per evaluation forward, per rank
    seed: int = num(1234, ">= 0")  # seed of the evaluation noise (same noise for every checkpoint)
    num_sample_prompts: int = num(4, ">= 0")  # prompts (rows) in the sample grid (train.sample_every)
    max_frames_in_grid: int = num(8, ">= 1")  # video samples: frames shown per row (evenly spaced)
    rewards: List[RewardConfig] = field(default_factory=list)  # evaluation rewards; empty = the training rewards

    def validate(self, where: str = "eval") -> None:
        """Nothing between its fields yet (each field's own domain is check_domains')."""


@dataclass
class LogConfig:
    """Rank-0 logging: console progress bar, metrics.jsonl, TensorBoard / wandb, reward-curve PNG."""

    progress: bool = True  # tqdm bar with ETA on rank 0
    # <output_dir>/tensorboard: null = when tensorboard is installed (a warning when not), true = required
    tensorboard: Optional[bool] = None
    wandb_project: Optional[str] = None  # log to wandb too (required: an error at start-up when not installed)
    run_name: Optional[str] = None  # the run's name in wandb / TensorBoard; None = the output folder's name
    curve_every: int = num(1, ">= 1", special={0: "only at the end"})  # iterations between redraws of reward_curve.png
    curve_window: int = num(10, ">= 1")  # moving-average window of the curve, in iterations
    # peak dense bf16 TFLOP/s of one GPU for throughput/mfu; 0 = the datasheet value of the GPU's name
    # (training/throughput.py), a nominal 1.0 on a CPU (throughput/peak_nominal = 1: not comparable)
    peak_tflops: float = num(0.0, "> 0", special={0: "the datasheet peak of the GPU's name"})


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
        """Every numeric field against its declared domain (``check_domains``), then every section's checks
        between its own fields; the checks across sections live in the builders that combine them (the trainable steps and SDE window: sde_window.training_window; the
        objective against the sampler: algorithms/objectives/build.py; the schedule against the model:
        trainer.build_schedule), which preflight runs before anything heavy is loaded."""
        check_domains(self)
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
            domain = field_domain(cls, key)
            if domain is not None and domain.off and (value is False or str(value).lower() in ("off", "none")):
                value = None  # the documented spelling of "off" (YAML reads a bare off as false)
            if _accepts_float(tp) and isinstance(value, str):
                value = _float_or_same(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
            if _accepts_float(tp) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not _type_ok(value, tp):
                want = domain.describe() if domain is not None else str(tp)
                raise ValueError(f"config key '{path}' expects {want}, got {value!r} ({type(value).__name__})")
            kwargs[key] = value
    built = cls(**kwargs)
    check_fields(built, where)
    return built


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


#: option mappings a recipe's value replaces whole (a plug-in's options are not merged with its base's)
_REPLACED = ("kwargs", "extra", "objective_kwargs", "rollout_kwargs")


def _merge(base: Dict[str, Any], new: Dict[str, Any]):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in _REPLACED:
            _merge(base[k], v)
        else:
            base[k] = v


def save_config(cfg: RunConfig, path) -> None:
    from .utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- help for the user: did you mean, where from

#: mappings a recipe replaces whole instead of merging key by key (``_merge``)
_WHOLE = ("kwargs", "extra", "objective_kwargs", "rollout_kwargs", "encoding", "diversity_model")


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
