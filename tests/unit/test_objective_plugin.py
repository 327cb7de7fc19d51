"""A new objective, advantage estimator and rollout sampler are each one file: all three are defined and
registered here, in this test only, and run through the unchanged trainer, update driver, config checks and
planner.

The objective is an advantage-weighted velocity penalty, L = scale * mean_b(A_b * mean(u_theta(z_t)^2)) over
the kept transitions: no log-probs, so a deterministic (eta 0) sampler is allowed. Independent references:
the parameters after one driver update equal plain SGD on the same loss written out over the whole batch
here (micro-batching and the accumulation denominator must not change the gradient), and the planner's pass
counts equal the ones the pass counter saw. The estimator (ranks within the group, centred) is checked
against its formula on plain floats."""

import copy

import pytest
import torch

from fastvideo_grpo.algorithms.advantages import ADVANTAGES, AdvantageEstimator
from fastvideo_grpo.algorithms.objectives import OBJECTIVES, Objective, TrainBatch, build_objective
from fastvideo_grpo.algorithms.samplers import ROLLOUTS, RolloutSampler, SDERollout
from fastvideo_grpo.algorithms.update import UpdateSettings, update
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.cli.plan import passes_per_iteration
from fastvideo_grpo.training.trainer import Trainer
from support.tiny_models import tiny_toy_adapter


@OBJECTIVES.register("test_weighted_velocity")
class WeightedVelocity(Objective):
    needs_log_probs = False
    stat_names = ("loss", "adv_mean")

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def loss(self, batch, rows, k):
        z = batch.traj.latents_BK[rows, k]
        u = batch.predict(z, batch.schedule.model_timestep(batch.traj.steps_BK[rows, k], z), batch.cond(rows))
        a = batch.advantages_B[rows].to(u.dtype)
        loss = self.scale * (a * u.pow(2).mean(dim=(1, 2, 3))).mean()
        return loss, (loss.detach(), a.mean())


@ADVANTAGES.register("test_centred_rank")
class CentredRank(AdvantageEstimator):
    def __call__(self, rewards_B, group_size):
        r = rewards_B.reshape(-1, group_size)
        ranks = r.argsort(dim=1).argsort(dim=1).float()
        return (ranks - (group_size - 1) / 2).reshape(-1)


@ROLLOUTS.register("test_second_of_two")
class SecondOfTwo(RolloutSampler):
    """Two SDE rollouts per call, keeping the second (the first only advances the noise stream): twice the
    forwards, which it declares for the planner."""

    calls = 0

    def forwards_per_sample(self, num_steps):
        return 2 * num_steps

    def __call__(self, *args, **kwargs):
        SecondOfTwo.calls += 1
        SDERollout()(*args, **kwargs)
        return SDERollout()(*args, **kwargs)


CFG = ["--sampling.num_steps=4", "--sampling.eta=0.0", "--grpo.shared_noise=false", "--grpo.tau=1.0",
       "--grpo.group_size=3", "--grpo.prompts_per_iteration=2", "--grpo.num_updates_per_iteration=1",
       "--grpo.micro_batch_size=2", "--grpo.objective=test_weighted_velocity", "--grpo.objective_kwargs={scale: 2.0}",
       "--grpo.advantage=test_centred_rank", "--rewards=[{name: toy_colour_fidelity}]", "--optim.lr=1e-2",
       "--optim.max_grad_norm=1e9", "--optim.weight_decay=0.0", "--train.seed=4"]


