"""Trainer: one iteration of any objective -- rollout -> reward -> advantage -> update.

The loop of docs/architecture.md ("The path of one iteration"). Departures from the paper's Algorithm 1,
stated here:
* Timestep subsets are drawn per sample before the rollout (as the reference implementation
  does), so only those transitions are stored.
* As the released code (not stated in the paper): the last sampling step is never trained on
  (``grpo.train_last_step``), each sample trains ``int(tau * (T - 1))`` steps, and for flow models the
  last step is deterministic (``sampling.deterministic_last_step``), so the rewarded image is the clean
  prediction ``z - sigma * u`` (docs/fidelity.md).
* The int(tau * (T - 1)) selected steps are split into ``num_updates_per_iteration`` consecutive chunks,
  each followed by one optimiser step (algorithms/update.py). pi_old stays the rollout policy throughout
  the iteration (PPO's usual convention).

What the update trains is the registered objective of ``grpo.objective`` (algorithms/objectives/:
PPO-clip, DiffusionNFT, ...); its advantages come from the registered estimator of ``grpo.advantage``
(algorithms/advantages.py). ``GRPOTrainer`` is the former name of ``Trainer``, kept as an alias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Dict

import torch
import torch.distributed as dist

from ..algorithms import grpo, sde_window
from ..utils import residency
from ..algorithms.advantages import build_estimator, weighted_advantages
from ..algorithms.objectives import LAST_STEP_HINT, TrainBatch, build_objective, check_stochastic_steps
from ..algorithms.update import UpdateSettings, trainable_parameters, update
from ..algorithms.passes import PassCounter
from ..algorithms.policy_versions import SeparateAdapter, reference_policy
from ..config import RunConfig
from ..distributed import heartbeat
from ..utils.cuda_settings import configure_attention
from ..utils.dtypes import autocast_dtype
from .ema import WeightEMA
from .throughput import ThroughputMeter, frames_per_sample
from ..data.prompt_source import PromptSource
from ..models.base import PolicyAdapter
from ..rewards.base import RewardFn, compute_rewards
from ..algorithms.rollout import check_ode_solver, decode_latents, sampling_memory
from ..algorithms.samplers import build_sampler
from .optim import apply_optim_config, build_lr_scheduler, build_optimizer


# ----------------------------------------------------------------------------- the trainer


def check_trainable_steps(allowed, lo: int, hi: int, model_name: str) -> None:
    """ValueError naming ``grpo.timestep_window`` when the steps training may pick, ``[lo, hi)``, reach outside
    the steps the adapter's trainable module predicts (``allowed`` = its ``trainable_steps``; None = all)."""
    if allowed is None:
        return
    a, b = int(allowed[0]), int(allowed[1])
    if b <= a:
        raise ValueError(f"{model_name}: no sampling step is predicted by the trainable module (its steps are "
                         f"[{a}, {b})); change sampling.num_steps or the model's expert boundary")
    if not (a <= lo and hi <= b):
        raise ValueError(f"{model_name}: only sampling steps [{a}, {b}) are predicted by the trainable module, but "
                         f"training may pick steps [{lo}, {hi}); set grpo.timestep_window: [{a}, {b}] (or a window "
                         "inside it)")


