"""Tests of the fused SDE step + log-prob op (fastvideo_grpo.sde.ops): kernel vs reference, gradients,
low-precision tolerance, dispatch fallback, torch.compile, bit-identical re-scoring, CUDA and nvcc.

Kernel-specific tests skip with a reason when ``fastvideo_grpo._C`` is not built.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvideo_grpo import sde
from fastvideo_grpo.sde.ops import fused, reference
from fastvideo_grpo.sde.ops import ddim_coefficients, flow_coefficients, fused_sde_step, reference_sde_step
from fastvideo_grpo.utils.threads import thread_count

ROOT = Path(__file__).resolve().parents[2]
needs_ext = pytest.mark.skipif(not fused.extension_available(),
                               reason="fastvideo_grpo._C is not built (run `pip install --no-build-isolation -e .`)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

LOW = [torch.bfloat16, torch.float16]


def _inputs(shape, dtype=torch.float32, seed=0, device="cpu", u_dtype=None):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.15
    sigma_next = sigma - 0.1
    eta = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    if B > 1:
        eta[1] = 0.0  # one deterministic sample: log-prob 0
    return (u.to(device, u_dtype or dtype), z.to(device, dtype), noise.to(device), sigma.to(device),
            sigma_next.to(device), eta.to(device))


def _kernel(u, z, A, C, S, noise=None, prev=None, return_mean=False):
    """The compiled operator with per-sample coefficients (a (B, 3) table, step -1): (prev, lp, mean)."""
    table = torch.stack([A, C, S], dim=1).double()
    return fused._C.sde_step(u, z, table, None, -1, noise, prev, return_mean)[:3]


# ----------------------------------------------------------------------------- coefficients / reference


def test_flow_and_ddim_coefficients_reproduce_sde_means():
    u, z, noise, s, sn, e = _inputs((3, 4, 5), torch.float64)
    A, C, S = flow_coefficients(s, sn, e, batch_size=3)
    _, _, mean, std = sde.flow_sde_step(u, z, s, sn, e, prev_sample=z)
    torch.testing.assert_close(A.view(-1, 1, 1) * z + C.view(-1, 1, 1) * u, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, std, rtol=1e-12, atol=1e-12)
    a_t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    a_prev = torch.tensor([0.4, 0.7, 0.95], dtype=torch.float64)
    A, C, S = ddim_coefficients(a_t, a_prev, e, batch_size=3)
    _, _, mean, std = sde.ddim_sde_step(u, z, a_t, a_prev, e, prev_sample=z)
    torch.testing.assert_close(A.view(-1, 1, 1) * z + C.view(-1, 1, 1) * u, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, std, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_flow_sde_step(dtype):
    u, z, _, s, sn, e = _inputs((3, 2, 6, 5), dtype)
    A, C, S = flow_coefficients(s, sn, e, batch_size=3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    noise = torch.randn(z.shape, generator=g1, dtype=dtype)
    prev, lp, mean = reference_sde_step(u, z, A, C, S, noise=noise)
    prev_r, lp_r, mean_r, _ = sde.flow_sde_step(u, z, s, sn, e, generator=g2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(prev, prev_r, **tol)
    torch.testing.assert_close(mean, mean_r, **tol)
    torch.testing.assert_close(lp, lp_r, **tol)
    assert lp[1] == 0


def test_reference_gradcheck_float64():
    u, z, noise, s, sn, e = _inputs((2, 3, 4), torch.float64)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    prev = (A.view(-1, 1, 1) * z + C.view(-1, 1, 1) * u + S.view(-1, 1, 1) * noise).detach()
    args = [t.clone().requires_grad_() for t in (u, z, prev, A, C)]
    S = (S + 0.05).requires_grad_()  # keep std > 0 so the density is smooth in std
    assert torch.autograd.gradcheck(
        lambda u_, z_, p_, a_, c_, s_: reference_sde_step(u_, z_, a_, c_, s_, prev_sample=p_)[1:], (*args, S))


# ----------------------------------------------------------------------------- kernel vs reference (CPU)

SHAPES = [(3, 5, 7, 9), (2, 3, 67, 61), (4, 1)]  # odd tails, several 8192-element chunks, N = 1


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["rollout", "rescore"])
def test_kernel_forward_matches_reference(shape, dtype, mode):
    u, z, noise, s, sn, e = _inputs(shape, dtype)
    cd = reference.compute_dtype(z)
    A, C, S = (t.to(cd) for t in flow_coefficients(s, sn, e, batch_size=shape[0]))
    noise = noise.to(cd)
    prev_in = (reference_sde_step(u, z, A, C, S, noise=noise)[0] + 0.01).to(dtype)
    kw = dict(noise=noise) if mode == "rollout" else dict(prev=prev_in)
    prev, lp, mean = _kernel(u, z, A, C, S, return_mean=True, **kw)
    ref = reference_sde_step(u.double(), z.double(), A.double(), C.double(), S.double(),
                             **({"noise": noise.double()} if mode == "rollout" else {"prev_sample": prev_in.double()}))
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert lp.dtype == cd and mean.dtype == cd
    torch.testing.assert_close(lp, ref[1].to(cd), **tol)
    torch.testing.assert_close(mean, ref[2].to(cd), **tol)
    if mode == "rollout":
        torch.testing.assert_close(prev, ref[0].to(cd), **tol)
    else:
        assert prev.numel() == 0
    _, lp2, mean2 = _kernel(u, z, A, C, S, return_mean=False, **kw)
    assert torch.equal(lp2, lp) and mean2.numel() == 0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_gradients_match_reference(dtype):
    u, z, noise, s, sn, e = _inputs((3, 4, 33, 17), dtype)
    A, C, S = flow_coefficients(s, sn, e, batch_size=3)
    prev = reference_sde_step(u, z, A, C, S, noise=noise)[0].detach().to(dtype) + 0.01
    g_lp = torch.tensor([0.7, -1.3, 2.0], dtype=reference.compute_dtype(z))
    grads = []
    for fn in ("fused", "ref"):
        uu, zz, pp = (t.clone().requires_grad_() for t in (u, z, prev))
        if fn == "fused":
            _, lp, mean = fused_sde_step(uu, zz, A, C, S, prev_sample=pp, return_mean=True)
        else:
            _, lp, mean = reference_sde_step(uu, zz, A, C, S, prev_sample=pp)
        (lp * g_lp).sum().backward(retain_graph=True)
        g1 = [t.grad.clone() for t in (uu, zz, pp)]
        for t in (uu, zz, pp):
            t.grad = None
        ((lp * g_lp).sum() + (mean * mean).mean()).backward()  # gradient through the mean output too
        grads.append((g1, [t.grad.clone() for t in (uu, zz)]))
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@needs_ext
def test_kernel_rollout_gradients_flow_through_prev():
    u, z, noise, s, sn, e = _inputs((2, 3, 5), torch.float64)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    grads = []
    for fn in ("fused", "ref"):
        uu, zz, nn = (t.clone().requires_grad_() for t in (u, z, noise))
        f = fused_sde_step if fn == "fused" else (lambda *a, **k: reference_sde_step(*a, **k)[:2])
        prev, lp = f(uu, zz, A, C, S, noise=nn)
        ((prev ** 2).sum() + lp.sum()).backward()
        grads.append([uu.grad, zz.grad, nn.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["rollout", "rescore"])
def test_op_gradcheck_float64(mode):
    """gradcheck of the registered autograd formula (kernel when built, closed-form reference otherwise)."""
    u, z, noise, s, sn, e = _inputs((2, 3, 4), torch.float64)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    prev = (A.view(-1, 1, 1) * z + C.view(-1, 1, 1) * u + S.view(-1, 1, 1) * noise).detach()
    third = noise if mode == "rollout" else prev
    args = [t.clone().requires_grad_() for t in (u, z, third)]

    def f(u_, z_, t_):
        kw = {"noise": t_} if mode == "rollout" else {"prev_sample": t_}
        return fused_sde_step(u_, z_, A, C, S, return_mean=True, **kw)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("u_fp32_z", [False, True])
def test_low_precision_error_within_twice_eager_low_precision(dtype, u_fp32_z):
    """Flash-attention rule: |kernel - fp64 ref| <= 2 |eager formula in low precision - fp64 ref| (+ tiny floor).

    Covers both storage layouts: model_output and sample in the low dtype, and a low-precision
    model_output (autocast) with a float32 sample.
    """
    u, z, _, s, sn, e = _inputs((2, 4, 24, 20), dtype, u_dtype=dtype)
    if u_fp32_z:
        z = z.float()
    B = z.shape[0]
    A, C, S = flow_coefficients(s, sn, e, batch_size=B)
    g = torch.Generator().manual_seed(3)
    prev = (A.view(-1, 1, 1, 1) * z.double() + C.view(-1, 1, 1, 1) * u.double()
            + S.view(-1, 1, 1, 1) * torch.randn(z.shape, generator=g, dtype=torch.float64)).to(z.dtype)

    def eager(u_, z_, p_, dt):  # the research-code formula, every op in dtype dt
        u_, z_, p_ = u_.to(dt), z_.to(dt), p_.to(dt)
        ss, ssn, ee = (v.to(dt).view(-1, 1, 1, 1) for v in (s, sn, e))
        x_hat = z_ - ss * u_
        score = -(z_ - (1 - ss) * x_hat) / ss ** 2
        mean = z_ + (u_ - 0.5 * ee ** 2 * score) * (ssn - ss)
        std = ee * torch.sqrt(ss - ssn)
        safe = torch.where(std > 0, std, torch.ones_like(std))
        lp = (-((p_ - mean) ** 2) / (2 * safe ** 2) - torch.log(safe) - reference.HALF_LOG_2PI).mean(dim=(1, 2, 3))
        return torch.where(std.view(-1) > 0, lp, torch.zeros_like(lp))

    def run(fn):
        uu = u.clone().requires_grad_()
        lp = fn(uu)
        lp.float().sum().backward()
        return lp.double().detach(), uu.grad.double()

    lp64, gu64 = run(lambda uu: eager(uu, z, prev, torch.float64))
    lp_lo, gu_lo = run(lambda uu: eager(uu, z, prev, dtype))
    lp_k, gu_k = run(lambda uu: fused_sde_step(uu, z, A, C, S, prev_sample=prev)[1])
    assert (lp_k - lp64).abs().max() <= 2 * (lp_lo - lp64).abs().max() + 1e-6
    assert (gu_k - gu64).abs().max() <= 2 * (gu_lo - gu64).abs().max() + 1e-9
    assert gu_k.abs().max() > 0


# ----------------------------------------------------------------------------- re-scoring invariant / wiring


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["flow", "ddim"])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_rescoring_reproduces_rollout_log_prob_bit_for_bit(kind, use_kernel, monkeypatch):
    if use_kernel and not fused.extension_available():
        pytest.skip("fastvideo_grpo._C is not built")
    if not use_kernel:
        monkeypatch.setattr(fused, "_C", None)
    sched = sde.FlowSchedule.create(8, eta=0.7, shift=3.0) if kind == "flow" else sde.DDIMSchedule.create(8, eta=0.9)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(3, 4, 67, 61, generator=g)  # several chunks per sample
    for out_dtype in (torch.float32, torch.bfloat16):
        u = torch.randn(z.shape, generator=g).to(out_dtype)
        idx = torch.tensor([0, 3, 6])
        # The compiled kernel sums each sample in fixed chunks combined in a fixed order, so a different
        # thread count must not change its reduction: roll out with 2 threads, re-score with 1 (the session
        # runs at 1, so setting 1 for the re-score alone would compare 1 with 1). The PyTorch reference
        # leaves the split of its row sums to ATen (a row may be split across threads: not thread-count
        # invariant by construction), so it re-scores with the rollout's count, as the trainer does (one
        # process, one count).
        with thread_count(2):
            prev, lp, _, _ = sched.step(idx, u, z, generator=g)
        with thread_count(1 if use_kernel else 2):
            _, lp2, _, _ = sched.step(idx, u, z, prev_sample=prev)
        assert torch.equal(lp, lp2)
        assert torch.equal(torch.exp(lp2 - lp), torch.ones_like(lp))


@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_schedule_step_fused_equals_plain_reference(kind, monkeypatch):
    sched = sde.FlowSchedule.create(6, eta=0.5, shift=2.0) if kind == "flow" else sde.DDIMSchedule.create(6, eta=0.8)
    g = torch.Generator().manual_seed(2)
    z, u = torch.randn(3, 4, 9, 7, generator=g), torch.randn(3, 4, 9, 7, generator=g)
    idx = torch.tensor([0, 2, 5])
    fused_out = sched.step(idx, u, z, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(sde, "FUSED_STEPS", False)
    plain = sched.step(idx, u, z, generator=torch.Generator().manual_seed(5))
    for a, b in zip(fused_out, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sde, "FUSED_STEPS", True)
    prev, lp, mean, std = sched.step(idx, u, z, prev_sample=plain[0], need_mean=False)
    assert mean is None
    torch.testing.assert_close(lp, plain[1], rtol=1e-5, atol=1e-5)
    _, lp0, _, _ = sched.step(2, u, z, eta=0.0)
    assert torch.equal(lp0, torch.zeros_like(lp0))


def _schedule(kind, steps=6):
    return sde.FlowSchedule.create(steps, eta=0.6, shift=2.0) if kind == "flow" else sde.DDIMSchedule.create(steps,
                                                                                                            eta=0.8)


def _table(sched):
    if isinstance(sched, sde.FlowSchedule):
        return fused.flow_coefficient_table(sched.sigmas, sched.eta)
    return fused.ddim_coefficient_table(sched.alpha_t, sched.alpha_prev, sched.eta)


@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_coefficient_table_rows_equal_per_call_coefficients(kind):
    """The table made once per schedule holds exactly the float64 values the per-call coefficients had.
    Exact: the same float64 +, -, *, /, sqrt (correctly rounded) on the same values, vectorised or not."""
    sched = _schedule(kind)
    table = _table(sched)
    assert table.shape == (sched.num_steps, 3) and table.dtype == torch.float64 and table.device.type == "cpu"
    for i in range(sched.num_steps):
        if kind == "flow":
            want = flow_coefficients(sched.sigmas[i], sched.sigmas[i + 1], sched.eta[i], batch_size=1)
        else:
            want = ddim_coefficients(sched.alpha_t[i], sched.alpha_prev[i], sched.eta[i], batch_size=1)
        assert torch.equal(table[i], torch.cat(want))


@needs_ext
@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_schedule_table_path_equals_per_call_coefficients_bit_for_bit(kind):
    """The schedules' hot path (table looked up by step index in C++) against the per-call path (schedule
    values gathered, coefficients computed, per-sample rows): the same kernel on the same float32
    coefficients, so every output is identical; its autograd node is the C++ Function, not Python."""
    sched = _schedule(kind)
    g = torch.Generator().manual_seed(4)
    z, u = torch.randn(3, 4, 9, 7, generator=g), torch.randn(3, 4, 9, 7, generator=g)
    for index in (3, torch.tensor([0, 3, 5]), torch.tensor(4)):
        eta = sched.eta[index]  # an explicit eta takes the per-call path
        got = sched.step(index, u, z, generator=torch.Generator().manual_seed(5))
        want = sched.step(index, u, z, generator=torch.Generator().manual_seed(5), eta=eta)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        got = sched.step(index, u, z, prev_sample=want[0] + 0.01, need_mean=False)
        want = sched.step(index, u, z, prev_sample=want[0] + 0.01, eta=eta, need_mean=False)
        assert got[2] is None and want[2] is None
        assert all(torch.equal(a, b) for a, b in zip(got[:2] + got[3:], want[:2] + want[3:]))
    uu = u.clone().requires_grad_()
    _, lp, _, _ = sched.step(torch.tensor([0, 3, 5]), uu, z, prev_sample=z + 0.01)
    assert "SdeStepFunction" in lp.grad_fn.name()


@needs_ext
@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_schedule_table_path_gradcheck_float64(kind):
    """The C++ autograd formula of the table path against finite differences (float64), re-scoring and rollout."""
    sched = _schedule(kind)
    u, z, noise, *_ = _inputs((2, 3, 4), torch.float64)
    idx = torch.tensor([1, 4])
    prev = sched.step(idx, u, z, generator=torch.Generator().manual_seed(0))[0].detach()
    args = [t.clone().requires_grad_() for t in (u, z, prev)]
    assert torch.autograd.gradcheck(lambda u_, z_, p_: sched.step(idx, u_, z_, prev_sample=p_)[:3], args)

    def rollout(u_, z_):  # the same draw every call: a fresh generator with one seed
        return sched.step(2, u_, z_, generator=torch.Generator().manual_seed(1))[:3]

    assert torch.autograd.gradcheck(rollout, args[:2])


def test_coefficient_table_made_once_and_again_after_an_edit():
    import copy

    sched = _schedule("flow", 4)
    make, sources = fused.flow_coefficient_table, lambda: (sched.sigmas, sched.eta)
    cache = sched._coefs
    t1 = cache.get(make, sources())
    assert cache.get(make, sources()) is t1  # no per-call work: the same table object
    assert torch.equal(t1, fused.flow_coefficient_table(sched.sigmas, sched.eta))
    sched.eta[1] = 0.0  # an in-place edit bumps the version: a new table, std 0 at step 1
    t2 = cache.get(make, sources())
    assert t2 is not t1 and t2[1, 2] == 0 and torch.equal(t2[0], t1[0])
    z = torch.randn(2, 3, 4)
    assert torch.equal(sched.step(1, z, z)[1], torch.zeros(2))
    sched.eta = sched.eta.clone()  # reassigned: a new table
    assert cache.get(make, sources()) is not t2
    twin = copy.deepcopy(sched)  # copies start with an empty cache and give the same steps
    assert twin._coefs is not cache
    assert torch.equal(twin.step(2, z, z, prev_sample=z)[1], sched.step(2, z, z, prev_sample=z)[1])


def test_step_index_errors_raise_value_error():
    """Out-of-range steps, mismatched index shapes and non-integer indices: ValueError, with or without _C."""
    sched = _schedule("flow", 4)
    table = _table(sched)
    z = torch.randn(3, 2, 5)
    with pytest.raises(ValueError, match="out of range"):
        fused.sde_step_at(z, z, table, 4, prev_sample=z)
    with pytest.raises(ValueError, match="out of range"):
        fused.sde_step_at(z, z, table, torch.tensor([0, 1, 7]), prev_sample=z)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        fused.sde_step_at(z, z, table, torch.tensor([0, 1]), prev_sample=z)
    with pytest.raises(ValueError, match="integer"):
        fused.sde_step_at(z, z, table, torch.tensor([0.0, 1.0, 2.0]), prev_sample=z)
    with pytest.raises(ValueError, match="float64 table"):
        fused.sde_step_at(z, z, table.float(), 1, prev_sample=z)


def test_sde_step_at_runs_the_reference_where_the_kernel_does_not_serve():
    """Meta tensors (a device no kernel serves): the reference runs; shapes and dtypes as the kernel's."""
    sched = _schedule("flow", 4)
    table = _table(sched)
    z = torch.empty(2, 3, 5, device="meta")
    prev, lp, mean, std = fused.sde_step_at(z, z, table, torch.tensor([0, 2]), generator=None, return_mean=True)
    assert prev.shape == mean.shape == z.shape and lp.shape == std.shape == (2,)
    assert {t.device.type for t in (prev, lp, mean, std)} == {"meta"}


