"""grpo.py: advantages, aggregation, best-of-N, timestep subsets, PPO-clip gradients."""

import math
import statistics

import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.rewards.build import binarize


def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    adv = grpo.group_advantages(r, 3, std="population")
    for g in range(2):
        x = r[3 * g:3 * g + 3].double()
        torch.testing.assert_close(adv[3 * g:3 * g + 3].double(), (x - x.mean()) / x.std(unbiased=False))


def test_default_std_is_the_released_bessel_formula():
    """The released code: for each group, (r - mean) / (r.std() + 1e-8), torch's std being unbiased (n - 1).
    Reference: Python's statistics module on plain floats, group by group."""
    r = [0.31, 0.27, 0.35, 0.29, 0.30, 0.33, 1.0, 0.0, 0.5, 0.5, 0.25, 0.75]
    adv = grpo.group_advantages(torch.tensor(r, dtype=torch.float64), 6)
    want = []
    for g in range(2):
        x = r[6 * g:6 * g + 6]
        m, s = statistics.fmean(x), statistics.stdev(x)  # stdev = n - 1
        want += [(v - m) / (s + 1e-8) for v in x]
    torch.testing.assert_close(adv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # population std gives advantages larger by sqrt(n / (n - 1))
    pop = grpo.group_advantages(torch.tensor(r, dtype=torch.float64), 6, std="population")
    torch.testing.assert_close(pop.double(), adv.double() * math.sqrt(6 / 5), rtol=1e-5, atol=1e-6)
    # an all-equal group: 0 / (0 + 1e-8) = 0 in both (exactly: float32 values summed in float64 round nowhere,
    # so the group mean is the value itself in any summation order)
    assert torch.equal(grpo.group_advantages(torch.full((4,), 0.3), 4), torch.zeros(4))
    with pytest.raises(ValueError, match="std must be"):
        grpo.group_advantages(torch.zeros(4), 2, std="unbiased")
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(torch.zeros(4), 1)


def test_zero_variance_group_gives_zero_not_nan():
    adv = grpo.group_advantages(torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.0]), 3)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[4] > 0 and adv[3] < 0


def test_summed_normalised_advantages_are_scale_free():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(12, generator=g, dtype=torch.float64)
    b = torch.rand(12, generator=g, dtype=torch.float64)
    base = grpo.aggregate_advantages({"a": a, "b": b}, 4)
    scaled = grpo.aggregate_advantages({"a": a * 1000.0 + 7.0, "b": b * 0.001 - 3.0}, 4)
    torch.testing.assert_close(base, scaled, rtol=1e-4, atol=1e-4)
    # and not the same as normalising the raw sum (what the paper warns against)
    raw_sum = grpo.group_advantages(a * 1000.0 + b * 0.001, 4)
    assert not torch.allclose(raw_sum, scaled, atol=1e-2)


def test_aggregate_weights_and_errors():
    r = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 0.0])}
    torch.testing.assert_close(grpo.aggregate_advantages(r, 2, {"a": 1.0, "b": 1.0}), torch.zeros(2))
    torch.testing.assert_close(grpo.aggregate_advantages(r, 2, {"a": 2.0, "b": 1.0}, std="population"),
                               torch.tensor([-1.0, 1.0]))
    # Bessel std of {0, 1} is 1 / sqrt(2): advantages -+1 / sqrt(2) per reward
    torch.testing.assert_close(grpo.aggregate_advantages(r, 2, {"a": 2.0, "b": 1.0}),
                               torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    with pytest.raises(ValueError, match="not computed"):
        grpo.aggregate_advantages(r, 2, {"c": 1.0})
    with pytest.raises(ValueError, match="whole number of groups"):
        grpo.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        grpo.group_advantages(torch.tensor([0.0, float("nan")]), 2)


def test_binarize_threshold():
    assert binarize(torch.tensor([0.27, 0.28, 0.3]), 0.28).tolist() == [0.0, 1.0, 1.0]


def test_best_of_n_selects_top_and_bottom_k_per_group():
    r = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.0, 2.0, 10.0, 11.0, 9.0, 12.0, 8.0, 7.0])
    idx = grpo.best_of_n_indices(r, 6, 2)
    assert idx.tolist() == [0, 3, 1, 4, 9, 7, 10, 11]
    with pytest.raises(ValueError):
        grpo.best_of_n_indices(r, 6, 4)


def test_trained_step_count_is_the_released_int_tau_t_minus_1():
    """Released: timesteps[:, :-1] (T - 1 steps, the last dropped), then int(len * timestep_fraction)."""
    for T, tau in [(16, 0.6), (25, 0.6), (50, 1.0), (20, 0.6), (10, 0.5), (16, 1.0), (6, 0.6)]:
        lo, hi = grpo.trainable_window(T)
        assert (lo, hi) == (0, T - 1)
        released = int(len(list(range(T))[:-1]) * tau)
        assert grpo.num_train_steps(hi - lo, tau) == released, (T, tau)
    assert grpo.num_train_steps(15, 0.6) == 9 and grpo.num_train_steps(24, 0.6) == 14
    assert grpo.num_train_steps(10, 0.01) == 1  # at least one step
    # float noise does not drop a step where tau * n is a whole number
    assert grpo.num_train_steps(100, 0.29) == 29
    # the last step only when asked; a window is cut to leave it out
    assert grpo.trainable_window(10, train_last_step=True) == (0, 10)
    assert grpo.trainable_window(10, (0, 5)) == (0, 5)
    assert grpo.trainable_window(10, (3, 10)) == (3, 9)
    with pytest.raises(ValueError, match="only the last step"):
        grpo.trainable_window(10, (9, 10))
    with pytest.raises(ValueError, match="window"):
        grpo.trainable_window(10, (4, 11))


