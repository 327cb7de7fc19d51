"""sde.py against independent references: torch.distributions, diffusers' schedulers, closed forms."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fastvideo_grpo import sde


def _normal_logprob_mean(x, mean, std_B):
    d = torch.distributions.Normal(mean, std_B.reshape(-1, *([1] * (mean.ndim - 1))).expand_as(mean))
    return d.log_prob(x).mean(dim=tuple(range(1, x.ndim)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_step_log_prob_matches_torch_distributions(dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 6, generator=g, dtype=dtype)
    u = torch.randn(3, 4, 5, 6, generator=g, dtype=dtype)
    sigma = torch.tensor([0.9, 0.5, 0.3], dtype=dtype)
    sigma_next = torch.tensor([0.8, 0.45, 0.0], dtype=dtype)
    prev, lp, mean, std = sde.flow_sde_step(u, z, sigma, sigma_next, 0.3, generator=g)
    assert lp.shape == (3,) and lp.dtype == dtype
    torch.testing.assert_close(lp, _normal_logprob_mean(prev, mean, std))
    torch.testing.assert_close(std, 0.3 * torch.sqrt(sigma - sigma_next))


def test_flow_step_mean_is_the_method_formula():
    """mean = z + (u - e^2/2 score)(s - t), score = -(z - (1-t) x_hat) / t^2, x_hat = z - t u."""
    g = torch.Generator().manual_seed(1)
    z, u = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    t, s, e = 0.7, 0.6, 0.5
    x_hat = z - t * u
    score = -(z - (1 - t) * x_hat) / t**2
    expected = z + (u - e**2 / 2 * score) * (s - t)
    _, _, mean, _ = sde.flow_sde_step(u, z, t, s, e)
    torch.testing.assert_close(mean, expected)


@pytest.mark.parametrize("step_fn,args", [
    (sde.flow_sde_step, (0.8, 0.6)),
    (sde.ddim_sde_step, (0.3, 0.5)),
])
def test_rescoring_a_sampled_step_gives_identical_log_prob(step_fn, args):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g)
    prev, lp, _, _ = step_fn(out, z, *args, 0.3, generator=g)
    prev2, lp2, _, _ = step_fn(out, z, *args, 0.3, prev_sample=prev)
    assert torch.equal(prev2, prev)
    assert torch.equal(lp2, lp)  # ratio exactly 1


def test_half_precision_inputs_compute_in_float32():
    z = torch.randn(2, 16).bfloat16()
    u = torch.randn(2, 16).bfloat16()
    prev, lp, mean, _ = sde.flow_sde_step(u, z, 0.5, 0.4, 0.3, generator=torch.Generator().manual_seed(0))
    assert lp.dtype == torch.float32 and mean.dtype == torch.float32


def test_flow_ode_step_equals_diffusers_flow_match_euler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps):
        u = torch.randn(2, 4, 6, 6, generator=g)
        ref = sched.step(u, t, z, return_dict=False)[0]
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        ours_ode = sde.flow_ode_step(u, z, s, s_next)
        ours_sde, lp, _, _ = sde.flow_sde_step(u, z, s, s_next, 0.0)
        torch.testing.assert_close(ours_ode, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_sde, ref, rtol=1e-6, atol=1e-6)
        assert torch.all(lp == 0)
        z = ref


def test_flow_sigmas_match_diffusers_shifted_schedule():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    n = 10
    ours = sde.flow_sigmas(n, shift=3.0)
    # diffusers builds linspace(1, 1/N) then shifts; ours is linspace(1, 0) with N+1 points shifted.
    base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    torch.testing.assert_close(ours, 3.0 * base / (1 + 2.0 * base))
    sched.set_timesteps(sigmas=base[:-1].float().numpy().tolist())
    torch.testing.assert_close(sched.sigmas.double(), ours, rtol=1e-6, atol=1e-6)


def _ddim(n_steps):
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    s.set_timesteps(n_steps)
    return s


def test_ddim_schedule_matches_diffusers():
    ref = _ddim(50)
    ours = sde.DDIMSchedule.create(50)
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.int64))
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_equals_diffusers_ddim_given_same_noise(eta):
    ref = _ddim(10)
    ours = sde.DDIMSchedule.create(10, eta=eta)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        ref_prev = ref.step(eps, t, z, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        _, lp, mean, std = ours.step(i, eps, z)
        ours_prev = mean + std.reshape(-1, 1, 1, 1) * noise
        torch.testing.assert_close(ours_prev, ref_prev, rtol=1e-5, atol=1e-5)
        # re-scoring diffusers' own sample: log-prob is the Normal density of that sample
        _, lp_ref, _, _ = ours.step(i, eps, z, prev_sample=ref_prev)
        if eta > 0:
            torch.testing.assert_close(lp_ref, _normal_logprob_mean(ref_prev.double(), mean.double(), std.double()).float(),
                                       rtol=1e-4, atol=1e-4)
        z = ref_prev


def test_per_sample_sigmas_equal_separate_calls():
    g = torch.Generator().manual_seed(5)
    z, u = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    sched = sde.FlowSchedule.create(6, eta=0.3, shift=2.0)
    idx = torch.tensor([0, 3, 5])
    prev = torch.randn(3, 10, generator=g)
    _, lp, mean, _ = sched.step(idx, u, z, prev_sample=prev)
    for b in range(3):
        _, lp_b, mean_b, _ = sched.step(int(idx[b]), u[b:b + 1], z[b:b + 1], prev_sample=prev[b:b + 1])
        torch.testing.assert_close(lp[b:b + 1], lp_b)
        torch.testing.assert_close(mean[b:b + 1], mean_b)


def test_eta_schedule_validation():
    assert sde.eta_per_step([0.1, 0.2, 0.3], 3).tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="eta schedule"):
        sde.eta_per_step([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="batch"):
        sde.flow_sde_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.3)


def test_sde_sampling_reproduces_gaussian_data_distribution():
    """Data N(mu, s^2): the exact flow velocity is known, so SDE sampling (eta 0.3) must recover mu, s.

    z_t = (1-t) x + t eps has marginal N((1-t) mu, (1-t)^2 s^2 + t^2); the optimal velocity is
    E[eps - x | z_t] = a(t) z + b(t) with closed-form a, b below. Euler-Maruyama with 100 steps
    has O(1/T) bias, far inside the tolerance used.
    """
    mu, s = 1.5, 0.4
    n, steps, eta = 200_000, 100, 0.3

    def velocity(z, t):
        m_t = (1 - t) * mu
        v_t = (1 - t) ** 2 * s**2 + t**2
        cov_eps_z = t  # Cov(eps, z) = t
        cov_x_z = (1 - t) * s**2
        e_eps = (cov_eps_z / v_t) * (z - m_t)
        e_x = mu + (cov_x_z / v_t) * (z - m_t)
        return e_eps - e_x

    g = torch.Generator().manual_seed(6)
    sched = sde.FlowSchedule.create(steps, eta=eta, shift=1.0)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for i in range(steps):
        t = float(sched.sigmas[i])
        z, lp, _, _ = sched.step(i, velocity(z, t), z, generator=g)
        assert torch.isfinite(lp).all()
    assert abs(z.mean().item() - mu) < 0.02
    assert abs(z.std().item() - s) < 0.02