def test_dispatch_falls_back_to_reference_without_extension(monkeypatch):
    u, z, noise, s, sn, e = _inputs((2, 3, 8), torch.float32)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    want = fused_sde_step(u, z, A, C, S, noise=noise.float(), return_mean=True)
    monkeypatch.setattr(fused, "_C", None)
    assert not fused.extension_available() and not fused.kernel_supports(z)
    got = fused_sde_step(u, z, A, C, S, noise=noise.float(), return_mean=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    uu = u.clone().requires_grad_()
    _, lp = fused_sde_step(uu, z, A, C, S, prev_sample=want[0] + 0.1)
    lp.sum().backward()
    assert torch.isfinite(uu.grad).all() and uu.grad.abs().max() > 0


def test_env_var_disables_extension():
    code = "import fastvideo_grpo.sde.ops as o; print(o.extension_available())"
    env = dict(os.environ, FVG_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_user_errors_raise_value_error():
    u, z, noise, s, sn, e = _inputs((2, 3, 4), torch.float32)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    with pytest.raises(ValueError, match="model_output shape"):
        fused_sde_step(u[:, :2], z, A, C, S)
    with pytest.raises(ValueError, match="at most one"):
        fused_sde_step(u, z, A, C, S, noise=noise, prev_sample=z)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        fused_sde_step(u, z, A[:1], C, S)
    with pytest.raises(ValueError, match="float32"):
        fused_sde_step(u.long(), z, A, C, S)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        fused_sde_step(u, z, A, C, S, prev_sample=z[:1])
    with pytest.raises(ValueError, match="batch"):
        flow_coefficients(torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.3, batch_size=2)
    if fused.extension_available():
        with pytest.raises(ValueError, match="coefficients"):
            _kernel(u, z, A[:1], C[:1], S[:1], noise=noise)


def test_torch_library_opcheck():
    """Schema, autograd registration, fake / meta kernels and AOT dispatch of the operator, for each way of
    naming the coefficient rows: per-sample rows (step -1), one step for the batch, a (B,) step index."""
    u, z, noise, s, sn, e = _inputs((2, 3, 5), torch.float64)
    sched = sde.FlowSchedule.create(6, eta=0.6, shift=2.0)
    table = fused.flow_coefficient_table(sched.sigmas, sched.eta)
    per_sample = torch.stack(flow_coefficients(s, sn, e, batch_size=2), dim=1)
    prev = (z + 0.1).detach()
    for coefs, index, step in ((per_sample, None, -1), (table, None, 3), (table, torch.tensor([1, 4]), 0)):
        for nz, pv in ((noise, None), (None, prev)):
            args = (u.clone().requires_grad_(), z.clone().requires_grad_(), coefs, index, step, nz, pv, True)
            torch.library.opcheck(torch.ops.fastvideo_grpo.sde_step.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                              "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_forward_and_backward():
    """torch.compile(fullgraph) of a PPO-style loss through the op with per-sample coefficients and through a
    schedule's step (which traces its per-call path: the C++ table entry is not traceable), against eager."""
    torch._dynamo.reset()
    u, z, noise, s, sn, e = _inputs((2, 4, 8, 8), torch.float32)
    A, C, S = flow_coefficients(s, sn, e, batch_size=2)
    prev = reference_sde_step(u, z, A, C, S, noise=noise.float())[0]
    sched = _schedule("flow")
    idx = torch.tensor([1, 4])

    def loss_fn(u_, z_, prev_, adv):
        _, lp = fused_sde_step(u_, z_, A, C, S, prev_sample=prev_)
        _, lp2, _, _ = sched.step(idx, u_, z_, prev_sample=prev_, need_mean=False)
        return -(torch.exp(lp - lp.detach()) * adv).mean() - (torch.exp(lp2 - lp2.detach()) * adv).mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    adv = torch.tensor([1.0, -0.5])
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    l1 = compiled(u1, z, prev, adv)
    l2 = loss_fn(u2, z, prev, adv)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(u1.grad, u2.grad)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_kernel_matches_cpu_reference(dtype):
    if not fused._C.has_cuda():
        pytest.skip("fastvideo_grpo._C was built without CUDA")
    for shape in [(3, 5, 7, 9), (2, 16, 30, 30)]:
        u, z, noise, s, sn, e = _inputs(shape, dtype, device="cuda")
        A, C, S = flow_coefficients(s, sn, e, batch_size=shape[0], device="cuda")
        cd = reference.compute_dtype(z)
        prev, lp, mean = fused_sde_step(u, z, A, C, S, noise=noise.to(cd), return_mean=True)
        ref = reference_sde_step(u.double(), z.double(), A, C, S, noise=noise.double())
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5)
        torch.testing.assert_close(prev.double(), ref[0], **tol)
        torch.testing.assert_close(mean.double(), ref[2], **tol)
        torch.testing.assert_close(lp.double(), ref[1], **tol)
        _, lp2 = fused_sde_step(u, z, A, C, S, prev_sample=prev)
        assert torch.equal(lp, lp2)
        _, lp3 = fused_sde_step(u, z, A, C, S, prev_sample=prev.cpu().to("cuda")[..., :].contiguous())
        assert torch.equal(lp, lp3)
        uu = u.clone().requires_grad_()
        _, lpg = fused_sde_step(uu, z, A, C, S, prev_sample=prev + 0.01)
        lpg.sum().backward()
        ur = u.double().requires_grad_()
        reference_sde_step(ur, z.double(), A, C, S, prev_sample=(prev + 0.01).double())[1].sum().backward()
        torch.testing.assert_close(uu.grad.double(), ur.grad, rtol=1e-2, atol=1e-6)


@needs_cuda
@needs_ext
def test_cuda_unaligned_and_mixed_dtypes():
    if not fused._C.has_cuda():
        pytest.skip("fastvideo_grpo._C was built without CUDA")
    base_u, z, noise, s, sn, e = _inputs((2, 3, 11, 13), torch.float32, device="cuda")
    u = torch.empty(base_u.numel() + 1, device="cuda", dtype=torch.bfloat16)[1:].view(base_u.shape)
    u.copy_(base_u)  # storage offset 1: unaligned vector loads must fall back to element loads
    A, C, S = flow_coefficients(s, sn, e, batch_size=2, device="cuda")
    prev, lp = fused_sde_step(u, z, A, C, S, noise=noise)
    ref = reference_sde_step(u.double(), z.double(), A, C, S, noise=noise.double())
    torch.testing.assert_close(lp.double(), ref[1], rtol=3e-5, atol=3e-5)
    _, lp2 = fused_sde_step(u.contiguous().clone(), z, A, C, S, prev_sample=prev)
    assert torch.equal(lp, lp2)


@needs_cuda
@needs_ext
def test_cuda_schedule_table_path_matches_per_sample_path():
    """The schedules' path on CUDA: coefficient rows by value (CPU index), by one device copy (65 samples > the
    64 carried by value), gathered on the device (CUDA index); bit-identical to the per-sample path with the
    same coefficients, forward (rollout and re-scoring) and gradient."""
    if not fused._C.has_cuda():
        pytest.skip("fastvideo_grpo._C was built without CUDA")
    sched = _schedule("flow", 16)
    table = _table(sched)
    for B, index_device in ((3, "cpu"), (65, "cpu"), (3, "cuda")):
        g = torch.Generator().manual_seed(B)
        u, z = (torch.randn(B, 4, 6, 5, generator=g).cuda() for _ in range(2))
        idx = torch.randint(0, 16, (B,), generator=g)
        A, C, S = (table[idx, k].cuda() for k in range(3))
        prev, lp, mean, std = sched.step(idx.to(index_device), u, z, generator=torch.Generator().manual_seed(1))
        want = fused_sde_step(u, z, A, C, S, generator=torch.Generator().manual_seed(1), return_mean=True)
        assert torch.equal(prev, want[0]) and torch.equal(lp, want[1]) and torch.equal(mean, want[2])
        assert torch.equal(std, S.float())
        uu, uk = u.clone().requires_grad_(), u.clone().requires_grad_()
        sched.step(idx.to(index_device), uu, z, prev_sample=prev)[1].sum().backward()
        fused_sde_step(uk, z, A, C, S, prev_sample=prev)[1].sum().backward()
        assert torch.equal(uu.grad, uk.grad) and uu.grad.abs().max() > 0


# ----------------------------------------------------------------------------- nvcc


def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(os.environ.get("FVG_TEST_NVCC", "0") != "1",
                    reason="compiling the CUDA source takes minutes on a small CPU; set FVG_TEST_NVCC=1")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """Compile csrc/fused_sde_step_cuda.cu with nvcc against the installed torch headers.

    A CPU-only torch wheel ships the c10/ATen CUDA headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in is provided for the check.
    """
    from torch.utils.cpp_extension import include_paths
    import sysconfig

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", "-DFVG_WITH_CUDA",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path / 'shim'}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "fused_sde_step_cuda.cu"),
           "-o", str(tmp_path / "fused_sde_step_cuda.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "fused_sde_step_cuda.o").stat().st_size > 0