def test_subsample_timesteps_counts_and_ranges():
    g = torch.Generator().manual_seed(0)
    sel = grpo.subsample_timesteps(10, 0.6, 5, g)
    assert sel.shape == (5, 6)
    for row in sel:
        assert len(set(row.tolist())) == 6 and row.min() >= 0 and row.max() < 10
    last_out = grpo.subsample_timesteps(16, 0.6, 50, g, window=grpo.trainable_window(16))
    assert last_out.shape == (50, 9) and last_out.max() == 14  # step 15 (the last) is never picked
    win = grpo.subsample_timesteps(20, 1.0, 3, g, window=(0, 6))
    assert win.shape == (3, 6) and win.max() < 6
    with pytest.raises(ValueError, match="tau"):
        grpo.subsample_timesteps(10, 0.0, 2)
    # rows differ (per-sample subsets), and every step is used about equally often
    big = grpo.subsample_timesteps(10, 0.5, 4000, g)
    counts = torch.bincount(big.reshape(-1), minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


def test_ppo_clip_gradient_matches_unclipped_inside_and_is_zero_outside():
    clip = 0.2
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # ratios: inside (1.1), outside on the profitable side (1.5 with A>0), inside (0.9), outside (0.5 with A<0)
    logp = torch.log(torch.tensor([1.1, 1.5, 0.9, 0.5])).requires_grad_(True)
    loss, stats = grpo.ppo_clip_loss(logp, old, adv, clip)
    loss.backward()
    # unclipped objective -mean(A * exp(logp)) has gradient -A * ratio / B
    ratio = torch.exp(logp.detach())
    unclipped_grad = -adv * ratio / 4
    assert logp.grad[0] == pytest.approx(unclipped_grad[0].item())
    assert logp.grad[2] == pytest.approx(unclipped_grad[2].item())
    assert logp.grad[1] == 0.0 and logp.grad[3] == 0.0
    assert float(stats.clipfrac) == pytest.approx(0.5)
    # on the wrong side of the clip region the gradient is NOT zero (pessimistic bound keeps it)
    logp2 = torch.log(torch.tensor([0.5])).requires_grad_(True)
    loss2, _ = grpo.ppo_clip_loss(logp2, torch.zeros(1), torch.tensor([1.0]), clip)
    loss2.backward()
    assert logp2.grad[0] == pytest.approx(-0.5)


def test_ppo_at_ratio_one_is_policy_gradient_and_stats():
    logp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = grpo.ppo_clip_loss(logp, torch.zeros(3), adv, 1e-4, adv_clip_max=1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv.clamp(-1, 1) / 3)
    assert float(stats.ratio_mean) == 1.0 and float(stats.approx_kl) == 0.0 and float(stats.clipfrac) == 0.0


def test_kl_term_is_closed_form_and_added():
    mp, mq = torch.zeros(2, 4), torch.ones(2, 4)
    std = torch.tensor([0.5, 0.0])
    kl = grpo.gaussian_kl_same_std(mp, mq, std)
    assert kl[0] == pytest.approx(1.0 / (2 * 0.25)) and kl[1] == 0.0
    # against torch.distributions
    d = torch.distributions.kl_divergence(torch.distributions.Normal(mp[0], 0.5), torch.distributions.Normal(mq[0], 0.5))
    assert kl[0] == pytest.approx(d.mean().item())
    loss0, _ = grpo.ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.1)
    loss1, st = grpo.ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.1, kl_B=kl, kl_coef=0.5)
    assert (loss1 - loss0).item() == pytest.approx(0.5 * kl.mean().item())
    assert float(st.kl) == pytest.approx(kl.mean().item())


@pytest.mark.parametrize("B,K,mb,updates", [(5, 7, 2, 3), (4, 2, 0, 4), (12, 9, 12, 1), (3, 10, 1, 4)])
def test_update_chunks_partition_rows_and_steps(B, K, mb, updates):
    """Micro-batches of at most mb rows (0 = all) and min(updates, K) optimiser steps whose kept-step
    columns partition range(K) with sizes differing by at most one."""
    rows, steps = grpo.update_chunks(B, K, mb, updates)
    assert torch.cat(rows).tolist() == list(range(B))
    assert all(len(r) == (mb or B) for r in rows[:-1]) and 0 < len(rows[-1]) <= (mb or B)
    assert len(steps) == min(updates, K)
    assert [k for r in steps for k in r] == list(range(K))
    assert max(map(len, steps)) - min(map(len, steps)) <= 1
