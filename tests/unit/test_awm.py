"""Advantage Weighted Matching (algorithms/objectives/awm.py) against the paper's loss written out here: the
advantage-weighted flow-matching loss on hand-computed numbers and its weightings, the PPO-clip form's gradient at
ratio 1, and one update through the trainer with a deterministic (ODE) sampler equal to SGD on the loss re-implemented
here; the passes the clip's old-policy forward costs are counted and planned."""

import copy

import pytest
import torch

from fastvideo_grpo.algorithms.objectives import awm, build_objective
from fastvideo_grpo.cli.plan import passes_per_iteration
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.training.trainer import Trainer
from support.tiny_models import tiny_toy_adapter


def test_matching_loss_and_its_weightings_hand_computed():
    # sample 0: v - u = (1, -1) -> e = 1, t = 0.5;  sample 1: v - u = (2, 0) -> e = 2, t = 0.25
    v = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    c = 1e-10
    want = {"uniform": [1.0, 2.0], "t": [0.5, 0.5], "t2": [0.25, 0.125],
            "huber": [0.5 * ((1 + c) ** 0.5 - c ** 0.5), 0.25 * ((2 + c) ** 0.5 - c ** 0.5)],
            "ghuber": [0.5 / 0.25 * ((1 + c) ** 0.25 - c ** 0.25), 0.25 / 0.25 * ((2 + c) ** 0.25 - c ** 0.25)]}
    for w, vals in want.items():
        torch.testing.assert_close(awm.matching_loss(v, u, t, w, 0.25), torch.tensor(vals, dtype=torch.float64))
    # L = mean(A l): A = (2, -1) -> (2 * 1 + (-1) * 2) / 2 = 0; its gradient 2 A (v - u) / (n B), n = 2 elements
    vg = v.clone().requires_grad_(True)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, ratio = awm.awm_loss(awm.matching_loss(vg, u, t, "uniform"), adv)
    assert loss.item() == pytest.approx(0.0) and ratio is None
    loss.backward()
    torch.testing.assert_close(vg.grad, torch.tensor([[1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64))
    # the PPO-clip form r = exp(l_old - l): at r = 1 (l_old = l) the same gradient; outside the clip none
    vc = v.clone().requires_grad_(True)
    l_c = awm.matching_loss(vc, u, t, "uniform")
    loss_c, r = awm.awm_loss(l_c, adv, l_c.detach(), clip_range=0.1)
    assert torch.equal(r, torch.ones(2, dtype=torch.float64))
    loss_c.backward()
    torch.testing.assert_close(vc.grad, vg.grad)
    vd = v.clone().requires_grad_(True)
    _, r_far = awm.awm_loss(awm.matching_loss(vd, u, t, "uniform"), adv, torch.tensor([1.5, 1.0], dtype=torch.float64),
                            clip_range=0.1)
    awm.awm_loss(awm.matching_loss(vd, u, t, "uniform"), adv, torch.tensor([1.5, 1.0],
                 dtype=torch.float64), clip_range=0.1)[0].backward()
    # sample 0: r = e^0.5 > 1.1 with A > 0 -> clipped, no gradient; sample 1: r = e^-1 < 0.9 with A < 0 -> clipped
    assert torch.all(r_far != 1) and torch.equal(vd.grad, torch.zeros_like(v))
    with pytest.raises(ValueError, match="weighting must be one of"):
        build_objective(load_config(None, ["--grpo.objective=awm", "--grpo.objective_kwargs={weighting: t3}",
                                           "--sampling.eta=0.0", "--grpo.shared_noise=false"]))


CFG = ["--sampling.num_steps=4", "--sampling.eta=0.0", "--grpo.shared_noise=false", "--grpo.group_size=2",
       "--grpo.prompts_per_iteration=2", "--grpo.tau=1.0", "--grpo.num_updates_per_iteration=1",
       "--grpo.micro_batch_size=2", "--grpo.objective=awm", "--rewards=[{name: toy_colour_fidelity}]",
       "--grpo.adv_clip_max=0.5", "--optim.max_grad_norm=1e9", "--optim.weight_decay=0.0", "--train.seed=5"]


def _trainer(cfg, seed=2):
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    ad = tiny_toy_adapter(seed)
    fns, weights = build_reward_fns(cfg.rewards)
    trainer = Trainer(cfg, ad, fns, weights, PromptSource(split_prompts(seed=0)[0], ad.encode_prompts, seed=1))
    trainer.optimizer = torch.optim.SGD(ad.model.parameters(), lr=0.1)  # plain SGD: the step is -lr * grad
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    return trainer, ad


def test_one_trainer_update_is_sgd_on_the_advantage_weighted_matching_loss():
    import fastvideo_grpo.training.trainer as trainer_mod

    cfg = load_config(None, CFG + ["--grpo.objective_kwargs={weighting: t, advantage_max: 1.0}"])
    trainer, ad = _trainer(cfg)
    seen = {}
    real = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["batch"], seen["ref"] = batch, copy.deepcopy(ad)
        seen["ref"].__dict__.pop("predict", None)  # the copy's own predict, not the pass counter's wrapper of ad's
        seen["gen"] = batch.generator.get_state()  # the forward-process noise is drawn from here in prepare
        return real(objective, batch, *a, **k)

    trainer_mod.update = spy
    try:
        m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    batch, ref = seen["batch"], seen["ref"]
    traj, sched = batch.traj, batch.schedule
    B, K = traj.steps_BK.shape
    # an ODE rollout: eta 0 everywhere, no log-probs, and the update's passes are the trained steps only
    assert m["passes/forward_update"] == m["passes/backward"] == B * K == passes_per_iteration(cfg)["backward"]
    # the loss written out: x_t = (1 - t) x0 + t eps, u = eps - x0, t the sigma of the kept step,
    # l = t mean((v - u)^2), A clamped to +-0.5 and rescaled by advantage_max / adv_clip_max = 2
    g = torch.Generator()
    g.set_state(seen["gen"])
    noise = torch.randn((B, K) + tuple(traj.final_latents.shape[1:]), generator=g)
    adv = batch.advantages_B.clamp(-0.5, 0.5) * 2.0
    x0 = traj.final_latents
    total = 0.0
    for k in range(K):
        idx = traj.steps_BK[:, k]
        t = sched.sigmas[idx].float().reshape(-1, 1, 1, 1)
        xt = (1 - t) * x0 + t * noise[:, k]
        v = ref.predict(xt, sched.model_timestep(idx, xt), traj.cond)
        l_B = t.reshape(-1) * ((v - (noise[:, k] - x0)) ** 2).mean(dim=(1, 2, 3))
        total = total + (adv * l_B).mean()
    start = [p.detach().clone() for p in ref.model.parameters()]
    (total / K).backward()
    with torch.no_grad():
        for p in ref.model.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(ad.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)  # float32 sums in another order: a few ulps
    assert max((p - q).abs().max().item() for p, q in zip(ad.model.parameters(), start)) > 1e-4  # it did move


def test_the_clip_and_the_kl_cost_one_forward_each_and_are_planned():
    cfg = load_config(None, CFG + ["--grpo.objective_kwargs={clip_range: 0.01}", "--grpo.kl_coef=0.1"])
    objective = build_objective(cfg)
    assert objective.extra_forwards_per_trained_step == 2 and objective.needs_reference
    trainer, _ = _trainer(cfg)
    m = trainer.train_iteration()
    planned = passes_per_iteration(cfg)
    assert (m["passes/forward_rollout"], m["passes/forward_update"], m["passes/backward"]) == (
        planned["forward_rollout"], planned["forward_update"], planned["backward"]) == (16, 36, 12)
    # one optimiser step per iteration: the ratio stays 1 and the policy is the reference during the first update
    assert m["train/clipfrac"] == 0.0 and m["train/kl"] == 0.0
    assert trainer.train_iteration()["train/kl"] > 0  # the second update starts away from the reference
