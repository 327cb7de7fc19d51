"""Flow-DPPO (objectives/flow_dppo.py) against its paper's formulas written out here.

* The divergence is the exact KL of two Gaussians with the same std: |mu_new - mu_old|^2 / (2 sigma^2), averaged
  over the latent's elements -- checked against torch.distributions' KL of the two Normals.
* The asymmetric mask on hand-made cases: blocked only when D >= eps_D and the update moves away
  (A > 0, rho > 1 or A < 0, rho < 1); the loss is -mean(m rho A) and blocked rows get exactly no gradient.
* Several epochs over one rollout through the update driver: pi_old (log-probs and means) stays the rollout's for
  every epoch, so E driver epochs equal E plain SGD steps on the loss written out here with the rollout's
  quantities frozen; mu_old is the rollout's kept step mean (equal to a replay of the rollout weights), so the
  passes -- counted by a spy on the model -- are one forward and one backward per transition and epoch, no
  replay; with a tiny threshold the mask engages in the later epochs.
"""

import copy

import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.algorithms.objectives import TrainBatch
from fastvideo_grpo.algorithms.objectives.flow_dppo import FlowDPPO, flow_dppo_loss
from fastvideo_grpo.algorithms.passes import PassCounter
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.update import UpdateSettings, update
from support.tiny_models import tiny_toy_adapter


def test_divergence_is_the_exact_gaussian_kl_and_the_mask_blocks_only_moves_away():
    g = torch.Generator().manual_seed(0)
    B = 8
    mu_old = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    shift = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    # rows 0-3 move far (D >> eps), rows 4-7 barely (D << eps)
    scale = torch.tensor([1.0] * 4 + [1e-5] * 4, dtype=torch.float64).reshape(-1, 1, 1)
    mu_new = (mu_old + scale * shift).requires_grad_(True)
    std = torch.full((B,), 0.3, dtype=torch.float64)
    N = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(N(mu_new.detach(), 0.3), N(mu_old, 0.3)).mean(dim=(1, 2))
    log_ratio = torch.tensor([0.2, 0.2, -0.2, -0.2] * 2, dtype=torch.float64, requires_grad=True)
    old_lp = torch.zeros(B, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0] * 2, dtype=torch.float64)
    thr = 1e-3
    loss, blocked, div, ratio = flow_dppo_loss(log_ratio, old_lp, mu_new, mu_old, std, adv, thr)
    torch.testing.assert_close(div, kl)
    assert (div[:4] > thr).all() and (div[4:] < thr).all()
    # far rows: A>0 & rho>1 (away) blocked; A<0 & rho>1 (corrective) kept; A>0 & rho<1 kept; A<0 & rho<1 blocked
    assert blocked.tolist() == [True, False, False, True] + [False] * 4
    rho = torch.exp(log_ratio.detach())
    keep = torch.tensor([0.0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float64)
    want = -(keep * rho * adv).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    # d/d log rho of -m rho A / B: -m rho A / B; blocked rows exactly 0; the mean mu_new carries no gradient
    torch.testing.assert_close(log_ratio.grad, -keep * rho * adv / B)
    assert mu_new.grad is None or not mu_new.grad.any()
    with pytest.raises(ValueError, match="divergence_threshold"):
        FlowDPPO(divergence_threshold=0.0)
    assert FlowDPPO.needs_step_means and FlowDPPO().extra_forwards_per_trained_step == 0


def _setup(seed=0):
    ad = tiny_toy_adapter(seed)
    sched = ad.make_schedule(4, 1.0)
    prompts = ["two red circles", "one blue square"]
    keep = grpo.subsample_timesteps(4, 1.0, 4, torch.Generator().manual_seed(0), (0, 3))
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, torch.Generator().manual_seed(1),
                   decode=False, keep_means=True)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return ad, sched, traj, adv


