"""Flow-GRPO's SD3 setting against its released trainer (yifan123/flow_grpo at ac4c86e: scripts/train_sd3.py,
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py and sd3_pipeline_with_logprob.py, flow_grpo/stat_tracking.py),
on a tiny random SD3 folder: the released formulas are written out here, independently of the project's code.

* the sigma grid of ``model.kwargs.sigma_grid: scheduler`` is the pipeline's (diffusers'
  FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(T), the issue's values at T = 10);
* the training guidance modes: ``detach_uncond`` (released ``noise_pred_uncond.detach()``) keeps the value and
  gives the unconditional branch no gradient, ``both`` gives it -s times the guided gradient, ``none`` is the
  conditional branch alone;
* one whole Flow-GRPO iteration of the trainer -- rollout with CFG, rewards, per-prompt advantages over the batch's
  std, zero-advantage filtering, PPO loss with Flow-GRPO's KL, gradients, clipping, the AdamW step -- equals the
  released trainer's on the same noise, within float32 tolerances derived below.

The released KL reference is the LoRA base model (``disable_adapter()``); this test fine-tunes fully, so both
sides take a frozen copy of the starting weights (the project's ``WeightCopy``, a deep copy here).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.training import trainer as trainer_mod
from fastvideo_grpo.utils import rng
from support.tiny_models import TEXT_LEN, tiny_components

diffusers = pytest.importorskip("diffusers")

EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_released")
    comps, _ = tiny_components("sd3")
    for sub, m in comps.items():
        m.save_pretrained(str(root / sub))
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(root / "scheduler"))
    return root


def _adapter(folder, **kw):
    return ADAPTERS.build("sd3", model_path=str(folder), resolution=16, **{"sigma_grid": "scheduler", **kw})


def test_scheduler_grid_is_the_sd3_pipelines(sd3_folder):
    """sigma_grid: scheduler samples on the grid the SD3 pipeline uses (sd3_pipeline_with_logprob.py 121-127): at
    T = 10 with shift 3 the issue's 1, .960, .913, .858, .790, .707, .602, .465, .278, .0089, 0 -- not DanceGRPO's
    shifted linspace(1, 0, 11) (1, .964, ..., .250, 0), which sigma_grid: linspace keeps."""
    ad = _adapter(sd3_folder)
    s = ad.make_schedule(10, 0.7)
    want = [1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0.0]
    assert s.sigmas.tolist() == pytest.approx(want, abs=6e-4)
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3_folder), subfolder="scheduler")
    sched.set_timesteps(10)
    torch.testing.assert_close(s.sigmas, sched.sigmas.double(), rtol=0, atol=0)  # the scheduler's own values
    # the model sees the pipeline's timesteps (sigma * 1000) up to float32 rounding
    torch.testing.assert_close(s.model_timestep(torch.arange(10), torch.zeros(10, 1)), sched.timesteps,
                               rtol=2 * EPS32, atol=0)
    assert s.shift == 3.0
    lin = _adapter(sd3_folder, sigma_grid="linspace").make_schedule(10, 0.7).sigmas
    assert float(lin[-2]) == pytest.approx(0.25) and float(s.sigmas[-2]) < 0.01


def _cond(ad, n, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((n,) + tuple(TEXT_LEN if d is None else d for d in trailing), generator=g)
            for k, trailing in ad.cond_spec().items()}


def test_training_guidance_modes(sd3_folder):
    """detach_uncond: the released train_sd3.py 189-195 (the same guided value, no gradient into the unconditional
    branch); both: the unconditional branch gets (1 - s) times the guided output's gradient; none: the conditional
    branch alone (released train.cfg False)."""
    ad = _adapter(sd3_folder)
    s = ad.cfg_scale
    z = torch.randn(2, *ad.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    cond = _cond(ad, 2, 1)
    grads = {}
    for mode in ("both", "detach_uncond", "none"):
        out = {}
        with ad.guidance(mode):
            parts = {}

            def hook(module, args, kwargs, output):  # the two branches' outputs of the one batched forward
                parts["out"] = output[0]
                output[0].retain_grad()

            h = ad.model.register_forward_hook(hook, with_kwargs=True)
            try:
                v = ad.predict(z, t, cond)
            finally:
                h.remove()
            v.sum().backward()
            out["v"], out["raw"] = v.detach(), parts["out"]
        grads[mode] = out
        ad.model.zero_grad(set_to_none=True)
    both, det, none = grads["both"], grads["detach_uncond"], grads["none"]
    assert torch.equal(both["v"], det["v"])  # the same forward, the same guided value
    g_both = both["raw"].grad.chunk(2)
    g_det = det["raw"].grad.chunk(2)
    torch.testing.assert_close(g_both[0], torch.full_like(g_both[0], 1.0 - s))  # d v / d uncond = 1 - s
    torch.testing.assert_close(g_both[1], torch.full_like(g_both[1], s))
    assert torch.equal(g_det[0], torch.zeros_like(g_det[0]))  # detached: no gradient into the uncond half
    torch.testing.assert_close(g_det[1], torch.full_like(g_det[1], s))
    assert none["raw"].shape[0] == 2  # one branch: 2 rows, not 4
    with torch.no_grad():
        cond_only = ad._forward(z, t, {k: cond[k] for k in ad.branch_keys}).float()
    torch.testing.assert_close(none["v"], cond_only, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the released trainer, written out


def _released_sde_step(v, latents, sigmas, i, noise_level, prev=None, noise=None):
    """sd3_sde_with_logprob.py 42-68, float32 as there: (prev_sample, log_prob, mean, std_dev_t)."""
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1]
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = latents * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    if prev is None:
        prev = mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    log_prob = (-((prev.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_dev_t


def _released_guided(model, latents, t, embeds, pooled, scale, detach_uncond):
    """One batched forward of [uncond; cond] and the guidance (sd3_pipeline_with_logprob.py 142-157, train_sd3.py
    181-195)."""
    out = model(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([t] * 2), encoder_hidden_states=embeds,
                pooled_projections=pooled, return_dict=False)[0]
    uncond, text = out.chunk(2)
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + scale * (text - uncond)


def _released_advantages(prompts, rewards):
    """stat_tracking.py PerPromptStatTracker(global_std=True).update: numpy float64, per-prompt mean, the population
    std of every reward + 1e-4."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.empty_like(rewards) * 0.0
    for p in np.unique(prompts):
        mean = np.mean(rewards[prompts == p], axis=0, keepdims=True)
        std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        adv[prompts == p] = (rewards[prompts == p] - mean) / std
    return adv


