"""Seeded random draws land on the tensors' device whatever device the generator is on.

The trainer's generators live on the CPU. CUDA refuses a CPU generator in a draw on a CUDA device
("Expected a 'cuda' device type for generator"); other devices (``meta`` here) do not check. The
``strict_draws`` fixture makes every torch draw check it the way CUDA does, so that a rollout and an
evaluation on a non-CPU device -- ``meta`` on a CPU-only machine -- fail exactly where a GPU run would.
The last test runs the real loop on CUDA when a GPU is present.
"""

import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.utils import rng
from fastvideo_grpo.config import load_config
from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
from fastvideo_grpo.algorithms.rollout import rollout, sample_ode
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.rewards.build import build_reward_fns
from fastvideo_grpo.training.trainer import GRPOTrainer

TINY = dict(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)
PROMPTS = ["two red circles", "one blue square"]


class GeneratorDeviceMismatch(RuntimeError):
    pass


@pytest.fixture
def strict_draws(monkeypatch):
    """torch.randn / rand / randint / randperm / normal raise, as CUDA does, when a generator draws
    onto another device than its own. Returns the list of (function, generator device, target)."""
    seen = []

    def wrap(name):
        original = getattr(torch, name)

        def checked(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                target = torch.device(device) if device is not None else torch.device("cpu")
                seen.append((name, generator.device, target))
                if target.type != generator.device.type:
                    raise GeneratorDeviceMismatch(
                        f"torch.{name}: generator on {generator.device} drawing on {target}")
            return original(*args, generator=generator, device=device, **kwargs)

        monkeypatch.setattr(torch, name, checked)

    for name in ("randn", "rand", "randint", "randperm", "normal"):
        wrap(name)
    return seen


def _adapter(device="cpu"):
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(**TINY))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return ToyAdapter(m.to(device))


def test_compute_device_overrides_the_parameters_device():
    """With CPU offload the parameters live on the CPU while FSDP2 computes on the GPU; the rollout
    allocates on ``adapter.device``, which parallelize then sets to the compute device."""
    ad = _adapter("cpu")
    assert ad.device == torch.device("cpu")
    ad.set_compute_device("meta")
    assert ad.device == torch.device("meta") and next(ad.model.parameters()).device.type == "cpu"


def test_strict_fixture_catches_a_cross_device_draw(strict_draws):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(GeneratorDeviceMismatch):
        torch.randn(3, generator=g, device="meta")
    assert rng.randn((3,), g, device="meta").device.type == "meta"


def test_rng_randn_is_a_plain_draw_on_cpu():
    """Same numbers as torch.randn with the same generator state: CPU results do not change."""
    a = rng.randn((2, 3, 5), torch.Generator().manual_seed(7), device="cpu")
    b = torch.randn((2, 3, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = rng.randn((4,), torch.Generator().manual_seed(7), device="meta", dtype=torch.float64)
    assert c.device.type == "meta" and c.dtype == torch.float64


def test_rollout_and_ode_sampling_on_another_device_than_the_generator(strict_draws):
    """With a CPU generator and model + latents on ``meta``, every draw must happen on the CPU and
    be moved: the same call path as a GPU rollout (rollout -> schedule.step -> fused op / sde step)."""
    ad = _adapter("meta")
    sched = ad.make_schedule(4, 0.5)
    cond = {k: v.to("meta") for k, v in ad.encode_prompts(PROMPTS).items()}
    g = torch.Generator().manual_seed(0)
    keep = grpo.subsample_timesteps(4, 0.5, 4, g)
    traj = rollout(ad, sched, PROMPTS, cond, 2, keep, g)
    assert traj.latents_BK.device.type == "meta" and traj.decoded.device.type == "meta"
    z = sample_ode(ad, sched, cond, ad.initial_noise(2, g))
    assert z.device.type == "meta"
    assert all(gen_dev.type == "cpu" and target.type == "cpu" for _, gen_dev, target in strict_draws)
    assert len(strict_draws) >= 1 + 4  # initial noise + one draw per stochastic step


def _trainer(device):
    cfg = load_config(None, [
        "--model.name=toy", "--sampling.num_steps=4", "--sampling.eta=0.5", "--grpo.group_size=2",
        "--grpo.prompts_per_iteration=2", "--grpo.tau=0.5", "--grpo.clip_range=1e-3", "--optim.lr=1e-3",
        "--rewards=[{name: toy_geneval}]", "--train.autocast=bf16",
    ])
    ad = _adapter(device)
    fns, weights = build_reward_fns(cfg.rewards)
    source = PromptSource(PROMPTS * 3, ad.encode_prompts, seed=0)
    return GRPOTrainer(cfg, ad, fns, weights, source)


def test_training_iteration_and_evaluation_draw_only_on_the_generators_device(strict_draws):
    from fastvideo_grpo.training.evaluate import evaluate_policy

    trainer = _trainer("cpu")
    m = trainer.train_iteration()
    assert m["iteration"] == 1 and torch.isfinite(torch.tensor(m["train/loss"]))
    ev = evaluate_policy(trainer.adapter, PROMPTS, trainer.reward_fns, 4, samples_per_prompt=2)
    assert ev["num_samples"] == 4
    assert strict_draws and all(gd.type == t.type for _, gd, t in strict_draws)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_iteration_with_bf16_autocast_keeps_ratio_one_and_matches_cpu_noise(strict_draws):
    """The real loop on a GPU: rollout, reward, PPO update and evaluation; first ratio exactly 1."""
    from fastvideo_grpo.training import trainer as trainer_mod
    from fastvideo_grpo.training.evaluate import evaluate_policy

    trainer = _trainer("cuda")
    ratios = []
    trainer.objective.on_first_ratio = lambda r: ratios.append(r.detach().cpu())
    m = trainer.train_iteration()
    assert torch.isfinite(torch.tensor(m["train/loss"]))
    assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    ev = evaluate_policy(trainer.adapter, PROMPTS, trainer.reward_fns, 4)
    assert ev["num_samples"] == 2
    # the initial noise of a seed is the same on CPU and GPU (drawn on the CPU generator)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(trainer.adapter.initial_noise(2, g1, device="cuda").cpu(),
                       trainer.adapter.initial_noise(2, g2, device="cpu"))


def test_schedule_tables_are_copied_to_a_device_once_and_again_after_an_edit():
    from fastvideo_grpo.sde import FlowSchedule

    sched = FlowSchedule.create(4, eta=0.5, shift=3.0)
    like = torch.empty(2, 3, device="meta")
    for i in range(4):
        sched.model_timestep(i, like)
        sched.step(i, torch.empty(2, 3, device="meta"), like)
    assert len(sched._tables._copies) == 2  # sigmas and eta, each copied once for all 4 steps
    sched.eta[0] = 0.1  # an in-place edit bumps the version: a fresh copy
    sched.step(0, torch.empty(2, 3, device="meta"), like)
    assert len(sched._tables._copies) == 3
    cpu = torch.zeros(2, 3)
    assert sched._tables.get(sched.sigmas, cpu.device) is sched.sigmas  # same device: no copy
