"""Flow-GRPO's options on the one core: its noise level as a per-step eta (same step as Flow-GRPO's
formula), and Flow-GRPO-Fast's SDE at one or two random steps per iteration through the trainer."""

import pytest
import torch

from fastvideo_grpo import sde
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.training.trainer import GRPOTrainer, build_schedule
from support.tiny_models import tiny_toy_adapter


def _flow_grpo_step_reference(z, v, t, t_next, t_second, a):
    """Flow-GRPO's SDE step as its paper writes it (t from 1 to 0, dt < 0), independently of sde.py:
    x + [v + s^2 / (2t) (x + (1 - t) v)] dt + s sqrt(-dt) eps,  s = a sqrt(t / (1 - t)) (t = 1: 1 - t_second)."""
    dt = t_next - t
    s = a * ((t / (1.0 - (t_second if t == 1.0 else t))) ** 0.5)
    mean = z + (v + s * s / (2.0 * t) * (z + (1.0 - t) * v)) * dt
    return mean, s * (-dt) ** 0.5


@pytest.mark.parametrize("fused", [True, False])
def test_flow_grpo_noise_level_is_a_per_step_eta_of_our_sde(fused, monkeypatch):
    monkeypatch.setattr(sde, "FUSED_STEPS", fused)
    a = 0.7
    sigmas = sde.flow_sigmas(8, shift=3.0)
    sched = sde.FlowSchedule(sigmas, sde.flow_grpo_eta(sigmas, a))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    for i in range(7):  # every step but the last (sigma_next = 0 is deterministic in both)
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        _, lp, mean, std = sched.step(i, v, z, prev_sample=x)
        want_mean, want_std = _flow_grpo_step_reference(z, v, t, t_next, float(sigmas[1]), a)
        torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(std, torch.full((3,), want_std, dtype=torch.float64), rtol=1e-10, atol=0)
        want_lp = torch.distributions.Normal(want_mean, want_std).log_prob(x).mean(dim=(1, 2, 3))
        torch.testing.assert_close(lp, want_lp, rtol=1e-10, atol=1e-10)


_toy = tiny_toy_adapter


def test_config_eta_form_builds_flow_grpo_schedule_and_refuses_ddim():
    cfg = load_config(None, ["--sampling.num_steps=6", "--sampling.eta=0.7", "--sampling.eta_form=flow_grpo"])
    sched = build_schedule(cfg, _toy())
    s = sched.sigmas[:-1]
    want = 0.7 * torch.sqrt(s / (1 - torch.where(s == 1, sched.sigmas[1], s)))
    torch.testing.assert_close(sched.eta[:-1], want[:-1])
    assert float(sched.eta[-1]) == 0.0  # the deterministic last step, as for every flow schedule

    class DDIMAdapter:
        def make_schedule(self, n, eta):
            return sde.DDIMSchedule.create(n, eta)

    with pytest.raises(ValueError, match="flow_grpo needs a flow-matching model"):
        build_schedule(load_config(None, ["--sampling.eta_form=flow_grpo"]), DDIMAdapter())
    with pytest.raises(ValueError, match="eta_form"):
        load_config(None, ["--sampling.eta_form=flow_gropo"])  # a typo is refused by the config


def test_flow_grpo_fast_sde_and_training_at_random_steps_shared_by_the_batch():
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    cfg = load_config(None, [
        "--sampling.num_steps=6", "--sampling.eta=0.7", "--sampling.eta_form=flow_grpo", "--grpo.group_size=2",
        "--grpo.prompts_per_iteration=2", "--grpo.tau=1.0", "--grpo.num_updates_per_iteration=1",
        "--grpo.sde_window={mode: random, size: 2}", "--rewards=[{name: toy_colour_fidelity}]", "--train.seed=3"])
    ad = _toy()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=3))
    starts = set()
    for k in range(30):
        trainer.iteration = k
        sched, (a, b) = trainer.iteration_schedule()
        assert trainer.iteration_schedule()[1] == (a, b)  # a function of (seed, iteration): same on every rank
        assert b - a == 2 and 0 <= a and b <= 5  # inside the trainable steps (the last step is never trained)
        assert (sched.eta[a:b] > 0).all() and (sched.eta[:a] == 0).all() and (sched.eta[b:] == 0).all()
        starts.add(a)
    assert starts == {0, 1, 2, 3}
    trainer.iteration = 0
    # one iteration: the trained steps are the window's two steps for every sample
    seen = []
    import fastvideo_grpo.training.trainer as tr
    orig = tr.update
    tr.update = lambda obj, batch, *a_, **k: seen.append((batch.schedule, batch.traj)) or orig(obj, batch, *a_, **k)
    try:
        m = trainer.train_iteration()
    finally:
        tr.update = orig
    sch, traj = seen[0]
    a, b = m["sde_window/start"], m["sde_window/end"]
    assert torch.equal(traj.steps_BK.sort(dim=1).values, torch.arange(a, b).expand(4, 2))
    assert (traj.log_probs_BK != 0).all() and int((sch.eta > 0).sum()) == 2


# ----------------------------------------------------------------------------- the released trainer's options


