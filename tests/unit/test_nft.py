"""DiffusionNFT (algorithms/objectives/diffusion_nft.py) against its released code (NVlabs/DiffusionNFT,
scripts/train_nft_sd3.py), whose formulas are written out independently here: the optimality probability with
adv_clip_max, the adaptively weighted x0-space loss scaled by adv_clip_max / beta, the KL to the reference, the
old policy's decay schedules and its EMA through the trainer (rollouts sampled with it)."""

import math

import pytest
import torch

from fastvideo_grpo.algorithms.objectives import build_objective
from fastvideo_grpo.algorithms.objectives import diffusion_nft as nft
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.training.trainer import GRPOTrainer
from support.tiny_models import tiny_toy_adapter


def test_optimality_probability_is_the_released_clip_over_adv_clip_max():
    """Released: r = clip(A, -5, 5) / 5 / 2 + 0.5 (lines 910-929). For A = -0.5 / 0.3 / 0.9 that is 0.45 / 0.53 /
    0.59 (the pre-release mapping 1/2 + 1/2 clip(A, -1, 1) gave 0.25 / 0.65 / 0.95); |A| > 5 saturates."""
    a = torch.tensor([-0.5, 0.3, 0.9, 7.0, -6.0, 0.0])
    torch.testing.assert_close(nft.optimality_probability(a), torch.tensor([0.45, 0.53, 0.59, 1.0, 0.0, 0.5]))
    # adv_clip_max 1 is the pre-release mapping
    torch.testing.assert_close(nft.optimality_probability(a, 1.0), torch.tensor([0.25, 0.65, 0.95, 1.0, 0.0, 0.5]))


def _released_policy_loss(v, v_old, x0, eps, t, adv, beta, m):
    """The released policy loss, written out from train_nft_sd3.py 910-960 in float64 (not the project's code)."""
    v, v_old, x0, eps, t = (x.double() for x in (v, v_old, x0, eps, t))
    xt = (1 - t) * x0 + t * eps
    r = ((adv.double().clamp(-m, m) / m) / 2.0 + 0.5).clamp(0, 1)
    pos_pred = beta * v + (1 - beta) * v_old
    neg_pred = (1.0 + beta) * v_old - beta * v
    out = []
    for pred in (pos_pred, neg_pred):
        x0_pred = xt - t * pred
        w = (x0_pred - x0).abs().mean(dim=(1, 2), keepdim=True).clip(min=1e-5).detach()
        out.append(((x0_pred - x0) ** 2 / w).mean(dim=(1, 2)))
    return ((r * out[0] / beta + (1 - r) * out[1] / beta) * m).mean()


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_is_the_released_adaptively_weighted_x0_loss(beta):
    """Loss and gradient with respect to v_theta equal the released formula's (float64 reference)."""
    g = torch.Generator().manual_seed(0)
    B = 3
    x0, eps, v_old = (torch.randn(B, 4, 5, generator=g) for _ in range(3))
    v = (v_old + 0.3 * torch.randn(B, 4, 5, generator=g)).requires_grad_(True)
    t = torch.tensor([0.9, 0.4, 0.05]).reshape(B, 1, 1)
    adv = torch.tensor([2.0, -0.7, 9.0])
    xt = (1 - t) * x0 + t * eps
    r = nft.optimality_probability(adv, 5.0)
    loss, _, _ = nft.nft_loss(v, v_old, eps - x0, r, beta, x0=x0, xt=xt, t=t, weighting="adaptive", scale=5.0)
    v_ref = v.detach().clone().double().requires_grad_(True)
    want = _released_policy_loss(v_ref, v_old, x0, eps, t, adv, beta, 5.0)
    # float32 inputs (xt, the predictions) against a float64 reference: a few float32 roundings of O(1) terms
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    loss.backward()
    want.backward()
    torch.testing.assert_close(v.grad.double(), v_ref.grad, rtol=1e-5, atol=1e-7)
    # the weights are detached: the gradient is 2 (x0+- - x0) / w * (-t beta) (+ for the negative branch) ...
    # which differs from the plain (unweighted) MSE's
    mse, _, _ = nft.nft_loss(v.detach(), v_old, eps - x0, r, beta, weighting="mse", scale=5.0)
    assert abs(mse.item() - loss.item()) > 1e-3


