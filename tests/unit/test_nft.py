"""DiffusionNFT (algorithms/objectives/diffusion_nft.py): the loss against a hand-computed case and its closed-form
minimiser, and the update through the trainer with a deterministic (ODE) sampler -- no log-probs needed."""

import pytest
import torch

from fastvideo_grpo.algorithms.objectives import build_objective
from fastvideo_grpo.algorithms.objectives import diffusion_nft as nft
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.training.trainer import GRPOTrainer
from support.tiny_models import tiny_toy_adapter


def test_optimality_probability_maps_normalised_rewards_to_unit_interval():
    a = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.4, 1.0, 2.0])
    torch.testing.assert_close(nft.optimality_probability(a), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.7, 1.0, 1.0]))


def test_nft_loss_hand_computed():
    # sample 0: v_theta (1, 2), v_old (0, 1), v (1, 1), r = 0.75, beta = 0.5
    #   v+ = 0.5 v_old + 0.5 v_theta = (0.5, 1.5): mse ((-0.5)^2 + 0.5^2) / 2 = 0.25
    #   v- = 1.5 v_old - 0.5 v_theta = (-0.5, 0.5): mse ((-1.5)^2 + (-0.5)^2) / 2 = 1.25
    #   0.75 * 0.25 + 0.25 * 1.25 = 0.5
    # sample 1: v_theta (0, 0), v_old (2, 0), v (0, 2), r = 0.25
    #   v+ = (1, 0): mse (1 + 4) / 2 = 2.5;  v- = (3, 0): mse (9 + 4) / 2 = 6.5;  0.25 * 2.5 + 0.75 * 6.5 = 5.5
    v_theta = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    loss, pos, neg = nft.nft_loss(v_theta, v_old, target, torch.tensor([0.75, 0.25]), beta=0.5)
    assert loss.item() == pytest.approx((0.5 + 5.5) / 2)
    torch.testing.assert_close(pos, torch.tensor([0.25, 2.5]))
    torch.testing.assert_close(neg, torch.tensor([1.25, 6.5]))
    loss.backward()
    # dL/dv_theta = (1/B)(2 beta / n)[r (v+ - v) - (1 - r)(v- - v)], n = 2 elements, B = 2 samples
    #   sample 0: 0.25 [0.75 (-0.5, 0.5) - 0.25 (-1.5, -0.5)] = (0, 0.125)
    #   sample 1: 0.25 [0.25 (1, -2) - 0.75 (3, -2)] = (-0.5, 0.25)
    torch.testing.assert_close(v_theta.grad, torch.tensor([[0.0, 0.125], [-0.5, 0.25]]))
    with pytest.raises(ValueError, match="beta"):
        nft.nft_loss(v_theta, v_old, target, torch.tensor([0.5, 0.5]), beta=0.0)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_nft_loss_minimiser_is_old_velocity_moved_by_2r_minus_1_over_beta(beta):
    g = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0])
    v = v_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = nft.nft_loss(v, v_old, target, r, beta)[0]
        loss.backward()
        return loss

    opt.step(closure)
    want = v_old + (2 * r[:, None] - 1) * (target - v_old) / beta
    torch.testing.assert_close(v.detach(), want, rtol=1e-4, atol=1e-4)


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
    assert 0.0 <= m["train/nft_r_mean"] <= 1.0 and m["train/nft_positive_mse"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, ad.model.parameters()))
    # the GRPO objective refuses the same deterministic sampler (no log-probs to train)
    with pytest.raises(ValueError, match="eta = 0"):
        GRPOTrainer(load_config(None, ["--sampling.num_steps=4", "--sampling.eta=0.0"]), _toy(), fns, weights,
                    PromptSource(prompts, ad.encode_prompts, seed=2))
    with pytest.raises(ValueError, match="shared_noise"):  # an ODE from one noise: G identical samples
        build_objective(load_config(None, ["--grpo.objective=nft", "--sampling.eta=0.0"]))
    with pytest.raises(ValueError, match="kl_coef"):
        build_objective(load_config(None, ["--grpo.objective=nft", "--grpo.kl_coef=0.1"]))


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
    nft.nft_update(ad, sched, traj, torch.full((4,), 5.0), opt, torch.Generator().manual_seed(7), beta=1.0)
    assert fm_error() < e0