def build_schedule(cfg: RunConfig, adapter: PolicyAdapter, objective=None):
    """The adapter's sampling schedule for ``cfg.sampling``, with the last step made deterministic when
    ``sampling.deterministic_last_step`` says so (null: the schedule's own default, see sde/).

    ValueError when a step that training may pick (``grpo.trainable_window``) has eta = 0 and the objective
    (default: the config's) needs log-probs: its transition is a point mass, with no log-prob to train; and when
    such a step lies outside the adapter's ``trainable_steps`` (a frozen expert predicts it)."""
    from ..sde import ETA_FORMS, with_deterministic_last_step

    s = cfg.sampling
    schedule = adapter.make_schedule(s.num_steps, cfg.eta)
    if ETA_FORMS.info(s.eta_form).get("flow_only") and schedule.prediction_type != "flow":
        raise ValueError(f"sampling.eta_form: {s.eta_form} needs a flow-matching model; {cfg.model.name} samples "
                         f"with a {schedule.prediction_type} schedule (use 'constant')")
    schedule = ETA_FORMS.get(s.eta_form)(schedule)  # how the configured eta becomes the sampled schedule (sde/)
    last = s.deterministic_last_step
    if last is None:
        last = type(schedule).deterministic_last_step_default
    if last:
        schedule = with_deterministic_last_step(schedule)
    check_ode_solver(s.ode_solver, schedule)
    lo, hi = sde_window.training_window(cfg)
    steps_hook = getattr(adapter, "trainable_steps", None)  # PolicyAdapter's hook (duck-typed adapters may lack it)
    check_trainable_steps(steps_hook(schedule) if callable(steps_hook) else None, lo, hi, cfg.model.name)
    if (objective or build_objective(cfg)).needs_log_probs:
        etas = schedule.eta.tolist()
        only_last = [i for i in range(lo, hi) if etas[i] <= 0] == [schedule.num_steps - 1]
        check_stochastic_steps(etas, lo, hi, LAST_STEP_HINT if only_last else "")
    return schedule