def test_nft_mse_weighting_hand_computed():
    """weighting: mse with m = 1, beta = 1 is the pre-release velocity MSE objective: r |v+ - v|^2 + (1 - r)
    |v- - v|^2. Sample 0: v_theta (1, 2), v_old (0, 1), v (1, 1), r 0.75, beta 0.5 -> v+ = (0.5, 1.5), mse 0.25;
    v- = (-0.5, 0.5), mse 1.25; (0.75 * 0.25 + 0.25 * 1.25) / beta = 1.0. Sample 1: v_theta (0, 0), v_old (2, 0),
    v (0, 2), r 0.25 -> mse 2.5 and 6.5; (0.25 * 2.5 + 0.75 * 6.5) / 0.5 = 11."""
    v_theta = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    loss, pos, neg = nft.nft_loss(v_theta, v_old, target, torch.tensor([0.75, 0.25]), beta=0.5, weighting="mse")
    assert loss.item() == pytest.approx((1.0 + 11.0) / 2)
    torch.testing.assert_close(pos, torch.tensor([0.25, 2.5]))
    torch.testing.assert_close(neg, torch.tensor([1.25, 6.5]))
    with pytest.raises(ValueError, match="beta"):
        nft.nft_loss(v_theta, v_old, target, torch.tensor([0.5, 0.5]), beta=0.0, weighting="mse")


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_nft_loss_minimiser_is_old_velocity_moved_by_2r_minus_1_over_beta(beta):
    g = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0])
    v = v_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = nft.nft_loss(v, v_old, target, r, beta, weighting="mse")[0]
        loss.backward()
        return loss

    opt.step(closure)
    want = v_old + (2 * r[:, None] - 1) * (target - v_old) / beta
    torch.testing.assert_close(v.detach(), want, rtol=1e-4, atol=1e-4)


def test_old_policy_decay_is_the_released_return_decay():
    """Released return_decay (lines 169-189), written out: type 0 always 0; type 1 min(0.001 s, 0.5); type 2 0
    before step 75, then min(0.0075 (s - 75), 0.999)."""
    for s in (0, 1, 10, 74, 75, 76, 200, 499, 500, 1000, 10 ** 5):
        assert nft.return_decay(s, 0) == 0.0
        assert nft.return_decay(s, 1) == pytest.approx(min(0.001 * s, 0.5), abs=1e-15)
        assert nft.return_decay(s, 2) == (0.0 if s < 75 else pytest.approx(min((s - 75) * 0.0075, 0.999), abs=1e-15))
    with pytest.raises(ValueError, match="decay_type"):
        nft.return_decay(3, 3)


_toy = tiny_toy_adapter


