"""MixGRPO's sliding window and Flow-GRPO-Fast's random window (sde_window.py), and the DPM-Solver++(2M)
steps of MixGRPO-Flash (sde.flow_dpmpp_2m_step) against diffusers' own multistep scheduler."""

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
