"""DGPO (objectives/dgpo.py) against its paper's formulas written out here.

* The group-preference loss: per group and time, -log sigma(R(G+) - R(G-)) with R(G+) - R(G-) = sum_i A_i r_i,
  r_i = -beta (d_i - d_ref_i) / G, i.e. softplus(beta / G sum_i A_i (d_i - d_ref_i)); the released surrogate's
  gradient must equal that loss's gradient (averaged over the groups) divided by beta.
* The objective on a real toy update: the trained times are the same for the whole batch and lie in the window;
  the forward-process noise is shared by a group; x_t = (1 - t) x0 + t eps with t the schedule's sigma; d_ref
  comes from the frozen reference (unchanged by the update); the first optimiser step clips nothing (the old
  policy is the current one), the clipping detaches exactly the samples outside the range; micro-batches must
  hold whole groups.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.algorithms.objectives import TrainBatch
from fastvideo_grpo.algorithms.objectives.dgpo import DGPO, dgpo_loss
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.samplers import SDERollout
from fastvideo_grpo.algorithms.update import UpdateSettings, update
from fastvideo_grpo.algorithms.policy_versions import SeparateAdapter
from support.tiny_models import tiny_toy_adapter


def test_surrogate_gradient_is_the_group_preference_loss_gradient_over_beta():
    g = torch.Generator().manual_seed(0)
    G, groups, beta = 4, 3, 50.0
    rewards = torch.rand(groups * G, generator=g, dtype=torch.float64)
    adv = grpo.group_advantages(rewards, G).to(torch.float64)
    d_ref = torch.rand(groups * G, generator=g, dtype=torch.float64)
    d = (d_ref + 0.01 * torch.randn(groups * G, generator=g, dtype=torch.float64)).requires_grad_(True)
    # the paper: G+ = {A > 0}, G- = {A < 0}, weights |A|; R(G) = sum_{x in G} |A(x)| r(x), r = -beta (d - d_ref) / G
    r = -beta * (d - d_ref) / G
    paper = 0.0
    for k in range(groups):
        sl = slice(k * G, (k + 1) * G)
        pos, neg = adv[sl] > 0, adv[sl] < 0
        margin = (adv[sl][pos].abs() * r[sl][pos]).sum() - (adv[sl][neg].abs() * r[sl][neg]).sum()
        paper = paper - F.logsigmoid(margin)
    (paper / groups).backward()
    want = d.grad.clone()
    d.grad = None
    loss, weight = dgpo_loss(d, d_ref, adv, G, beta)
    loss.backward()
    torch.testing.assert_close(d.grad, want / beta)
    # the weight is sigma(S) = sigma(-(R(G+) - R(G-))), the same for a group's samples
    s = (beta / G * (adv * (d.detach() - d_ref)).reshape(groups, G).sum(1))
    torch.testing.assert_close(weight, torch.sigmoid(s).repeat_interleave(G))
    with pytest.raises(ValueError, match="whole groups"):
        dgpo_loss(d[:5], d_ref[:5], adv[:5], G, beta)


def _batch(seed=0, tau=0.75):
    ad = tiny_toy_adapter(seed)
    sched = ad.make_schedule(4, 0.0)  # ODE rollouts: DGPO needs no stochastic policy
    prompts = ["two red circles", "one blue square"]
    G = 3
    keep = SDERollout().keep_steps(4, tau, 6, G, torch.Generator().manual_seed(0), (0, 3), shared=True)
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), G, keep, torch.Generator().manual_seed(1),
                   shared_noise=False, decode=False)
    adv = grpo.group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.3, 0.2, 0.8]), G)
    ref = copy.deepcopy(ad)  # the frozen starting policy, a model of its own (SeparateAdapter)
    for p in ref.model.parameters():
        p.requires_grad_(False)
    return ad, sched, traj, adv, ref


def test_times_noise_reference_and_clipping_of_a_real_update():
    ad, sched, traj, adv, ref = _batch()
    assert traj.steps_BK.shape == (6, 2) and (traj.steps_BK == traj.steps_BK[0]).all()  # one subset, shared
    assert ((traj.steps_BK >= 0) & (traj.steps_BK < 3)).all()
    obj = DGPO(beta=100.0, clip_range=1e-2, kl_coef=0.1)
    gen = torch.Generator().manual_seed(7)
    batch = TrainBatch(ad, sched, traj, adv, reference=SeparateAdapter(ref), generator=gen)
    ref_before = [p.detach().clone() for p in ref.model.parameters()]
    stats = update(obj, batch, torch.optim.SGD(ad.model.parameters(), lr=0.5),
                   UpdateSettings(num_updates=2, micro_batch_size=3, max_grad_norm=1e9))
    assert stats["train/num_updates"] == 2
    assert all(torch.equal(p, q) for p, q in zip(ref.model.parameters(), ref_before))  # the reference is frozen
    # the noise: one draw per group and slot, repeated over the group's 3 samples
    n = obj._noise
    assert torch.equal(n[0], n[1]) and torch.equal(n[0], n[2]) and not torch.equal(n[0], n[3])
    # d_ref of slot 0 by hand: x_t = (1 - t) x0 + t eps, t = sigma of the kept step, the reference's velocity
    k, step = 0, int(traj.steps_BK[0, 0])
    t = float(sched.sigmas[step])
    x0 = traj.final_latents
    xt = (1 - t) * x0 + t * n[:, k]
    with torch.no_grad():
        v_ref = ref.predict(xt, sched.model_timestep(step, xt), traj.cond)
    want = ((v_ref - (n[:, k] - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(obj._ref_dsm[:, k], want, rtol=1e-5, atol=1e-7)
    assert stats["train/kl"] > 0  # the velocity KL to the reference (kl_coef) took part


def test_clipping_detaches_exactly_the_samples_outside_the_range():
    ad, sched, traj, adv, ref = _batch(1, tau=0.5)
    obj = DGPO(beta=10.0, clip_range=1e-3)
    batch = TrainBatch(ad, sched, traj, adv, reference=SeparateAdapter(ref), generator=torch.Generator().manual_seed(3))
    obj.prepare(batch, [torch.arange(6)])
    rows = torch.arange(6)
    # before any optimiser step the old policy is the current one: ratio 1, nothing clipped
    assert float(obj.loss(batch, rows, 0)[1][3]) == 0.0
    # make the stored old errors differ from the current ones by known ratios: exp(d_old - d) = 1 +- 0.01 or 1
    with torch.no_grad():
        xt, target, t = obj._noised(batch, rows, 0)
        d = ((ad.predict(xt, t, traj.cond).float() - target) ** 2).mean(dim=(1, 2, 3))
    shift = torch.tensor([0.01, -0.01, 0.0, 0.01, -0.01, 0.0])
    obj._old_dsm[:, 0] = d + torch.log1p(shift)
    loss, st = obj.loss(batch, rows, 0)
    a = obj._adv_B
    want_clip = torch.where(a > 0, 1 + shift > 1 + 1e-3, 1 + shift < 1 - 1e-3)
    assert st[3] == pytest.approx(float(want_clip.float().mean()))
    # gradient only from the unclipped samples: compare with the surrogate over them written out
    ad.model.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in ad.model.parameters()]
    ad.model.zero_grad()
    v = ad.predict(xt, t, traj.cond).float()
    dd = ((v - target) ** 2).mean(dim=(1, 2, 3))
    w = torch.sigmoid(10.0 / 3 * (a * (d - obj._ref_dsm[:, 0])).reshape(2, 3).sum(1)).repeat_interleave(3)
    (w * a * dd * (~want_clip).float()).mean().backward()
    for p, q in zip(got, [p.grad for p in ad.model.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="multiple of grpo.group_size=3"):
        obj.prepare(batch, [torch.arange(4), torch.arange(4, 6)])
    # grpo.clip_range: null turns the clip off: no rollout-policy replay, nothing detached
    free = DGPO(beta=10.0, clip_range=None)
    assert not free.clip_dsm and free.extra_forwards_per_trained_step == 1
    free.prepare(batch, [torch.arange(6)])
    assert free._old_dsm is None and float(free.loss(batch, rows, 0)[1][3]) == 0.0