def test_nft_trains_through_the_trainer_with_an_ode_sampler():
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    cfg = load_config(None, [
        "--sampling.num_steps=4", "--sampling.eta=0.0", "--grpo.objective=nft", "--grpo.nft_beta=1.0",
        "--grpo.shared_noise=false", "--grpo.tau=1.0", "--grpo.group_size=2", "--grpo.prompts_per_iteration=2",
        "--grpo.num_updates_per_iteration=2",
        "--rewards=[{name: toy_colour_fidelity}]", "--optim.lr=1e-3", "--train.seed=2"])
    ad = _toy()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=2))
    before = [p.detach().clone() for p in ad.model.parameters()]
    m = trainer.train_iteration()
    assert m["train/num_updates"] == 2 and m["train/grad_norm"] > 0
    assert 0.0 <= m["train/nft_r_mean"] <= 1.0 and m["train/nft_positive"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, ad.model.parameters()))
    # the GRPO objective refuses the same deterministic sampler (no log-probs to train)
    with pytest.raises(ValueError, match="eta = 0"):
        GRPOTrainer(load_config(None, ["--sampling.num_steps=4", "--sampling.eta=0.0"]), _toy(), fns, weights,
                    PromptSource(prompts, ad.encode_prompts, seed=2))
    with pytest.raises(ValueError, match="shared_noise"):  # an ODE from one noise: G identical samples
        build_objective(load_config(None, ["--grpo.objective=nft", "--sampling.eta=0.0"]))
    assert build_objective(load_config(None, ["--grpo.objective=nft", "--sampling.eta=0.0", "--grpo.shared_noise=false",
                                              "--grpo.kl_coef=0.1"])).needs_reference


def test_nft_update_with_all_positive_samples_is_flow_matching_on_them():
    """r = 1 everywhere and beta = 1: v+ = v_theta, so one step lowers the plain flow-matching error on the
    noised clean samples (same noise and times, read back from the generator)."""
    from fastvideo_grpo.algorithms import grpo
    from fastvideo_grpo.algorithms.rollout import rollout

    ad = _toy(1)
    sched = ad.make_schedule(4, 0.0)
    prompts = ["two red circles", "one blue square"]
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, grpo.subsample_timesteps(
        4, 1.0, 4, torch.Generator().manual_seed(0), (0, 3)), torch.Generator().manual_seed(1), decode=False)

    def fm_error():
        g = torch.Generator().manual_seed(7)
        B, K = traj.steps_BK.shape
        eps = torch.randn((B, K) + tuple(traj.final_latents.shape[1:]), generator=g)
        t = sched.sigmas[traj.steps_BK].float()
        err = 0.0
        with torch.no_grad():
            for k in range(K):
                tk = t[:, k].reshape(-1, 1, 1, 1)
                xt = (1 - tk) * traj.final_latents + tk * eps[:, k]
                v = ad.predict(xt, sched.model_timestep(traj.steps_BK[:, k], xt), traj.cond)
                err += float(((v - (eps[:, k] - traj.final_latents)) ** 2).mean())
        return err

    e0 = fm_error()
    opt = torch.optim.SGD(ad.model.parameters(), lr=0.05)
    nft.nft_update(ad, sched, traj, torch.full((4,), 5.0), opt, torch.Generator().manual_seed(7), beta=1.0,
                   weighting="mse")
    assert fm_error() < e0