class Trainer:
    """Owns the optimiser and the per-iteration logic of every objective; logging and saving are components
    of the loop (loop.py)."""

    def __init__(self, cfg: RunConfig, adapter: PolicyAdapter, reward_fns: Dict[str, RewardFn],
                 reward_weights: Dict[str, float], prompt_source: PromptSource, ref_adapter=None, dp_group=None):
        """``dp_group``: the data-parallel process group (None in one process); an advantage estimator that
        ``needs_global_batch`` uses it to normalise over the global batch. ``ref_adapter``: a frozen reference
        adapter of its own for an objective that ``needs_reference``; by default the reference is the policy as
        it is now (``policy_versions.reference_policy``: the LoRA base model, or a copy of the trainable weights,
        sharded like them)."""
        self.cfg = cfg
        configure_attention(cfg.train.cudnn_attention)
        self.dp_group = dp_group
        self.adapter = adapter
        self.reward_fns = reward_fns
        self.reward_weights = reward_weights
        self.prompts = prompt_source
        self.objective = build_objective(cfg)
        self.estimator = build_estimator(cfg)
        self.sampler = build_sampler(cfg)
        self.reference = None
        if self.objective.needs_reference:
            self.reference = SeparateAdapter(ref_adapter) if ref_adapter is not None else reference_policy(adapter)
        self.objective.attach(adapter)
        self.optimizer = build_optimizer(trainable_parameters(adapter.trainable_module()), cfg.optim,
                                         cfg.parallel.cpu_offload)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.optim,
                                               cfg.grpo.num_updates_per_iteration * cfg.grpo.num_epochs)
        self.schedule = build_schedule(cfg, adapter, self.objective)
        # EMA of the weights (train.ema_decay), cloned from the parameters as they are now (sharded under FSDP2);
        # loop.EMAUpdate updates it after every iteration, checkpoint.py saves it
        self.ema = WeightEMA(adapter.trainable_module(), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
        self.iteration = 0
        self.passes = PassCounter()  # model passes of each iteration, in its metrics (passes.py)
        # frames per GPU per second and MFU of each iteration (throughput.py); the runner sets gpus_per_sample
        self.throughput = ThroughputMeter(cfg.log.peak_tflops)
        self.show_progress = False  # a bar over each rollout (the runner sets it on the main rank with log.progress)
        # autocast applies on CUDA only (dtypes.autocast_context); CPU runs stay in the weights' dtype
        self.autocast_dtype = autocast_dtype(cfg.train.autocast)
        # chunk sizes of the rollout and the decode, and where the VAE lives between decodes
        self.memory = sampling_memory(cfg.sampling)
        if cfg.sampling.offload_vae:
            residency.to_host(adapter.decoder_modules(), pin=adapter.device.type == "cuda")

    def advantages(self, rewards: Dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
        """Weighted sum of per-reward advantages for this rank's samples (``grpo.advantage``'s estimator).

        Group-relative advantages need only the rank's own (whole) groups. An estimator that
        ``needs_global_batch`` (``global``, DDPO-style) uses every dp rank's rewards: they are all-gathered,
        normalised together, and this rank's slice is returned (all ranks hold the same number of samples).
        """
        est = self.estimator
        if not est.needs_global_batch or self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return weighted_advantages(rewards, group_size, est, self.reward_weights)
        from ..distributed.collectives import all_gather_rewards

        gathered = all_gather_rewards({k: r.detach() for k, r in rewards.items()}, self.dp_group)
        total = weighted_advantages(gathered, group_size, est, self.reward_weights)
        n = next(iter(rewards.values())).numel()
        start = dist.get_rank(self.dp_group) * n
        return total[start:start + n]

    @property
    def ref_adapter(self):
        """The reference adapter given to the constructor (a model of its own), else None (the reference, if
        any, is a version of the policy's own weights: ``self.reference``)."""
        return self.reference.adapter(None) if isinstance(self.reference, SeparateAdapter) else None

    def state_dict(self):
        """Everything the trainer owns besides the model, optimiser and objective tensors (which checkpoint.py
        writes sharded with DCP): the iteration, LR schedule, noise generator, prompt position and the
        objective's own small state."""
        return {
            "iteration": self.iteration,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "prompts": self.prompts.state_dict(),
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state, restore_generator: bool = True):
        """Inverse of ``state_dict``. ``restore_generator=False`` keeps the current generator (a checkpoint
        from another world size: its per-rank streams cannot be matched to ranks; see checkpoint.py)."""
        self.iteration = int(state["iteration"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.prompts.load_state_dict(state["prompts"])
        if restore_generator:
            self.generator.set_state(state["generator"])
        self.objective.load_state_dict(state.get("objective", {}))
        apply_optim_config(self.optimizer, self.lr_scheduler, self.cfg.optim)

    def iteration_schedule(self):
        """The schedule and the trainable window ``[lo, hi)`` of the coming iteration: the static ones, or with
        ``grpo.sde_window`` the window of this iteration (sde_window.py) and the schedule with eta 0 outside it.
        The random mode draws its position from a generator seeded by (train.seed, iteration): the same window
        on every data-parallel rank, the same after a resume, and the rollout noise stream untouched."""
        g = self.cfg.grpo
        window = sde_window.training_window(self.cfg)
        draw = torch.Generator().manual_seed(sde_window.window_seed(self.cfg.train.seed, self.iteration))
        moving = sde_window.window_for_iteration(g.sde_window, self.iteration, window, draw)
        schedule = self.schedule if moving is None else sde_window.only_in_window(self.schedule, moving)
        s = self.cfg.sampling
        if s.dpm_apply == "post" and s.dpm_post_compress_ratio < 1.0:  # MixGRPO-Flash: fewer steps after the window
            schedule = sde_window.compress_after_window(schedule, s.dpm_post_compress_ratio)
        return schedule, (window if moving is None else moving)

    def train_iteration(self) -> Dict[str, float]:
        self.passes.reset()
        with self.passes.watch(self.adapter, self.ref_adapter):
            metrics = self._iteration()
        metrics.update(self.passes.metrics())
        seconds, samples, frames, cond = self._measured
        metrics.update(self.throughput.metrics(self.adapter, cond, seconds, samples, frames, metrics))
        return metrics

    def _iteration(self) -> Dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.perf_counter()
        prompts, cond = self.prompts.next_batch(g.prompts_per_iteration)
        B = len(prompts) * g.group_size
        schedule, window = self.iteration_schedule()
        keep = self.sampler.keep_steps(schedule.num_steps, g.tau, B, g.group_size, self.generator, window,
                                       shared=self.objective.shared_timesteps)
        self.adapter.trainable_module().eval()
        m = self.memory
        heartbeat.mark("rollout", self.iteration + 1)  # where this rank is, for the stall watch of the other ranks
        with self.passes.phase("rollout"), self.objective.rollout_weights(), self._rollout_progress(B, schedule.num_steps):
            traj = self.sampler(self.adapter, schedule, prompts, cond, g.group_size, keep, self.generator,
                                shared_noise=g.shared_noise, autocast_dtype=self.autocast_dtype,
                                rollout_batch_size=m["rollout_batch_size"], ode_solver=self._ode_solver(),
                                **({"keep_means": True} if self.objective.needs_step_means else {}))
        t_dec = time.perf_counter()
        traj.decoded = decode_latents(self.adapter, traj.final_latents, m["decode_batch_size"], m["offload_vae"])
        t1 = time.perf_counter()
        heartbeat.mark("reward", self.iteration + 1)
        rewards, _ = compute_rewards(self.reward_fns, traj.decoded, traj.prompts, group_size=traj.group_size)
        frames = frames_per_sample(traj.decoded)
        traj.decoded = None  # the update does not need the pixels: free them (several GB for a video batch)
        t2 = time.perf_counter()
        group = g.group_size
        if g.best_of_n_k:
            # best-of-N: rank the group by its total advantage, keep the k best and k worst
            total = self.advantages(rewards, group)
            chosen = grpo.best_of_n_indices(total, group, g.best_of_n_k)
            traj = traj.select(chosen)
            group = 2 * g.best_of_n_k
            if g.best_of_n_advantages == "group":  # released code: the whole group's advantages, selected
                adv = total[chosen.to(total.device)]
            else:  # "selected": normalised again over the 2k selected samples
                adv = self.advantages({k: v[chosen.to(v.device)] for k, v in rewards.items()}, group)
        else:
            adv = self.advantages(rewards, group)
        # the statistics are of the advantages as trained on (after the objective's clamp, grpo.adv_clip_max).
        # Groups whose samples all got the same rewards have zero advantages: no learning signal from them
        trained = self.objective.trained_advantages(adv.detach())
        zero_groups = float((trained.reshape(-1, group).abs().amax(dim=1) == 0).float().mean())
        if zero_groups == 1.0:
            warnings.warn(f"iteration {self.iteration + 1}: every group's samples got identical rewards, so every "
                          "advantage is 0 and this iteration learns nothing; a reward that cannot tell the samples of "
                          "a prompt apart (thresholded too high or low, saturated) gives no signal", stacklevel=2)
        settings = UpdateSettings.from_config(cfg)  # read at every iteration (a caller may change the config)
        self._kept = traj.batch_size
        if g.drop_zero_advantage:  # released Flow-GRPO: samples with advantage 0 leave the update
            traj, adv, settings = self._drop_zero_advantage(traj, adv, settings)
        # a sampler may give each kept step its own advantage (a tree's per-node ones); None: adv applies to all
        step_adv = self.sampler.step_advantages(traj, rewards, self.estimator, self.reward_weights)
        batch = TrainBatch(self.adapter, schedule, traj, adv, autocast_dtype=self.autocast_dtype,
                           reference=self.reference, generator=self.generator, guidance=g.train_guidance,
                           advantages_BK=step_adv)
        heartbeat.mark("update", self.iteration + 1)
        stats = update(self.objective, batch, self.optimizer, settings, self.lr_scheduler)
        t3 = time.perf_counter()
        self.iteration += 1
        self._measured = (t3 - t0, B, frames, traj.cond)  # for the throughput metrics (train_iteration)
        return self._metrics(rewards, stats, trained, zero_groups, window, B, (t0, t_dec, t1, t2, t3))

    @contextlib.contextmanager
    def _rollout_progress(self, num_samples: int, num_steps: int):
        """A bar over the rollout's denoiser forwards (samples x steps) while ``show_progress`` is set (the
        main rank with log.progress); like every bar of the package, none when the output is not a terminal."""
        if not self.show_progress:
            yield
            return
        from tqdm.auto import tqdm

        g = self.cfg.grpo.group_size
        bar = tqdm(total=num_samples // g * self.sampler.forwards_per_group(num_steps, g), desc="rollout", leave=False,
                   unit="sample-step", dynamic_ncols=True, disable=None)
        self.passes.on_forward = lambda phase, n: bar.update(n) if phase == "rollout" else None
        try:
            yield
        finally:
            self.passes.on_forward = None
            bar.close()

    def _ode_solver(self) -> str:
        """The rollout's solver of the deterministic steps: DPM-Solver++(2M) at all of them, or (``sampling.dpm_apply:
        post``) only after the last stochastic step, Euler before."""
        s = self.cfg.sampling
        return "dpmpp_2m_post" if s.ode_solver == "dpmpp_2m" and s.dpm_apply == "post" else s.ode_solver

    def _drop_zero_advantage(self, traj, adv, settings):
        """The samples with a nonzero advantage, and the micro-batch size that splits them into as many
        micro-batches as the whole batch had (released Flow-GRPO, ``train_sd3.py`` 796-834): their count is padded
        to a multiple of that number (at least one each) with dropped samples drawn at random (``self.generator``).
        Each rank drops its own; every rank keeps the same number of micro-batches and optimiser steps."""
        B = traj.batch_size
        micro = settings.micro_batch_size or B
        chunks = -(-B // micro)
        keep = (adv.detach().cpu() != 0)
        n = int(keep.sum())
        # at least one sample per micro-batch, so every data-parallel rank runs the same micro-steps (FSDP's
        # collectives) even when all its advantages are 0 (the update then only moves the KL term)
        need = chunks - n % chunks if n % chunks or n == 0 else 0
        if need:
            dropped = torch.nonzero(~keep).reshape(-1)
            pick = dropped[torch.randperm(dropped.numel(), generator=self.generator)[:need]]
            keep[pick] = True
        idx = torch.nonzero(keep).reshape(-1)
        self._kept = int(idx.numel())
        if self._kept == B:
            return traj, adv, settings
        traj = traj.select(idx)
        adv = adv[idx.to(adv.device)]
        # equal micro-batches when the padding made the count a multiple (else, too few dropped to pad, the last
        # micro-batch is smaller)
        return traj, adv, dataclasses.replace(settings, micro_batch_size=-(-self._kept // chunks))

    def _metrics(self, rewards, stats, adv, zero_groups, window, B, times):
        g = self.cfg.grpo
        t0, t_dec, t1, t2, t3 = times
        metrics = {"iteration": self.iteration}
        if self.cfg.grpo.drop_zero_advantage:
            metrics["train/kept_samples"] = self._kept
        metrics.update(grpo.summarize_rewards(rewards))
        metrics.update(stats)
        if g.sde_window.mode != "off":  # where the SDE ran and training happened this iteration
            metrics.update({"sde_window/start": window[0], "sde_window/end": window[1]})
        metrics.update({
            "adv/mean": float(adv.mean()), "adv/std": float(adv.std(unbiased=False)), "adv/abs_max": float(adv.abs().max()),
            "adv/zero_groups": zero_groups,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time/rollout": t1 - t0, "time/decode": t1 - t_dec, "time/reward": t2 - t1, "time/train": t3 - t2,
            "samples_per_s": B / (t3 - t0),
        })
        return metrics


#: the former name of ``Trainer`` (it trained GRPO's objective only), kept for existing code
GRPOTrainer = Trainer