def test_group_global_std_is_the_released_per_prompt_stat_tracker():
    """grpo.advantage: group_global_std against stat_tracking.py PerPromptStatTracker(global_std=True), written
    out in numpy: each prompt's mean, the population std of every reward of the batch + 1e-4. Groups of different
    spread keep their scale (a group-std estimator makes both unit-variance)."""
    import numpy as np

    from fastvideo_grpo.algorithms.advantages import ADVANTAGES

    g = torch.Generator().manual_seed(0)
    r = torch.cat([torch.randn(4, generator=g) * 0.1, torch.randn(4, generator=g) * 2.0, torch.full((4,), 0.1)])
    est = ADVANTAGES.build("group_global_std", std="population", eps=None)
    assert est.needs_global_batch and est.eps == 1e-4
    got = est(r, 4)
    x = r.double().numpy()
    want = np.concatenate([(x[i:i + 4] - x[i:i + 4].mean()) / (np.std(x) + 1e-4) for i in (0, 4, 8)])
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-7)
    assert torch.equal(got[8:], torch.zeros(4))  # a flat group is exactly 0 (dropped by drop_zero_advantage)
    spread = [float(got[i:i + 4].std()) for i in (0, 4)]
    assert spread[1] > 10 * spread[0]
    grouped = ADVANTAGES.build("group", std="population", eps=None)(r, 4)
    assert abs(float(grouped[:4].std()) - float(grouped[4:8].std())) < 1e-5
    # the epsilon and the estimator are the config's
    cfg = load_config(None, ["--grpo.advantage=group_global_std", "--grpo.advantage_eps=0.5"])
    from fastvideo_grpo.algorithms.advantages import build_estimator

    assert build_estimator(cfg).eps == 0.5


def test_flow_grpo_kl_form_is_the_exact_kl_times_dt():
    """Released train_sd3.py 895: ((mean - mean_ref)^2).mean / (2 std_dev_t^2), std_dev_t = a sqrt(t / (1 - t)) the
    noise level (sd3_sde_with_logprob.py 47), against the exact Gaussian KL of the step (std std_dev_t sqrt(-dt))
    from torch.distributions: the released value is the exact one times |dt|."""
    from fastvideo_grpo.algorithms import grpo

    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    noise_level = torch.tensor([0.3, 0.7, 1.4])
    dt = torch.tensor([0.2, 0.05, 0.01])
    released = ((m1 - m2) ** 2).mean(dim=(1, 2, 3)) / (2 * noise_level ** 2)
    torch.testing.assert_close(grpo.flow_grpo_kl(m1, m2, noise_level), released)
    std = (noise_level * dt.sqrt()).view(-1, 1, 1, 1)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std), torch.distributions.Normal(m2, std))
    torch.testing.assert_close(grpo.flow_grpo_kl(m1, m2, noise_level), exact.mean(dim=(1, 2, 3)) * dt)


def test_update_split_by_samples_gives_each_step_every_kept_step_of_some_samples():
    from fastvideo_grpo.algorithms.update import UpdateSettings, optimizer_steps

    rows, plan = optimizer_steps(12, 3, UpdateSettings(num_updates=2, micro_batch_size=3, split="samples"))
    assert [list(steps) for steps, _ in plan] == [[0, 1, 2], [0, 1, 2]]
    assert [[r.tolist() for r in chunk] for _, chunk in plan] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    _, plan = optimizer_steps(12, 3, UpdateSettings(num_updates=2, micro_batch_size=3, split="steps"))
    assert [list(steps) for steps, _ in plan] == [[0, 1], [2]] and all(len(c) == 4 for _, c in plan)


def test_zero_advantage_samples_leave_the_update_padded_to_the_micro_batches():
    """grpo.drop_zero_advantage (released train_sd3.py 796-834): the samples with advantage 0 are dropped, their
    count padded with dropped ones to a multiple of the micro-batches, whose size shrinks: the update sees them
    only. Rewards here are constant for two of the three groups."""
    from fastvideo_grpo.training import trainer as trainer_mod

    cfg = load_config(None, ["--sampling.num_steps=3", "--sampling.eta=0.7", "--grpo.group_size=4",
                             "--grpo.prompts_per_iteration=3", "--grpo.micro_batch_size=4", "--grpo.tau=1.0",
                             "--grpo.drop_zero_advantage=true", "--grpo.num_updates_per_iteration=1"])
    ad = tiny_toy_adapter()
    prompts = ["one red square", "two blue circles", "a green triangle"]

    def reward(images, ps, **_):
        varied = torch.tensor([p == "one red square" for p in ps])
        return torch.where(varied, images.mean(dim=(1, 2, 3)), torch.full((len(ps),), 0.3)), {}

    trainer = GRPOTrainer(cfg, ad, {"r": reward}, {"r": 1.0}, PromptSource(prompts, ad.encode_prompts, seed=0))
    seen = {}
    real = trainer_mod.update

    def spy(objective, batch, optimizer, settings, *a, **k):
        seen.update(batch=batch, settings=settings)
        return real(objective, batch, optimizer, settings, *a, **k)

    trainer_mod.update = spy
    try:
        m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    batch = seen["batch"]
    # 4 nonzero, 3 micro-batches of the 12: padded to 6 with 2 zero-advantage samples, micro-batches of 2
    assert m["train/kept_samples"] == 6 and seen["settings"].micro_batch_size == 2
    assert batch.traj.prompts.count("one red square") == 4 and (batch.advantages_B == 0).sum() == 2
    assert m["passes/backward"] == 6 * 2  # 6 samples x the 2 trained steps
    # every advantage 0: one sample per micro-batch is kept, so every data-parallel rank runs the same micro-steps
    trainer.reward_fns = {"r": lambda images, ps, **_: (torch.full((len(ps),), 0.3), {})}
    trainer_mod.update = spy
    try:
        with pytest.warns(UserWarning, match="identical rewards"):
            m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    assert m["train/kept_samples"] == 3 and seen["settings"].micro_batch_size == 1 and m["train/num_updates"] == 1