def test_old_policy_is_the_released_ema_and_the_rollouts_sample_with_it():
    """decay_type 1 through the trainer: after each iteration old = d old + (1 - d) weights with d =
    return_decay(optimiser steps so far) (released lines 1034-1039), recomputed here in float64 from the weights
    after each iteration; each rollout runs with the old weights (released set_adapter("old") before sampling);
    and v_old of the update is the old policy's velocity. With kl_coef the KL statistic is 0 while the policy
    equals its start and positive after it moved."""
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    cfg = load_config(None, [
        "--sampling.num_steps=3", "--sampling.eta=0.0", "--grpo.objective=nft", "--grpo.shared_noise=false",
        "--grpo.tau=1.0", "--grpo.group_size=2", "--grpo.prompts_per_iteration=2", "--grpo.num_updates_per_iteration=1",
        "--grpo.kl_coef=0.01", "--grpo.objective_kwargs={decay_type: 1}", "--rewards=[{name: toy_colour_fidelity}]",
        "--optim.lr=3e-2", "--train.seed=2"])
    ad = _toy()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=2))
    objective = trainer.objective
    names = [n for n, p in ad.model.named_parameters() if p.requires_grad]
    weights_now = lambda: {n: p.detach().double().clone() for n, p in ad.model.named_parameters() if p.requires_grad}  # noqa: E731
    old = weights_now()  # the old policy starts at the initial weights
    seen = []
    sampler = trainer.sampler

    class Spy:  # the sampler, recording the weights it samples with (its other declarations pass through)
        def __getattr__(self, name):
            return getattr(sampler, name)

        def __call__(self, *a, **k):
            seen.append(weights_now())
            return sampler(*a, **k)

    trainer.sampler = Spy()
    prepare = objective.prepare

    def check_v_old(batch, row_chunks):  # v_old recomputed with a separate model holding the old weights
        import copy

        prepare(batch, row_chunks)
        other = copy.deepcopy(ad)
        with torch.no_grad():
            for n, q in other.model.named_parameters():
                if n in old:
                    q.copy_(old[n].float())
        rows = torch.arange(batch.size)
        xt, _, idx, _, _ = objective._noised(batch, rows, 0)
        with torch.no_grad():
            want = type(other).predict(other, xt, batch.schedule.model_timestep(idx, xt), batch.traj.cond).float()
        torch.testing.assert_close(objective._v_old[:, 0], want, rtol=1e-5, atol=1e-6)

    objective.prepare = check_v_old
    steps = 0
    for it in range(3):
        m = trainer.train_iteration()
        for n in names:  # the rollout ran with the old policy's weights
            torch.testing.assert_close(seen[-1][n], old[n], rtol=0, atol=1e-6)
        if it == 0:
            # one optimiser step per iteration: the first update's forwards are the start weights, as the reference
            # (the same arithmetic on the same inputs: exactly 0)
            assert m["train/kl"] == 0.0
        steps += m["train/num_updates"]
        d = min(0.001 * steps, 0.5)
        assert m["train/nft_old_decay"] == pytest.approx(d)
        w = weights_now()
        old = {n: d * old[n] + (1 - d) * w[n] for n in names}
        for n in names:
            torch.testing.assert_close(objective.old.copy[n].double(), old[n], rtol=0, atol=1e-6)
        assert all(torch.equal(p.detach().double(), w[n]) for n, p in ad.model.named_parameters() if p.requires_grad)
    assert m["train/kl"] > 0
    assert objective.state_dict() == {"optimizer_steps": steps}


def test_old_policy_and_step_count_are_checkpointed(tmp_path):
    """The old policy (sharded like the weights: a DCP entry of its own) and the optimiser-step count that sets its
    decay come back with a resumed trainer."""
    from fastvideo_grpo.rewards import rules  # noqa: F401
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.checkpoint import load_trainer_checkpoint, save_trainer_checkpoint

    cfg = load_config(None, [
        "--sampling.num_steps=3", "--sampling.eta=0.0", "--grpo.objective=nft", "--grpo.shared_noise=false",
        "--grpo.tau=1.0", "--grpo.group_size=2", "--grpo.prompts_per_iteration=1", "--grpo.num_updates_per_iteration=1",
        "--rewards=[{name: toy_colour_fidelity}]", "--optim.lr=3e-2", "--train.seed=2"])
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)

    def fresh():
        ad = _toy()
        return GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=2))

    trainer = fresh()
    for _ in range(2):
        trainer.train_iteration()
    path = save_trainer_checkpoint(trainer, tmp_path / "checkpoints")
    resumed = fresh()
    assert resumed.objective.optimizer_steps == 0
    load_trainer_checkpoint(resumed, path)
    assert resumed.objective.optimizer_steps == trainer.objective.optimizer_steps == 2
    for name, t in trainer.objective.old.copy.items():
        assert torch.equal(resumed.objective.old.copy[name], t), name
    # the old policy is not the weights (decay 0.002 after 2 steps): restoring it is not restoring the model
    assert any(not torch.equal(t, p.detach()) for (n, p), t in zip(trainer.adapter.model.named_parameters(),
                                                                    trainer.objective.old.copy.values()))