def test_a_registered_objective_and_estimator_train_through_the_unchanged_trainer():
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    cfg = load_config(None, CFG)
    ad = tiny_toy_adapter()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = Trainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=1))
    assert isinstance(trainer.objective, WeightedVelocity) and trainer.objective.scale == 2.0
    assert trainer.ref_adapter is None  # it declares no reference
    seen = {}
    import fastvideo_grpo.training.trainer as trainer_mod

    real = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["batch"], seen["params"] = batch, [p.detach().clone() for p in ad.model.parameters()]
        return real(objective, batch, *a, **k)

    trainer_mod.update = spy
    try:
        m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    batch = seen["batch"]
    # the estimator's advantages, by its formula on plain floats (rank within the group, centred)
    rewards = fns["toy_colour_fidelity"](batch.traj.decoded if batch.traj.decoded is not None else
                                         ad.decode(batch.traj.final_latents), batch.traj.prompts)[0].tolist()
    want = []
    for g in range(2):
        grp = rewards[3 * g:3 * g + 3]
        want += [sorted(grp).index(x) - 1.0 for x in grp]
    assert batch.advantages_B.tolist() == want
    assert m["train/num_updates"] == 1 and m["train/adv_mean"] == pytest.approx(0.0, abs=1e-7)
    # the planner projects what the pass counter saw (no extra forwards declared)
    planned = passes_per_iteration(cfg)
    assert (m["passes/forward_rollout"], m["passes/forward_update"], m["passes/backward"]) == (
        planned["forward_rollout"], planned["forward_update"], planned["backward"]) == (24, 18, 18)


def test_the_driver_update_is_sgd_on_the_objectives_loss_over_the_whole_batch():
    from fastvideo_grpo.algorithms import grpo
    from fastvideo_grpo.algorithms.rollout import rollout

    ad = tiny_toy_adapter(1)
    sched = ad.make_schedule(4, 0.0)
    prompts = ["two red circles", "one blue square"]
    keep = grpo.subsample_timesteps(4, 1.0, 4, torch.Generator().manual_seed(0), (0, 3))
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, torch.Generator().manual_seed(1),
                   decode=False)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    objective = WeightedVelocity(scale=3.0)
    ref = copy.deepcopy(ad)
    lr = 0.05
    # reference: the same loss over all 4 samples per kept step, averaged over the K = 3 steps, one SGD step
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=lr)
    ref_batch = TrainBatch(ref, sched, traj, adv)
    total = sum(objective.loss(ref_batch, torch.arange(4), k)[0] for k in range(3)) / 3
    total.backward()
    ref_opt.step()
    # the driver: micro-batches of 1 sample, one optimiser step
    stats = update(objective, TrainBatch(ad, sched, traj, adv), torch.optim.SGD(ad.model.parameters(), lr=lr),
                   UpdateSettings(num_updates=1, micro_batch_size=1, max_grad_norm=1e9))
    for p, q in zip(ad.model.parameters(), ref.model.parameters()):
        # float32 sums of 4 x 3 micro-step gradients in another order: a few ulps of the parameter
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert stats["train/num_updates"] == 1 and stats["train/adv_mean"] == pytest.approx(float(adv.mean()))


def test_options_and_declarations_are_checked_by_the_builder():
    with pytest.raises(ValueError, match=r"grpo.objective_kwargs: .*does not take \['scal'\]; accepted: \['scale'\]"):
        build_objective(load_config(None, CFG + ["--grpo.objective_kwargs={scal: 2.0}"]))
    with pytest.raises(ValueError, match="unknown objective.*test_weighted_velocity"):
        build_objective(load_config(None, CFG + ["--grpo.objective=test_weighted_velocty"]))
    # no log-probs declared: eta 0 is fine; but one shared noise with eta 0 gives identical samples
    with pytest.raises(ValueError, match="shared_noise"):
        build_objective(load_config(None, CFG + ["--grpo.shared_noise=true"]))
    with pytest.raises(ValueError, match="kl_coef"):  # it keeps no reference
        build_objective(load_config(None, CFG + ["--grpo.kl_coef=0.1"]))


def test_a_registered_rollout_sampler_is_used_and_planned():
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    cfg = load_config(None, ["--sampling.num_steps=3", "--sampling.eta=0.7", "--grpo.group_size=2",
                             "--grpo.prompts_per_iteration=2", "--sampling.rollout=test_second_of_two",
                             "--rewards=[{name: toy_colour_fidelity}]"])
    ad = tiny_toy_adapter()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = Trainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=1))
    m = trainer.train_iteration()
    assert SecondOfTwo.calls == 1 and m["passes/forward_rollout"] == 2 * 4 * 3
    assert passes_per_iteration(cfg)["forward_rollout"] == m["passes/forward_rollout"]
    with pytest.raises(ValueError, match="unknown rollout sampler.*sde"):
        Trainer(load_config(None, ["--sampling.rollout=forest"]), ad, fns, weights,
                PromptSource(prompts, ad.encode_prompts, seed=1))
