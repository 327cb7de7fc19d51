"""GRPO-Guard (algorithms/objectives/grpo_guard.py) against the paper's formulas written out here: RatioNorm
log r_hat = s (log r + ||d||^2 / (2 s^2)) with the log-probs from torch.distributions, which is <eps, d> for the
rollout's draw x = mu_old + s eps; the per-step weights 1 / |dt|; and one update through the trainer equal to SGD on
the loss re-implemented here with the plain (unfused) SDE step."""

import copy

import pytest
import torch

from fastvideo_grpo import sde
from fastvideo_grpo.algorithms.objectives import build_objective, grpo_guard
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.training.trainer import Trainer
from support.tiny_models import tiny_toy_adapter


def test_ratio_norm_is_the_papers_and_removes_the_mean_shift():
    g = torch.Generator().manual_seed(0)
    B, shape = 4, (2, 3, 3)
    mu_old = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    d = 0.05 * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    mu = (mu_old + d).requires_grad_(True)
    s = torch.tensor([0.3, 0.1, 0.5, 0.2], dtype=torch.float64)
    eps = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    x = mu_old + s.reshape(-1, 1, 1, 1) * eps
    dims = (1, 2, 3)
    sb = s.reshape(-1, 1, 1, 1).expand_as(x)
    logp = torch.distributions.Normal(mu, sb).log_prob(x).mean(dims)
    old = torch.distributions.Normal(mu_old, sb).log_prob(x).mean(dims)
    adv = torch.tensor([1.5, -0.5, 7.0, -2.0], dtype=torch.float64)
    w = torch.tensor([10.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    clip = 0.02
    loss, (ratio, clipfrac, shift, log_ratio) = grpo_guard.guard_loss(logp, old, mu, mu_old, s, adv, w, clip, 5.0)
    # Eq. 8 written out, and the identity it rests on: s (log r + ||d||^2 / 2 s^2) = <eps, d>
    want_log = s * ((logp - old) + (d ** 2).mean(dims) / (2 * s ** 2))
    torch.testing.assert_close(torch.log(ratio), want_log.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.log(ratio), (eps * d).mean(dims), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(shift, (d ** 2).mean(dims) / (2 * s ** 2), rtol=1e-12, atol=0)
    # the raw log-ratio is shifted by exactly -||d||^2 / (2 s^2) from <eps, d> / s
    torch.testing.assert_close(log_ratio, (eps * d).mean(dims) / s - shift, rtol=1e-8, atol=1e-12)
    a = adv.clamp(-5, 5)
    r = torch.exp(want_log)
    want = (w * torch.maximum(-a * r, -a * r.clamp(1 - clip, 1 + clip))).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    assert clipfrac.item() == pytest.approx(float(((r - 1).abs() > clip).double().mean()))
    # the gradient reaches the policy's mean: d/dmu of w A <eps, mu - mu_old> r / B for unclipped samples
    loss.backward()
    inside = ((r - 1).abs() <= clip).detach()
    n = mu[0].numel()
    want_grad = (-(w * a * r * inside) / B).detach().reshape(-1, 1, 1, 1) * eps / n
    torch.testing.assert_close(mu.grad, want_grad, rtol=1e-8, atol=1e-14)


def test_step_weights_are_one_over_dt_or_over_the_output_coefficient():
    sched = sde.FlowSchedule.create(5, eta=0.7, shift=3.0)
    sig = sched.sigmas.tolist()
    idx = torch.tensor([[0, 3], [2, 1]])
    want = torch.tensor([[1 / (sig[0] - sig[1]), 1 / (sig[3] - sig[4])], [1 / (sig[2] - sig[3]), 1 / (sig[1] - sig[2])]],
                        dtype=torch.float64)
    torch.testing.assert_close(grpo_guard.step_weights(sched, idx, "dt"), want)
    # the flow SDE's mean moves with the velocity by C = dt (1 + eta^2 (1 - s) / (2 s)) (docs/method.md section 2)
    coef = torch.tensor([[(sig[i] - sig[i + 1]) * (1 + 0.49 * (1 - sig[i]) / (2 * sig[i])) for i in row]
                         for row in idx.tolist()], dtype=torch.float64)
    torch.testing.assert_close(grpo_guard.step_weights(sched, idx, "coefficient"), 1 / coef)
    # under Flow-GRPO's noise level the two weightings differ by the constant 1 + a^2 / 2 (the paper's beta)
    fg = sde.ETA_FORMS.get("flow_grpo")(sched)
    ratio = grpo_guard.step_weights(fg, torch.tensor([1, 2, 3]), "dt") / grpo_guard.step_weights(
        fg, torch.tensor([1, 2, 3]), "coefficient")
    torch.testing.assert_close(ratio, torch.full((3,), 1 + 0.49 / 2, dtype=torch.float64))
    assert torch.equal(grpo_guard.step_weights(sched, idx, "none"), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="reweight must be one of"):
        build_objective(load_config(None, ["--grpo.objective=grpo_guard", "--grpo.objective_kwargs={reweight: t}"]))
    with pytest.raises(ValueError, match="kl_coef"):  # the paper's point: no KL
        build_objective(load_config(None, ["--grpo.objective=grpo_guard", "--grpo.kl_coef=0.1"]))


CFG = ["--sampling.num_steps=4", "--sampling.eta=0.7", "--grpo.group_size=2", "--grpo.prompts_per_iteration=2",
       "--grpo.tau=1.0", "--grpo.num_updates_per_iteration=1", "--grpo.micro_batch_size=2", "--grpo.clip_range=0.05",
       "--grpo.objective=grpo_guard", "--rewards=[{name: toy_colour_fidelity}]", "--optim.lr=0.05",
       "--optim.max_grad_norm=1e9", "--optim.weight_decay=0.0", "--train.seed=3"]


def test_one_trainer_update_is_sgd_on_the_guard_loss_written_out():
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    import fastvideo_grpo.training.trainer as trainer_mod

    cfg = load_config(None, CFG)
    ad = tiny_toy_adapter(1)
    fns, weights = build_reward_fns(cfg.rewards)
    trainer = Trainer(cfg, ad, fns, weights, PromptSource(split_prompts(seed=0)[0], ad.encode_prompts, seed=1))
    trainer.optimizer = torch.optim.SGD(ad.model.parameters(), lr=0.05)  # plain SGD: the step is -lr * grad
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    seen = {}
    real = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["batch"], seen["ref"] = batch, copy.deepcopy(ad)
        seen["ref"].__dict__.pop("predict", None)  # the copy's own predict, not the pass counter's wrapper of ad's
        return real(objective, batch, *a, **k)

    trainer_mod.update = spy
    try:
        m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    assert m["train/first_ratio_dev"] == 0.0  # stored and re-scored means are the same arithmetic: r_hat = 1
    batch, ref = seen["batch"], seen["ref"]
    traj, sched = batch.traj, batch.schedule
    B, K = traj.steps_BK.shape
    assert traj.means_BK is not None and traj.means_BK.shape == traj.latents_BK.shape
    # the reference: the loss over all samples and kept steps with the plain flow SDE step (no fused kernel),
    # the rollout's means recomputed from the starting weights, delta = 1 / |dt|, averaged over the K steps
    adv = batch.advantages_B.clamp(-5, 5)
    total = 0.0
    for k in range(K):
        idx = traj.steps_BK[:, k]
        z, z_next = traj.latents_BK[:, k], traj.next_latents_BK[:, k]
        s, s_next, eta = sched.sigmas[idx], sched.sigmas[idx + 1], sched.eta[idx]
        t = sched.model_timestep(idx, z)
        with torch.no_grad():
            _, old_lp, old_mean, _ = sde.flow_sde_step(ref.predict(z, t, traj.cond), z, s, s_next, eta,
                                                       prev_sample=z_next)
        torch.testing.assert_close(traj.means_BK[:, k], old_mean, rtol=1e-5, atol=1e-6)
        _, lp, mean, std = sde.flow_sde_step(ref.predict(z, t, traj.cond), z, s, s_next, eta, prev_sample=z_next)
        std = std.float()
        log_r = std * ((lp - old_lp) + ((mean - old_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std ** 2))
        r = torch.exp(log_r)
        w = 1.0 / (s - s_next).abs().float()
        total = total + (w * torch.maximum(-adv * r, -adv * r.clamp(1 - 0.05, 1 + 0.05))).mean()
    start = [p.detach().clone() for p in ref.model.parameters()]
    (total / K).backward()
    with torch.no_grad():
        for p in ref.model.parameters():
            p -= 0.05 * p.grad
    for p, q in zip(ad.model.parameters(), ref.model.parameters()):
        # float32 sums in another order, fused vs plain step arithmetic: a few ulps of the update
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert max((p - q).abs().max().item() for p, q in zip(ad.model.parameters(), start)) > 1e-4  # it did move
