"""MixGRPO's sliding window and Flow-GRPO-Fast's random window (sde_window.py), and the DPM-Solver++(2M)
steps of MixGRPO-Flash (sde.flow_dpmpp_2m_step) against diffusers' own multistep scheduler."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastvideo_grpo.algorithms import grpo, sde_window
from fastvideo_grpo import sde
from fastvideo_grpo.config import load_config
from fastvideo_grpo.algorithms.rollout import rollout, sample_ode
from support.tiny_models import tiny_toy_adapter


def _released_rule(num_iterations, hi, size, start, stride, shift_every, roll_back):
    """The window as the released MixGRPO trainer moves it: a counter per position, the start moved by the
    stride when the counter reaches shift_every, back to the start (roll_back) or held once it would overrun."""
    cur, count, out = start, 0, []
    for _ in range(num_iterations):
        out.append(cur)
        count += 1
        if count >= shift_every:
            count = 0
            cur += stride
            if cur + size > hi:
                cur = start if roll_back else cur - stride
    return out


@pytest.mark.parametrize("size,start,stride,shift_every,roll_back", [
    (4, 0, 1, 3, False), (4, 0, 1, 3, True), (2, 1, 2, 2, False), (3, 0, 2, 1, True), (1, 0, 1, 25, False)])
def test_sliding_window_position_per_iteration_follows_the_released_rule(size, start, stride, shift_every, roll_back):
    hi = 9  # T = 10 steps, the last one never trained
    want = _released_rule(60, hi, size, start, stride, shift_every, roll_back)
    got = [sde_window.sliding_window_start(k, 0, hi, size, start, stride, shift_every, roll_back) for k in range(60)]
    assert got == want
    assert all(0 <= s and s + size <= hi for s in got)
    assert got[0] == start and (roll_back or got == sorted(got))  # from early (noisy) steps to late ones


def test_sliding_window_inside_a_static_window_and_errors():
    # positions count from the start of grpo.timestep_window
    assert [sde_window.sliding_window_start(k, 3, 8, 2, 0, 1, 1) for k in range(6)] == [3, 4, 5, 6, 6, 6]
    with pytest.raises(ValueError, match="does not fit"):
        sde_window.sliding_window_start(0, 0, 4, 3, start=2)
    with pytest.raises(ValueError, match="does not fit"):
        sde_window.random_window_start(0, 2, 3, None)


def test_random_window_is_reproducible_and_covers_every_position():
    g = torch.Generator().manual_seed(0)
    starts = [sde_window.random_window_start(2, 9, 2, g) for _ in range(400)]
    assert set(starts) == set(range(2, 8))  # [2, 9) holds 6 positions of a 2-step window
    counts = np.bincount(starts)[2:]
    assert counts.min() > 400 / 6 * 0.6  # roughly uniform
    g2 = torch.Generator().manual_seed(0)
    assert [sde_window.random_window_start(2, 9, 2, g2) for _ in range(400)] == starts


def test_eta_is_zero_outside_the_window_and_kept_steps_lie_inside():
    sched = sde.FlowSchedule.create(10, eta=torch.linspace(0.2, 0.9, 10).tolist(), shift=3.0)
    w = sde_window.only_in_window(sched, (3, 7))
    assert torch.equal(w.eta[3:7], sched.eta[3:7]) and (w.eta[:3] == 0).all() and (w.eta[7:] == 0).all()
    assert torch.equal(w.sigmas, sched.sigmas) and (sched.eta > 0).all()  # the original is not changed
    keep = grpo.subsample_timesteps(10, 1.0, 6, torch.Generator().manual_seed(1), (3, 7))
    assert keep.shape == (6, 4) and torch.equal(keep.sort(dim=1).values, torch.arange(3, 7).expand(6, 4))
    keep = grpo.subsample_timesteps(10, 0.5, 6, torch.Generator().manual_seed(1), (3, 7))
    assert keep.shape == (6, 2) and ((keep >= 3) & (keep < 7)).all()


_toy = tiny_toy_adapter


@pytest.mark.numerics
def test_rollout_is_deterministic_before_the_window_and_stochastic_inside():
    ad = _toy()
    prompts = ["two red circles"]
    cond = ad.encode_prompts(prompts)
    sched = sde_window.only_in_window(ad.make_schedule(5, 0.5), (2, 4))
    keep = torch.tensor([[2, 3]] * 3)
    trajs = [rollout(ad, sched, prompts, cond, 3, keep, torch.Generator().manual_seed(s), decode=False)
             for s in (0, 1)]
    # the first two steps are ODE steps: z at step 2 is the 2-step ODE sample from the same initial noise
    ode2 = ad.make_schedule(5, 0.0)
    z = trajs[0].latents_BK[:, 0]
    # one shared noise, no SDE noise yet: three rows with the same input in one batched call of each step
    # (the same kernel call; a row's result does not depend on where it sits), so the same bits
    assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[2])
    # the stochastic steps inside the window differ within the group and carry a log-prob
    nxt = trajs[0].next_latents_BK[:, 0]
    assert not torch.allclose(nxt[0], nxt[1]) and (trajs[0].log_probs_BK != 0).all()
    # replay the deterministic prefix by hand with Euler
    g = torch.Generator().manual_seed(0)
    z0 = ad.initial_noise(1, g)
    zz = z0
    for i in range(2):
        out = ad.predict(zz, ode2.model_timestep(i, zz), cond)
        zz = sde.flow_ode_step(out, zz, ode2.sigmas[i], ode2.sigmas[i + 1])
    torch.testing.assert_close(z[:1], zz, rtol=0, atol=1e-6)


def test_config_refuses_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match="sde_window"):
        sde_window.training_window(load_config(None, ["--sampling.num_steps=5",
                                                      "--grpo.sde_window={mode: sliding, size: 5}"]))
    with pytest.raises(ValueError, match="sde_window.mode"):
        load_config(None, ["--grpo.sde_window={mode: window}"])
    with pytest.raises(ValueError, match="ode_solver"):
        load_config(None, ["--sampling.ode_solver=heun"])
    cfg = load_config(None, ["--sampling.num_steps=10", "--grpo.sde_window={mode: sliding, size: 4, start: 5}"])
    assert cfg.grpo.sde_window.size == 4


# ----------------------------------------------------------------------------- MixGRPO-Flash: DPM-Solver++(2M)


def _velocity(z, sigma):
    """A smooth, nonlinear, sigma-dependent velocity field (stand-in for a denoiser)."""
    return torch.tanh(z) * (1.5 - sigma) + 0.3 * torch.sin(3 * z) * sigma - 0.2


@pytest.mark.parametrize("n", [6, 12])
def test_dpmpp_2m_matches_diffusers_multistep_scheduler(n):
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=2, algorithm_type="dpmsolver++",
                                      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                      solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
    ref.set_timesteps(n)
    sigmas = ref.sigmas.to(torch.float64)
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    z_ref = z0.clone()
    for i, t in enumerate(ref.timesteps):
        z_ref = ref.step(_velocity(z_ref, float(sigmas[i])), t, z_ref).prev_sample
    z, x0 = z0.clone(), None
    for i in range(n):
        s_prev = float(sigmas[i - 1]) if i else None
        z, x0 = sde.flow_dpmpp_2m_step(_velocity(z, float(sigmas[i])), z, float(sigmas[i]), float(sigmas[i + 1]),
                                       x0, s_prev)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
    # and it is a different (second-order) solver than Euler on the same grid
    ze = z0.clone()
    for i in range(n):
        ze = sde.flow_ode_step(_velocity(ze, float(sigmas[i])), ze, float(sigmas[i]), float(sigmas[i + 1]))
    assert (ze - z_ref).abs().max() > 1e-3


def test_dpmpp_first_order_step_is_the_euler_step():
    z = torch.randn(3, 5, dtype=torch.float64)
    u = torch.randn(3, 5, dtype=torch.float64)
    for s, s_next in ((1.0, 0.8), (0.7, 0.4), (0.3, 0.0)):
        got, x0 = sde.flow_dpmpp_2m_step(u, z, s, s_next)
        torch.testing.assert_close(got, z + u * (s_next - s))
        torch.testing.assert_close(x0, z - s * u)


def test_rollout_with_dpmpp_outside_the_window():
    ad = _toy(1)
    prompts = ["one blue square"]
    cond = ad.encode_prompts(prompts)
    base = ad.make_schedule(6, 0.4)
    sched = sde_window.only_in_window(base, (1, 3))
    keep = torch.tensor([[1, 2]] * 2)
    fast = rollout(ad, sched, prompts, cond, 2, keep, torch.Generator().manual_seed(3), decode=False,
                   ode_solver="dpmpp_2m")
    plain = rollout(ad, sched, prompts, cond, 2, keep, torch.Generator().manual_seed(3), decode=False)
    # step 0 has no history: first order, i.e. the Euler step, so the window starts from the same z ...
    torch.testing.assert_close(fast.latents_BK[:, 0], plain.latents_BK[:, 0], rtol=0, atol=1e-6)
    assert (fast.log_probs_BK != 0).all()  # (an Euler step draws unused noise, a DPM step none: the draws differ)
    # ... and the ODE steps after it are DPM-Solver++(2M), by hand from the window's last sample
    z, x0, sig = fast.next_latents_BK[:, 1], None, base.sigmas
    zz = fast.latents_BK[:, 1]
    x0 = zz - float(sig[2]) * ad.predict(zz, base.model_timestep(2, zz), fast.cond)
    for i in range(3, 6):
        out = ad.predict(z, base.model_timestep(i, z), fast.cond)
        z, x0 = sde.flow_dpmpp_2m_step(out, z, float(sig[i]), float(sig[i + 1]), x0, float(sig[i - 1]))
    torch.testing.assert_close(fast.final_latents, z, rtol=0, atol=1e-5)
    assert not torch.allclose(fast.final_latents, plain.final_latents, atol=1e-4)
    with pytest.raises(ValueError, match="ode_solver"):
        rollout(ad, sched, prompts, cond, 2, keep, torch.Generator(), ode_solver="heun")


# ----------------------------------------------------------------------------- MixGRPO-Flash: the "post" strategy


def _released_post_grid(T, shift, last, ratio):
    """MixGRPO's sampling_utils.py 44-54, written out: the grid up to the window's last step, then
    int(max((T - last) * ratio, 1)) points from the unshifted time after the window down to 0, shifted."""
    sig = torch.linspace(1, 0, T + 1, dtype=torch.float64)
    shifted = shift * sig / (1 + (shift - 1) * sig)
    n = int(max((T - last) * ratio, 1))
    post = torch.linspace(float(sig[last + 1]), 0, n, dtype=torch.float64)
    return torch.cat([shifted[:last + 1], shift * post / (1 + (shift - 1) * post)])


@pytest.mark.parametrize("ratio", [0.4, 0.2, 1.0])
def test_compressed_post_window_grid_is_the_released_one(ratio):
    T, shift = 25, 3.0
    sigmas = sde.flow_sigmas(T, shift)
    for last in range(T - 1):
        got = sde.compressed_tail(sigmas, last, ratio, shift)
        want = _released_post_grid(T, shift, last, ratio)
        if want.numel() - last - 1 >= 2:  # the released grid reaches 0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        else:  # the released grid stops at sigma_{last + 1} > 0: here one more step to 0
            torch.testing.assert_close(got[:-1], want, rtol=0, atol=1e-12)
            assert float(got[-1]) == 0.0 and float(want[-1]) > 0
    # ratio 1 gives the grid's own steps back
    torch.testing.assert_close(sde.compressed_tail(sigmas, 5, 1.0, shift), sigmas, rtol=0, atol=1e-12)


def _released_dpm_midpoint(x0, x0_prev, z, s_prev, s, s_next):
    """sampling_utils.py 398-447 and 449-526 (dpmsolver++, midpoint), float64: first order without history, second
    order with it (lambda = log(alpha) - log(sigma), alpha = 1 - sigma)."""
    lam = lambda v: math.log(1 - v) - math.log(v)  # noqa: E731
    if s_next == 0.0:  # lower_order_final: the first-order step to sigma 0 lands on x0
        return x0
    h = lam(s_next) - lam(s)
    if x0_prev is None:
        return (s_next / s) * z - ((1 - s_next) * (math.exp(-h) - 1.0)) * x0
    r0 = (lam(s) - lam(s_prev)) / h
    d1 = (1.0 / r0) * (x0 - x0_prev)
    return (s_next / s) * z - ((1 - s_next) * (math.exp(-h) - 1.0)) * x0 - 0.5 * ((1 - s_next) * (math.exp(-h) - 1.0)) * d1


def test_flash_post_rollout_is_the_released_run_sample_step(monkeypatch):
    """dpm_apply: post through the rollout against MixGRPO's run_sample_step (post strategy, flow_grpo_sampling)
    written out: Euler (flow_grpo_step's deterministic branch) before the window, Flow-GRPO's SDE step in it, then
    DPM-Solver++(2M) on the compressed grid, its history being the data prediction of every earlier step."""
    from fastvideo_grpo.utils import rng

    ad = _toy(2)
    T, shift, ratio, window = 10, 3.0, 0.4, (1, 3)
    base = sde.FlowSchedule.create(T, eta=0.7, shift=shift)
    base = dataclasses.replace(base, eta=sde.flow_grpo_eta(base.sigmas, 0.7))
    sched = sde_window.compress_after_window(sde_window.only_in_window(base, window), ratio)
    last = window[1] - 1
    assert sched.num_steps == last + int((T - last) * ratio) == 5  # 10 steps -> 5: two after the window
    prompts = ["one blue square"]
    cond = ad.encode_prompts(prompts)
    draws = []
    real = rng.randn

    def recording(*a, **k):
        out = real(*a, **k)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(rng, "randn", recording)
    keep = torch.tensor([[1, 2]] * 2)
    traj = rollout(ad, sched, prompts, cond, 2, keep, torch.Generator().manual_seed(3), decode=False,
                   ode_solver="dpmpp_2m_post")
    monkeypatch.setattr(rng, "randn", real)
    assert len(draws) == 1 + last + 1  # the initial noise, then the Euler and SDE steps' draws; none after
    sig = sched.sigmas.to(torch.float64)
    z = draws[0].double().repeat_interleave(2, dim=0)  # one shared initial noise for the group
    x0_hist, s_hist = None, None
    with torch.no_grad():
        for i in range(sched.num_steps):
            s, s_next = float(sig[i]), float(sig[i + 1])
            v = ad.predict(z.float(), torch.full((2,), s * 1000.0), traj.cond).double()
            x0 = z - s * v
            if i <= last:
                if i < window[0]:  # flow_grpo_step, determistic: latents + dt * model_output
                    z_next = z + (s_next - s) * v
                else:  # flow_grpo_step with noise_level 0.7
                    std = math.sqrt(s / (1 - (float(sig[1]) if s == 1 else s))) * 0.7
                    dt = s_next - s
                    mean = z * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
                    z_next = mean + std * math.sqrt(-dt) * draws[1 + i].double()
            else:  # dpm_step, second order once there is a history (the window's last step gave one)
                z_next = _released_dpm_midpoint(x0, x0_hist if s_hist is not None and s_hist < 1 else None, z,
                                                s_hist, s, s_next)
            x0_hist, s_hist = x0, s
            z = z_next
    # float32 on our side against float64 here: a few roundings of O(|z|) terms per step, through a model whose
    # outputs move about as much as its inputs: 16 eps32 per step of the latents' scale
    scale = float(z.abs().max())
    tol = 16 * sched.num_steps * float(torch.finfo(torch.float32).eps) * scale
    assert (traj.final_latents.double() - z).abs().max() <= tol


def test_flash_pass_count_through_the_trainer_and_the_planner():
    """The trainer's rollout forwards per sample are the compressed step count of the iteration's window; the
    planner's count is their mean over the run, written out here."""
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.rewards import rules  # noqa: F401
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.trainer import Trainer
    from fastvideo_grpo.cli.plan import passes_per_iteration

    over = ["--sampling.eta_schedule=null", "--sampling.eta=0.7", "--sampling.eta_form=flow_grpo",
            "--grpo.timestep_window=null", "--grpo.tau=1.0", "--grpo.prompts_per_iteration=1", "--grpo.group_size=2",
            "--grpo.sde_window={mode: sliding, size: 2, start: 0, stride: 1, shift_every: 2, roll_back: true}",
            "--sampling.ode_solver=dpmpp_2m", "--sampling.dpm_apply=post", "--sampling.dpm_post_compress_ratio=0.4",
            "--train.num_iterations=40"]
    cfg = load_config("configs/toy_cpu.yaml", over)
    T = cfg.sampling.num_steps
    counts = []
    for it in range(40):  # window [p, p + 2) with p = (it // 2) mod 8 (positions 0..7 of steps 0..8)
        last = (it // 2) % 8 + 1
        counts.append(last + max(int((T - last) * 0.4), 2))  # (last + 1) steps, then n - 1 on the compressed grid
    ad = _toy(0)
    fns, w = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = Trainer(cfg, ad, fns, w, PromptSource(prompts, ad.encode_prompts, seed=0))
    for it in range(3):
        m = trainer.train_iteration()
        assert m["passes/forward_rollout"] == 2 * counts[it]
    assert sde_window.mean_rollout_steps(cfg) == pytest.approx(sum(counts) / 40)
    planned = passes_per_iteration(cfg)["forward_rollout"]
    assert planned == round(2 * sum(counts) / 40) < 2 * T
