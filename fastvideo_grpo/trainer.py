"""GRPOTrainer: rollout -> reward -> advantage -> PPO-clip updates, one iteration at a time.

The loop of DESIGN.md "The one loop". Departures from the paper's Algorithm 1, stated here:
* Timestep subsets are drawn per sample before the rollout (as the reference implementation
  does), so only those transitions are stored.
* As the released code (not stated in the paper): the last sampling step is never trained on
  (``grpo.train_last_step``), each sample trains ``int(tau * (T - 1))`` steps, and for flow models the
  last step is deterministic (``sampling.deterministic_last_step``), so the rewarded image is the clean
  prediction ``z - sigma * u`` (docs/fidelity.md).
* The int(tau * (T - 1)) selected steps are split into ``num_updates_per_iteration`` consecutive chunks;
  each chunk's gradients are accumulated over its steps and followed by one optimiser step. pi_old
  stays the rollout policy throughout the iteration (PPO's usual convention). (The released code
  splits the samples instead: each optimiser step sees all kept steps of a subset of the samples.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import grpo, nft, residency, sde_window
from .passes import PassCounter
from .config import RunConfig
from .cuda_settings import configure_attention
from .dtypes import autocast_dtype
from .ema import WeightEMA
from .data.prompt_source import PromptSource
from .models.base import PolicyAdapter, index_cond
from .rewards.base import RewardFn, compute_rewards
from .rollout import Trajectory, autocast_context, decode_latents, rollout, sampling_memory


# ----------------------------------------------------------------------------- the update



def grpo_update(
    adapter: PolicyAdapter,
    schedule,
    traj: Trajectory,
    advantages_B: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    clip_range: float,
    adv_clip_max: Optional[float] = 5.0,
    num_updates: int = 1,
    max_grad_norm: float = 1.0,
    micro_batch_size: int = 0,
    ref_adapter: Optional[PolicyAdapter] = None,
    kl_coef: float = 0.0,
    lr_scheduler=None,
    on_first_ratio: Optional[Callable[[torch.Tensor], None]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Dict[str, float]:
    """PPO-clip updates over the kept transitions of ``traj``; returns averaged diagnostics.

    ``on_first_ratio`` (for tests) receives the first micro-batch's ratio before any update; its
    largest deviation from 1 is reported as ``train/first_ratio_dev``.
    """
    module = adapter.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter's trainable module has no parameters with requires_grad=True")
    B, K = traj.log_probs_BK.shape
    device = traj.latents_BK.device
    adv = advantages_B.to(device=device, dtype=torch.float32)
    row_chunks, step_chunks = grpo.update_chunks(B, K, micro_batch_size, num_updates)
    # Diagnostics stay on the device and are read back once per update (one sync), not per micro-step.
    keys = ("loss", "clipfrac", "approx_kl", "ratio_mean", "kl")
    totals = torch.zeros(len(keys), dtype=torch.float32, device=device)
    count = 0
    first_ratio_dev = torch.zeros(1, dtype=torch.float32, device=device)
    grad_norms = []
    use_kl = ref_adapter is not None and kl_coef > 0
    module.train()
    for step_chunk in step_chunks:
        optimizer.zero_grad(set_to_none=True)
        denom = len(step_chunk) * len(row_chunks)
        loss_finite = []  # per micro-step, on the device
        for k in step_chunk:
            for rows in row_chunks:
                rows_dev = rows.to(device)
                idx = traj.steps_BK[rows, k]
                z = traj.latents_BK[rows_dev, k]
                z_next = traj.next_latents_BK[rows_dev, k]
                cond = traj.cond if len(row_chunks) == 1 else index_cond(traj.cond, rows_dev)
                t = schedule.model_timestep(idx, z)
                with autocast_context(device, autocast_dtype):  # same precision as the rollout: ratio stays 1
                    out = adapter.predict(z, t, cond)
                _, logp, mean, std = schedule.step(idx, out, z, prev_sample=z_next, need_mean=use_kl)
                kl_B = None
                if use_kl:
                    with torch.no_grad(), autocast_context(device, autocast_dtype):
                        ref_out = ref_adapter.predict(z, t, cond)
                        _, _, ref_mean, _ = schedule.step(idx, ref_out, z, prev_sample=z_next)
                    kl_B = grpo.gaussian_kl_same_std(mean, ref_mean, std)
                old = traj.log_probs_BK[rows_dev, k]
                if count == 0:  # before any optimiser step: the ratio must be 1 (same weights, same arithmetic)
                    first_ratio = torch.exp(logp.detach() - old)
                    first_ratio_dev = (first_ratio - 1.0).abs().max().float().reshape(1)
                    if on_first_ratio is not None:
                        on_first_ratio(first_ratio)
                loss, st = grpo.ppo_clip_loss(logp, old, adv[rows_dev], clip_range, adv_clip_max, kl_B, kl_coef)
                loss_finite.append(torch.isfinite(st.loss))
                # backward runs even for a bad loss so that every rank takes part in the same
                # collectives; the (global) gradient norm below is then non-finite on all ranks
                (loss / denom).backward()
                totals += torch.stack([getattr(st, key).float() for key in keys])
                count += 1
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # global norm under FSDP
        if hasattr(gn, "full_tensor"):  # a DTensor when the parameters are sharded
            gn = gn.full_tensor()
        # the one host sync of this update: gradient norm and which micro-steps had a finite loss
        gn_and_flags = torch.cat([gn.detach().float().reshape(1), torch.stack(loss_finite).float()]).tolist()
        grad_norms.append(gn_and_flags[0])
        bad = [i for i, ok in enumerate(gn_and_flags[1:]) if not ok]
        if bad or not math.isfinite(grad_norms[-1]):
            optimizer.zero_grad(set_to_none=True)
            where = ""
            if bad:
                k_bad = list(step_chunk)[bad[0] // len(row_chunks)]
                where = f"non-finite GRPO loss at kept step {k_bad}"
            raise FloatingPointError(
                f"{where or 'non-finite gradient norm'}; optimiser step skipped "
                "(lower the learning rate or check the rewards)"
            )
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
    *sums, first_dev = torch.cat([totals, first_ratio_dev]).tolist()
    out = {f"train/{k}": v / max(count, 1) for k, v in zip(keys, sums)}
    # |ratio - 1| at the first micro-step: 0 when rollout and re-scoring run the same arithmetic; on GPUs,
    # bf16 kernels chosen by batch shape can make it ~1e-6..1e-5, to compare with grpo.clip_range
    out["train/first_ratio_dev"] = first_dev
    out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
    out["train/num_updates"] = len(grad_norms)
    return out


# ----------------------------------------------------------------------------- the trainer


def frozen_reference(adapter: PolicyAdapter) -> PolicyAdapter:
    """A frozen copy of the policy as it is now: the reference model of the KL term (``grpo.kl_coef``).

    Holds a second full copy of the trainable module's weights. Sharded (FSDP2 / DTensor) models are
    refused: copying them would copy the shards' communication hooks too.
    """
    from torch.distributed.tensor import DTensor

    module = adapter.trainable_module()
    if any(isinstance(p, DTensor) for p in module.parameters()):
        raise ValueError("grpo.kl_coef > 0 is not supported with a sharded (FSDP) model yet: pass a reference "
                         "adapter to GRPOTrainer(ref_adapter=...) or set grpo.kl_coef: 0 (the paper uses no KL)")
    ref = copy.deepcopy(adapter)
    for p in ref.trainable_module().parameters():
        p.requires_grad_(False)
    ref.trainable_module().eval()
    return ref


def build_schedule(cfg: RunConfig, adapter: PolicyAdapter):
    """The adapter's sampling schedule for ``cfg.sampling``, with the last step made deterministic when
    ``sampling.deterministic_last_step`` says so (null: the schedule's own default, see sde.py).

    ValueError when a step that training may pick (``grpo.trainable_window``) has eta = 0: its
    transition is a point mass, with no log-prob to train."""
    from .sde import flow_grpo_eta, with_deterministic_last_step

    s = cfg.sampling
    schedule = adapter.make_schedule(s.num_steps, cfg.eta)
    if s.eta_form == "flow_grpo":
        if schedule.prediction_type != "flow":
            raise ValueError(f"sampling.eta_form: flow_grpo needs a flow-matching model; {cfg.model.name} samples "
                             f"with a {schedule.prediction_type} schedule (use 'constant')")
        schedule = dataclasses.replace(schedule, eta=flow_grpo_eta(schedule.sigmas, schedule.eta))
    last = s.deterministic_last_step
    if last is None:
        last = type(schedule).deterministic_last_step_default
    if last:
        schedule = with_deterministic_last_step(schedule)
    if s.ode_solver != "euler" and schedule.prediction_type != "flow":
        raise ValueError(f"sampling.ode_solver: {s.ode_solver} needs a flow-matching model; "
                         f"{cfg.model.name} samples with a {schedule.prediction_type} schedule (use 'euler')")
    lo, hi = grpo.trainable_window(schedule.num_steps, cfg.grpo.timestep_window, cfg.grpo.train_last_step)
    # (DiffusionNFT needs no log-probs: its rollouts may be deterministic)
    dead = [i for i in range(lo, hi) if float(schedule.eta[i]) <= 0] if cfg.grpo.objective == "grpo" else []
    if dead:
        why = (" (the last step is deterministic: sampling.deterministic_last_step; set grpo.train_last_step: "
               "false, as the released code)" if dead == [schedule.num_steps - 1] else "")
        raise ValueError(f"steps {dead} have eta = 0 but training may pick them (window [{lo}, {hi})){why}; "
                         "set sampling.eta > 0 there or narrow grpo.timestep_window")
    return schedule


class GRPOTrainer:
    """Owns the optimiser and the per-iteration logic; logging and saving are injected callbacks."""

    def __init__(self, cfg: RunConfig, adapter: PolicyAdapter, reward_fns: Dict[str, RewardFn],
                 reward_weights: Dict[str, float], prompt_source: PromptSource, ref_adapter=None, dp_group=None):
        """``dp_group``: the data-parallel process group (None in one process); only
        ``grpo.advantage: global`` needs it, to normalise over the global batch."""
        self.cfg = cfg
        configure_attention(cfg.train.cudnn_attention)
        self.dp_group = dp_group
        self.adapter = adapter
        self.reward_fns = reward_fns
        self.reward_weights = reward_weights
        self.prompts = prompt_source
        if cfg.grpo.kl_coef > 0 and ref_adapter is None:
            ref_adapter = frozen_reference(adapter)
        self.ref_adapter = ref_adapter
        params = [p for p in adapter.trainable_module().parameters() if p.requires_grad]
        o = cfg.optim
        # one fused kernel for the whole update on GPU (the largest non-model cost in bench/iteration.py), and
        # for FSDP2's CPU offload, where the step runs on the CPU copies: torch's fused CPU AdamW took 0.052 s per
        # 50M-parameter step against 0.323 s for the default foreach one (one thread; DeepSpeed's CPUAdam 0.048 s)
        on_cpu = all(p.device.type == "cpu" for p in params)
        fused = all(p.device.type == "cuda" for p in params) or (bool(cfg.parallel.cpu_offload) and on_cpu)
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=fused or None)
        warm = max(0, o.warmup_iterations) * cfg.grpo.num_updates_per_iteration
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.schedule = build_schedule(cfg, adapter)
        # EMA of the weights (train.ema_decay), cloned from the parameters as they are now (sharded under FSDP2);
        # loop.EMAUpdate updates it after every iteration, checkpoint.py saves it
        self.ema = WeightEMA(adapter.trainable_module(), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
        self.iteration = 0
        self.passes = PassCounter()  # model passes of each iteration, in its metrics (passes.py)
        # autocast applies on CUDA only (rollout._autocast); CPU runs stay in the weights' dtype
        self.autocast_dtype = autocast_dtype(cfg.train.autocast)
        # chunk sizes of the rollout and the decode, and where the VAE lives between decodes
        self.memory = sampling_memory(cfg.sampling)
        if cfg.sampling.offload_vae:
            residency.to_host(adapter.decoder_modules(), pin=adapter.device.type == "cuda")

    def advantages(self, rewards: Dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
        """Weighted sum of per-reward advantages for this rank's samples.

        Group-relative advantages need only the rank's own (whole) groups. ``global`` (DDPO-style)
        normalisation uses every dp rank's rewards: they are all-gathered, normalised together, and
        this rank's slice is returned (all ranks hold the same number of samples).
        """
        g = self.cfg.grpo
        if g.advantage != "global" or self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return grpo.aggregate_advantages(rewards, group_size, self.reward_weights, g.advantage, g.advantage_std)
        from .distributed.collectives import all_gather_rewards

        gathered = all_gather_rewards({k: r.detach() for k, r in rewards.items()}, self.dp_group)
        total = grpo.aggregate_advantages(gathered, group_size, self.reward_weights, "global", g.advantage_std)
        n = next(iter(rewards.values())).numel()
        start = dist.get_rank(self.dp_group) * n
        return total[start:start + n]

    def state_dict(self):
        """Everything the trainer owns besides the model and optimiser tensors (which checkpoint.py
        writes sharded with DCP): the iteration, LR schedule, noise generator and prompt position."""
        return {
            "iteration": self.iteration,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "prompts": self.prompts.state_dict(),
        }

    def load_state_dict(self, state, restore_generator: bool = True):
        """Inverse of ``state_dict``. ``restore_generator=False`` keeps the current generator (a checkpoint
        from another world size: its per-rank streams cannot be matched to ranks; see checkpoint.py)."""
        self.iteration = int(state["iteration"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.prompts.load_state_dict(state["prompts"])
        if restore_generator:
            self.generator.set_state(state["generator"])
        self._apply_optim_config()

    def _apply_optim_config(self) -> None:
        """The optimiser settings of ``cfg.optim`` over those restored from a checkpoint: a resumed run
        trains with the lr (and betas, eps, weight decay) its config says, as config.yaml records.
        The schedule position (warm-up) continues."""
        o = self.cfg.optim
        self.lr_scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=o.lr, lr=o.lr * factor, betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay)

    def iteration_schedule(self):
        """The schedule and the trainable window ``[lo, hi)`` of the coming iteration: the static ones, or with
        ``grpo.sde_window`` the window of this iteration (sde_window.py) and the schedule with eta 0 outside it.
        The random mode draws its position from a generator seeded by (train.seed, iteration): the same window
        on every data-parallel rank, the same after a resume, and the rollout noise stream untouched."""
        g = self.cfg.grpo
        window = grpo.trainable_window(self.schedule.num_steps, g.timestep_window, g.train_last_step)
        draw = torch.Generator().manual_seed(sde_window.window_seed(self.cfg.train.seed, self.iteration))
        moving = sde_window.window_for_iteration(g.sde_window, self.iteration, window, draw)
        if moving is None:
            return self.schedule, window
        return sde_window.only_in_window(self.schedule, moving), moving

    def train_iteration(self) -> Dict[str, float]:
        self.passes.reset()
        with self.passes.watch(self.adapter, self.ref_adapter):
            metrics = self._iteration()
        metrics.update(self.passes.metrics())
        return metrics

    def _iteration(self) -> Dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.perf_counter()
        prompts, cond = self.prompts.next_batch(g.prompts_per_iteration)
        B = len(prompts) * g.group_size
        schedule, window = self.iteration_schedule()
        keep = grpo.subsample_timesteps(schedule.num_steps, g.tau, B, self.generator, window)
        self.adapter.trainable_module().eval()
        m = self.memory
        with self.passes.phase("rollout"):
            traj = rollout(self.adapter, schedule, prompts, cond, g.group_size, keep, self.generator,
                           shared_noise=g.shared_noise, autocast_dtype=self.autocast_dtype, decode=False,
                           rollout_batch_size=m["rollout_batch_size"], ode_solver=cfg.sampling.ode_solver)
        t_dec = time.perf_counter()
        traj.decoded = decode_latents(self.adapter, traj.final_latents, m["decode_batch_size"], m["offload_vae"])
        t1 = time.perf_counter()
        rewards, _ = compute_rewards(self.reward_fns, traj.decoded, traj.prompts)
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
        # groups whose samples all got the same rewards have zero advantages: no learning signal from them
        zero_groups = float((adv.detach().reshape(-1, group).abs().amax(dim=1) == 0).float().mean())
        if zero_groups == 1.0:
            warnings.warn(f"iteration {self.iteration + 1}: every group's samples got identical rewards, so every "
                          "advantage is 0 and this iteration learns nothing; a reward that cannot tell the samples of "
                          "a prompt apart (thresholded too high or low, saturated) gives no signal", stacklevel=2)
        if g.objective == "nft":
            stats = nft.nft_update(
                self.adapter, schedule, traj, adv, self.optimizer, self.generator, beta=g.nft_beta,
                num_updates=g.num_updates_per_iteration, max_grad_norm=cfg.optim.max_grad_norm,
                micro_batch_size=g.micro_batch_size, lr_scheduler=self.lr_scheduler,
                autocast_dtype=self.autocast_dtype)
        else:
            stats = self._grpo_update(schedule, traj, adv)
        t3 = time.perf_counter()
        self.iteration += 1
        return self._metrics(rewards, stats, adv, zero_groups, window, B, (t0, t_dec, t1, t2, t3))

    def _grpo_update(self, schedule, traj, adv):
        cfg, g = self.cfg, self.cfg.grpo
        return grpo_update(
            self.adapter, schedule, traj, adv, self.optimizer,
            clip_range=g.clip_range, adv_clip_max=g.adv_clip_max, num_updates=g.num_updates_per_iteration,
            max_grad_norm=cfg.optim.max_grad_norm, micro_batch_size=g.micro_batch_size,
            ref_adapter=self.ref_adapter, kl_coef=g.kl_coef, lr_scheduler=self.lr_scheduler,
            autocast_dtype=self.autocast_dtype,
        )

    def _metrics(self, rewards, stats, adv, zero_groups, window, B, times):
        g = self.cfg.grpo
        t0, t_dec, t1, t2, t3 = times
        metrics = {"iteration": self.iteration}
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