PROMPTS = ["a red cat", "flat", "a blue dog"]  # "flat" gets one constant reward: its advantages are exactly 0


def _reward(images, prompts, **_):
    score = images.float().mean(dim=(1, 2, 3))
    flat = torch.tensor([p == "flat" for p in prompts])
    return torch.where(flat, torch.full_like(score, 0.5), score), {}


def test_one_flow_grpo_iteration_equals_the_released_trainers(sd3_folder, monkeypatch):
    """One iteration = the released epoch: rollout, rewards, advantages, filtering, then 2 optimiser steps each over
    one micro-batch of 4 kept samples and the 3 trained steps (gradient_accumulation_steps = num_batches / 2). The
    released trainer shuffles the kept samples before cutting them into micro-batches; its draw is taken as the
    identity here, so both sides give each step the same samples (the project takes consecutive ones). The second
    step sees a moved policy: ratios off 1 (clipped), a nonzero KL in Flow-GRPO's form, AdamW's second moment."""
    T, G, P = 4, 4, 3
    overrides = [
        "--model.name=sd3", f"--sampling.num_steps={T}", "--sampling.eta=0.7", "--sampling.eta_form=flow_grpo",
        "--sampling.deterministic_last_step=false", f"--grpo.group_size={G}", f"--grpo.prompts_per_iteration={P}",
        "--grpo.tau=1.0", "--grpo.shared_noise=false", "--grpo.advantage=group_global_std",
        "--grpo.advantage_std=population", "--grpo.advantage_eps=1e-4", "--grpo.drop_zero_advantage=true",
        "--grpo.micro_batch_size=6", "--grpo.num_updates_per_iteration=2", "--grpo.update_split=samples",
        "--grpo.train_guidance=detach_uncond", "--grpo.kl_coef=0.5", "--grpo.kl_form=flow_grpo",
        "--grpo.clip_range=1e-2", "--grpo.adv_clip_max=5.0", "--optim.lr=1e-3", "--optim.weight_decay=1e-4",
        "--optim.max_grad_norm=1.0", "--train.seed=5", "--rewards=[{name: toy_geneval, key: r}]"]
    cfg = load_config(None, overrides)
    ad = _adapter(sd3_folder)
    start = copy.deepcopy(ad.model)  # the released side's policy and (frozen) reference start here
    reference = copy.deepcopy(ad.model).requires_grad_(False)
    embeds = {p: _cond(ad, 1, 10 + i) for i, p in enumerate(PROMPTS)}

    def encode(prompts):
        return {k: torch.cat([embeds[p][k] for p in prompts]) for k in embeds[PROMPTS[0]]}

    trainer = trainer_mod.Trainer(cfg, ad, {"r": _reward}, {"r": 1.0}, PromptSource(PROMPTS, encode, seed=0))
    draws, seen = [], {"grads": []}
    real_randn = rng.randn

    def recording_randn(*a, **k):
        out = real_randn(*a, **k)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(rng, "randn", recording_randn)
    sampler = trainer.sampler

    class Spy:  # the sampler, keeping the trajectory it draws (its other declarations pass through)
        def __getattr__(self, name):
            return getattr(sampler, name)

        def __call__(self, *a, **k):
            return seen.setdefault("traj", sampler(*a, **k))

    trainer.sampler = Spy()
    real_update = trainer_mod.update

    def spy_update(objective, batch, optimizer, settings, *a, **k):
        seen["batch"], seen["settings"] = batch, settings
        step = optimizer.step

        def grab(*sa, **sk):  # the gradients (after clipping) just before each AdamW step
            seen["grads"].append({n: p.grad.detach().clone() for n, p in ad.model.named_parameters()})
            return step(*sa, **sk)

        optimizer.step = grab
        try:
            return real_update(objective, batch, optimizer, settings, *a, **k)
        finally:
            del optimizer.step

    monkeypatch.setattr(trainer_mod, "update", spy_update)
    metrics = trainer.train_iteration()
    traj, batch = seen["traj"], seen["batch"]
    prompts = traj.prompts
    B = P * G
    assert len(draws) == 1 + T  # the initial noise, then one draw per (stochastic) step

    # ---- the released rollout (pipeline_with_logprob with CFG, noise_level 0.7) on the same noise
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3_folder), subfolder="scheduler")
    sched.set_timesteps(T)
    sigmas, timesteps = sched.sigmas.float(), sched.timesteps
    cond = encode(prompts)
    embeds_cfg = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]])
    pooled_cfg = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]])
    latents = draws[0]
    all_latents, all_lp = [latents], []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = _released_guided(start, latents, t.expand(B), embeds_cfg, pooled_cfg, ad.cfg_scale, False)
            latents, lp, _, _ = _released_sde_step(v.float(), latents.float(), sigmas, i, 0.7, noise=draws[1 + i])
            all_latents.append(latents)
            all_lp.append(lp)
    # tolerance of the rollout: each step is the same float32 formula in another association order (a few
    # roundings of O(|z|) terms), and each forward reads inputs (latents, the timestep sigma * 1000) that differ by
    # that much; over T steps of a model whose outputs move about as much as its inputs, 16 eps32 per step of the
    # latents' scale bounds it (measured: about 2 eps32 after 4 steps)
    scale = max(float(x.abs().max()) for x in all_latents)
    tol = 16 * T * EPS32 * scale
    assert (traj.final_latents - all_latents[-1]).abs().max() <= tol
    lp_all = torch.stack(all_lp, dim=1)  # (B, T)
    for b in range(B):
        for k, step in enumerate(traj.steps_BK[b].tolist()):
            assert (traj.latents_BK[b, k] - all_latents[step][b]).abs().max() <= tol
            # the log-prob is a mean of (x - mean)^2 / (2 s^2) with (x - mean) = s * noise: its error is the latent
            # error times 2 |noise| / s, plus float32 roundings of O(|log-prob|) terms
            s_step = float(torch.sqrt(sigmas[step] / (1 - (sigmas[1] if sigmas[step] == 1 else sigmas[step]))) * 0.7
                           * torch.sqrt(sigmas[step] - sigmas[step + 1]))
            lp_tol = 4 * tol * float(draws[1 + step][b].abs().max()) / s_step + 64 * EPS32 * abs(float(lp_all[b, step]))
            assert abs(float(traj.log_probs_BK[b, k]) - float(lp_all[b, step])) <= lp_tol
    assert sorted(set(traj.steps_BK.reshape(-1).tolist())) == [0, 1, 2]  # int(T * 0.99) = 3: every step but the last

    # ---- rewards (decode as the pipeline: latents / scaling + shift, image / 2 + 0.5 clamped) and advantages
    vae = ad.vae
    with torch.no_grad():
        images = vae.decode(all_latents[-1] / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1)
    rewards = _reward(images, prompts)[0]
    adv = _released_advantages(prompts, rewards.double().numpy())
    mask = adv != 0  # train_sd3.py 796-817: samples whose advantage is 0 at every step leave the update
    assert mask.sum() == 2 * G and all(not m for m, p in zip(mask, prompts) if p == "flat")
    assert metrics["train/kept_samples"] == 2 * G and seen["settings"].micro_batch_size == G
    kept = np.nonzero(mask)[0]
    assert batch.traj.prompts == [prompts[i] for i in kept]
    # a reward is a mean of decoded pixels in [0, 1]: a few float32 roundings plus the latent error through the VAE
    # (32 eps32); the advantage divides it by the batch's std, and the project rounds it to float32
    adv_tol = 2 * 32 * EPS32 / float(np.std(rewards.double().numpy())) + 4 * EPS32 * float(np.abs(adv).max())
    torch.testing.assert_close(batch.advantages_B.double(), torch.from_numpy(adv[kept]), rtol=0, atol=adv_tol)

    # ---- the released update: per micro-batch (GA 1) the 3 trained steps accumulated, clip, AdamW (torch's, as
    # released: betas 0.9 / 0.999, eps 1e-8, weight decay 1e-4)
    policy = copy.deepcopy(start).train()
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    adv_t = torch.from_numpy(adv[kept])  # float64, as released
    train_steps, grads, losses, kls = 3, [], [], []
    for part in np.array_split(np.arange(len(kept)), 2):  # positions in the kept samples (the shuffle: identity)
        idx = [int(kept[i]) for i in part]
        c = encode([prompts[i] for i in idx])
        e = torch.cat([c["negative_prompt_embeds"], c["prompt_embeds"]])
        pe = torch.cat([c["negative_pooled_prompt_embeds"], c["pooled_prompt_embeds"]])
        opt.zero_grad()
        for j in range(train_steps):
            x = torch.stack([all_latents[j][i] for i in idx])
            x_next = torch.stack([all_latents[j + 1][i] for i in idx])
            t = timesteps[j].expand(len(idx))
            v = _released_guided(policy, x, t, e, pe, ad.cfg_scale, True)
            _, log_prob, mean, std_dev_t = _released_sde_step(v.float(), x.float(), sigmas, j, 0.7, prev=x_next.float())
            with torch.no_grad():
                v_ref = _released_guided(reference, x, t, e, pe, ad.cfg_scale, True)
                _, _, mean_ref, _ = _released_sde_step(v_ref.float(), x.float(), sigmas, j, 0.7, prev=x_next.float())
            a = torch.clamp(adv_t[torch.as_tensor(part)], -5.0, 5.0)
            ratio = torch.exp(log_prob - lp_all[idx, j])
            policy_loss = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - 1e-2, 1.0 + 1e-2)))
            # train_sd3.py 895: divided by 2 std_dev_t^2, the noise level without the step's sqrt(-dt)
            kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t ** 2))
            loss = policy_loss + 0.5 * kl
            (loss / train_steps).backward()  # accelerate: loss / (gradient_accumulation_steps * timesteps)
            losses.append(float(loss.detach()))
            kls.append(float(kl.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
    assert kls[0] == 0.0 < kls[-1]  # the second optimiser step sees the moved policy
    assert metrics["train/loss"] == pytest.approx(float(np.mean(losses)), rel=1e-3, abs=1e-6)
    assert metrics["train/kl"] == pytest.approx(float(np.mean(kls)), rel=1e-3, abs=1e-9)
    names = [n for n, _ in ad.model.named_parameters()]
    g_tols = []
    for step in range(2):
        tols = {}
        for n, g_rel in zip(names, grads[step]):
            g_ours = seen["grads"][step][n]
            # the gradient is a sum over 3 micro-steps of products through the model (a few hundred float32 ops per
            # entry); relative to the tensor's largest entry 3e-4 bounds it (measured: below 5e-5), the rollout's
            # error entering at the same relative size
            tols[n] = 3e-4 * float(g_rel.abs().max()) + 1e-10
            assert (g_ours - g_rel).abs().max() <= tols[n], (step, n)
        g_tols.append(tols)
    # the parameters after the two AdamW steps: an error dg in a step's gradient moves that step by at most
    # lr * 2.5 dg / (sqrt(v_hat) + eps) (d/dg of m_hat / (sqrt(v_hat) + eps), |m_hat| / sqrt(v_hat) <= 1.5), capped
    # at 3 lr (two steps of bounded size); v_hat after step 2 from the released gradients
    lr, eps = 1e-3, 1e-8
    for n, p_rel, p_ours, g1, g2 in zip(names, params, ad.model.parameters(), grads[0], grads[1]):
        v_hat = (0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2) / (1 - 0.999 ** 2)
        dg = g_tols[0][n] + g_tols[1][n]
        first = eps * g_tols[0][n] / (torch.clamp(g1.abs() - g_tols[0][n], min=0) + eps) ** 2
        p_tol = lr * torch.clamp(first + 2.5 * dg / (v_hat.sqrt() + eps), max=3.0) + 8 * EPS32 * p_rel.detach().abs()
        assert ((p_ours.detach() - p_rel.detach()).abs() <= p_tol + 1e-12).all(), n
    assert any(not torch.equal(p0, p) for p0, p in zip(start.parameters(), ad.model.parameters()))


def test_lora_gaussian_init_is_the_released_one(sd3_folder):
    """model.kwargs.lora_init: gaussian (released LoraConfig(init_lora_weights="gaussian")): every A ~ N(0, 1 / r),
    B = 0, so the adapter starts at the base model; the default init draws A from a bounded uniform instead."""
    r = 4
    ad = _adapter(sd3_folder, lora_rank=r, lora_alpha=8, lora_init="gaussian",
                  lora_target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"])
    a = torch.cat([p.detach().reshape(-1) for n, p in ad.model.named_parameters() if "lora_A" in n])
    b = [p for n, p in ad.model.named_parameters() if "lora_B" in n]
    assert b and all(torch.equal(p, torch.zeros_like(p)) for p in b)
    n = a.numel()
    # the sample std of n normal draws is within 5 / sqrt(2 n) of the true one (relative), all but surely
    assert abs(float(a.std()) * r - 1.0) < 5 / math.sqrt(2 * n)
    default = _adapter(sd3_folder, lora_rank=r, lora_alpha=8,
                       lora_target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"])
    a0 = torch.cat([p.detach().reshape(-1) for n_, p in default.model.named_parameters() if "lora_A" in n_])
    # peft's default: Kaiming-uniform, bounded by 1 / sqrt(fan_in) (every adapted layer reads 32 features here)
    assert float(a0.abs().max()) <= 1 / math.sqrt(32) + 1e-6 < float(a.abs().max())
    with pytest.raises(ValueError, match="lora_init"):
        _adapter(sd3_folder, lora_rank=r, lora_init="normal")
