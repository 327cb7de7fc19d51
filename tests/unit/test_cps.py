"""Coefficients-preserving sampling (CPS; sde.flow_cps_step, the ``cps`` step form and ``sampling.eta_form: cps``)
against its formula written out here: the decomposition into the predicted data and noise with the noise share
sigma_next sin(eta pi / 2) made fresh, the exact Gaussian log-density (torch.distributions), the preserved noise
coefficient, and the fused kernel's (A, C, std) table against the step written out."""

import math

import pytest
import torch

from fastvideo_grpo import config, sde
from fastvideo_grpo.config import load_config
from fastvideo_grpo.sde import ops
from fastvideo_grpo.training.trainer import build_schedule
from support.tiny_models import tiny_toy_adapter


def _paper_step(u, z, s, s_next, eta):
    """CPS as its paper writes it (float64): x0 = z - s u, x1 = z + (1 - s) u, std = s' sin(eta pi / 2),
    mean = (1 - s') x0 + sqrt(s'^2 - std^2) x1."""
    s, s_next, eta = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1, 1) for v in (s, s_next, eta))
    x0, x1 = z - s * u, z + (1 - s) * u
    std = s_next * torch.sin(eta * math.pi / 2)
    return (1 - s_next) * x0 + torch.sqrt(s_next ** 2 - std ** 2) * x1, std.reshape(-1)


def test_cps_step_is_the_papers_step_with_the_exact_gaussian_log_density():
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    s, s_next, eta = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.45, 0.1]), torch.tensor([0.8, 0.3, 1.0])
    want_mean, want_std = _paper_step(u, z, s, s_next, eta)
    prev, lp, mean, std = sde.flow_cps_step(u, z, s, s_next, eta, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, want_std, rtol=1e-12, atol=1e-12)
    # the draw is mean + std * noise with the generator's noise
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(prev, want_mean + want_std.reshape(-1, 1, 1, 1) * noise, rtol=1e-12, atol=1e-12)
    normal = torch.distributions.Normal(want_mean, want_std.reshape(-1, 1, 1, 1).expand_as(want_mean))
    torch.testing.assert_close(lp, normal.log_prob(prev).mean(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    # re-scoring a stored transition gives the same log-prob
    _, lp2, _, _ = sde.flow_cps_step(u, z, s, s_next, eta, prev_sample=prev)
    assert torch.equal(lp2, lp)


def test_the_noise_coefficient_is_preserved_and_eta_zero_is_euler():
    # on the flow's own path z = (1 - s) x0 + s x1 with the exact velocity u = x1 - x0, the step's mean is
    # (1 - s') x0 + c x1 and c^2 + std^2 = s'^2: the sample at s' has noise coefficient exactly s'
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g,
                                                                                    dtype=torch.float64)
    s, s_next, eta = 0.7, 0.5, torch.tensor([0.0, 0.25, 0.8, 1.0])
    z = (1 - s) * x0 + s * x1
    _, _, mean, std = sde.flow_cps_step(x1 - x0, z, s, s_next, eta, prev_sample=z)
    c = torch.sqrt(s_next ** 2 - std ** 2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mean, (1 - s_next) * x0 + c * x1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.reshape(-1) ** 2 + std ** 2, torch.full((4,), s_next ** 2, dtype=torch.float64))
    assert std[0] == 0 and std[-1] == pytest.approx(s_next)  # eta 0: no fresh noise; eta 1: all of it fresh
    # eta = 0 is the Euler step z + u (s' - s) for any u
    u = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    prev, lp, _, _ = sde.flow_cps_step(u, z, s, s_next, 0.0)
    torch.testing.assert_close(prev, z + u * (s_next - s), rtol=0, atol=1e-14)
    assert torch.equal(lp, torch.zeros(4, dtype=torch.float64))
    # the step to sigma = 0 is deterministic (std 0) and lands on the data prediction z - s u
    prev, _, _, std0 = sde.flow_cps_step(u, z, s, 0.0, 0.8)
    assert torch.equal(std0, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(prev, z - s * u, rtol=0, atol=1e-14)


def test_the_cps_coefficients_are_the_step_and_the_fused_kernel_runs_them():
    # (A, C, std) of the reference path against the step: mean = A z + C u for any z, u
    s, s_next, eta = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2]), torch.tensor([0.6, 0.9])
    A, C, S = ops.cps_coefficients(s, s_next, eta)
    g = torch.Generator().manual_seed(3)
    z, u = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                   dtype=torch.float64)
    want_mean, want_std = _paper_step(u, z, s, s_next, eta)
    torch.testing.assert_close(A.reshape(-1, 1, 1, 1) * z + C.reshape(-1, 1, 1, 1) * u, want_mean, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(S, want_std)
    # a CPS schedule's steps (the fused kernel with its (T, 3) table; per-sample step indices) against the plain step
    base = sde.FlowSchedule.create(6, eta=0.8, shift=3.0)
    sched = sde.ETA_FORMS.get("cps")(base)
    assert sched.form == "cps" and torch.equal(sched.eta, base.eta)
    idx = torch.tensor([0, 2, 4, 1])
    z32, u32 = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    gen = torch.Generator().manual_seed(4)
    prev, lp, mean, std = sched.step(idx, u32, z32, generator=gen)
    sig = sched.sigmas
    _, want_lp, want_mean, want_std = sde.flow_cps_step(u32, z32, sig[idx], sig[idx + 1], sched.eta[idx],
                                                         prev_sample=prev)
    # float32: the table's coefficients are rounded once, the plain step rounds each product (a few ulps)
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, want_std, rtol=1e-6, atol=0)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    _, lp_again, _, _ = sched.step(idx, u32, z32, prev_sample=prev, need_mean=False)
    assert torch.equal(lp_again, lp)  # re-scoring repeats the rollout's arithmetic: the PPO ratio is exactly 1
    torch.testing.assert_close(sched.coefficient_table(),
                               torch.stack(ops.cps_coefficients(sig[:-1], sig[1:], sched.eta), dim=1))
    # the log-prob's gradient through the fused op equals autograd through the plain step
    u_a = u32.clone().requires_grad_(True)
    sched.step(idx, u_a, z32, prev_sample=prev, need_mean=False)[1].sum().backward()
    u_b = u32.clone().requires_grad_(True)
    sde.flow_cps_step(u_b, z32, sig[idx], sig[idx + 1], sched.eta[idx], prev_sample=prev)[1].sum().backward()
    torch.testing.assert_close(u_a.grad, u_b.grad, rtol=1e-4, atol=1e-6)


def test_eta_form_cps_from_the_config():
    assert set(config.ETA_FORMS) == set(sde.ETA_FORMS.names())  # the config key's domain is the registered forms
    cfg = load_config(None, ["--sampling.num_steps=5", "--sampling.eta=0.8", "--sampling.eta_form=cps"])
    sched = build_schedule(cfg, tiny_toy_adapter())
    assert sched.form == "cps" and sched.eta.tolist() == [0.8, 0.8, 0.8, 0.8, 0.0]  # deterministic last step

    class DDIMAdapter:
        def make_schedule(self, n, eta):
            return sde.DDIMSchedule.create(n, eta)

    with pytest.raises(ValueError, match="cps needs a flow-matching model"):
        build_schedule(load_config(None, ["--sampling.eta_form=cps"]), DDIMAdapter())
    with pytest.raises(ValueError, match=r"noise level in \[0, 1\].*sampling.eta"):
        build_schedule(load_config(None, ["--sampling.eta=1.5", "--sampling.eta_form=cps"]), tiny_toy_adapter())
