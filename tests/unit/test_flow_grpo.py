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