def _loss_by_hand(ad, sched, traj, adv, mean_old, thr, divergences):
    """-mean over (sample, kept step) of m rho A, with the rollout's log-probs and means frozen; appends each
    step's divergences to ``divergences``."""
    B, K = traj.steps_BK.shape
    total = 0.0
    for k in range(K):
        idx = traj.steps_BK[:, k]
        z = traj.latents_BK[:, k]
        out = ad.predict(z, sched.model_timestep(idx, z), traj.cond)
        _, lp, mean, std = sched.step(idx, out, z, prev_sample=traj.next_latents_BK[:, k])
        rho = torch.exp(lp - traj.log_probs_BK[:, k])
        d = ((mean.detach() - mean_old[:, k]) ** 2 / (2 * std.reshape(-1, 1, 1, 1) ** 2)).mean(dim=(1, 2, 3))
        divergences.append(d)
        away = ((adv > 0) & (rho > 1)) | ((adv < 0) & (rho < 1))
        m = 1.0 - ((d >= thr) & away).float()
        total = total + (-(m * rho * adv)).mean()
    return total / K


def test_several_epochs_over_one_rollout_keep_the_rollout_policy_as_old():
    ad, sched, traj, adv = _setup()
    ref = copy.deepcopy(ad)
    with torch.no_grad():  # mu_old: the rollout weights' means of the kept transitions
        mean_old = torch.stack([sched.step(traj.steps_BK[:, k], ref.predict(
            traj.latents_BK[:, k], sched.model_timestep(traj.steps_BK[:, k], traj.latents_BK[:, k]), traj.cond),
            traj.latents_BK[:, k], prev_sample=traj.next_latents_BK[:, k])[2] for k in range(3)], dim=1)
    # the rollout kept the same means: the same batch of 4 through the same kernels in this process
    torch.testing.assert_close(traj.means_BK, mean_old.to(traj.means_BK.dtype), rtol=0,
                               atol=4 * torch.finfo(torch.float32).eps * float(mean_old.abs().max()))
    lr, E, thr = 0.05, 3, 1e-6  # a threshold the later epochs' divergences cross: the mask takes part
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=lr)
    divergences = []
    for _ in range(E):  # plain SGD on the written-out loss, old quantities frozen at the rollout
        ref_opt.zero_grad()
        _loss_by_hand(ref, sched, traj, adv, mean_old, thr, divergences).backward()
        ref_opt.step()
    d = torch.cat(divergences)
    # no divergence within 5% of the threshold: the driver's rounding cannot flip a mask decision
    assert ((d - thr).abs() > 0.05 * thr).all() and (d > thr).any()
    counter = PassCounter()
    rows = []
    ad.model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    with counter.watch(ad):
        stats = update(FlowDPPO(thr), TrainBatch(ad, sched, traj, adv), torch.optim.SGD(ad.model.parameters(), lr=lr),
                       UpdateSettings(num_updates=1, micro_batch_size=2, max_grad_norm=1e9, num_epochs=E))
    for p, q in zip(ad.model.parameters(), ref.model.parameters()):
        # float32 sums of 2 x 3 micro-step gradients in another order, over 3 steps: a few ulps of the parameters
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # ratio 1 before the first step, up to the rounding of micro-batches of 2 against the rollout's batch of 4
    assert stats["train/masked_frac"] > 0
    assert stats["train/num_updates"] == E and stats["train/first_ratio_dev"] <= 4 * torch.finfo(torch.float32).eps
    B, K = 4, 3
    assert sum(rows) == B * K * E  # one forward per transition and epoch: mu_old comes from the rollout
    assert counter.metrics()["passes/forward_update"] == B * K * E and counter.metrics()["passes/backward"] == B * K * E
    # a threshold below every moved transition's divergence: the later epochs block the updates moving away
    ad2, sched2, traj2, adv2 = _setup()
    stats2 = update(FlowDPPO(1e-12), TrainBatch(ad2, sched2, traj2, adv2), torch.optim.SGD(ad2.model.parameters(), lr=lr),
                    UpdateSettings(num_updates=1, micro_batch_size=0, max_grad_norm=1e9, num_epochs=E))
    assert stats2["train/masked_frac"] > 0 and stats2["train/divergence"] > 0
    assert stats2["train/first_ratio_dev"] == 0.0  # the rollout's batch shape: the same arithmetic, ratio exactly 1
