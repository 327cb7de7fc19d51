"""Memory options of the rollout, decode and rewards (issue 23): chunking and residency.

The sampler side of chunking is checked against the unchunked path bit for bit with an adapter whose
denoiser and decoder are elementwise per sample (so any difference can only come from the chunking
code: noise drawn per chunk, rows mixed up, a step run per chunk...). The real diffusers families
are checked in tests/integration/test_adapters.py, the toy model in test_toy_grpo.py. Residency is
checked with the ``meta`` device standing in for a GPU: what can be checked without one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.utils import residency
from fastvideo_grpo.config import load_config
from fastvideo_grpo.models.base import PolicyAdapter
from fastvideo_grpo.rewards.base import ConfiguredReward, compute_rewards, merge_infos, score_in_chunks
from fastvideo_grpo.algorithms.rollout import decode_latents, rollout, sample_ode
from fastvideo_grpo.sde import FlowSchedule
from fastvideo_grpo.rewards.build import build_reward_fns
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update


class Elementwise(PolicyAdapter):
    """Denoiser u = tanh(w * z + t / 1000 + c) and decoder (1 + tanh(v * z)) / 2, both per element: the
    exact result of a sample cannot depend on which other samples share its batch. (tanh, not sigmoid:
    on CPU torch.sigmoid / silu round a tensor's tail elements differently, so even they are not
    invariant to where a batch is cut.)"""

    def __init__(self):
        self.net = nn.Module()
        self.net.w = nn.Parameter(torch.tensor(0.7))
        self.vae = nn.Module()
        self.vae.v = nn.Parameter(torch.tensor(1.3), requires_grad=False)
        self.predict_sizes, self.decode_sizes = [], []

    def trainable_module(self):
        return self.net

    def make_schedule(self, num_steps, eta=0.0):
        return FlowSchedule.create(num_steps, eta=eta, shift=3.0)

    def initial_noise(self, num_samples, generator, device=None, cond=None):
        from fastvideo_grpo.utils import rng

        return rng.randn((num_samples, 2, 3, 3), generator, device=device or self.device)

    def predict(self, latents, timestep_B, cond):
        self.predict_sizes.append(latents.shape[0])
        c = cond["c"].reshape(-1, 1, 1, 1)
        return torch.tanh(self.net.w * latents + timestep_B.reshape(-1, 1, 1, 1) / 1000.0 + c)

    def decode(self, latents):
        self.decode_sizes.append(latents.shape[0])
        assert self.vae.v.device == latents.device, "decoder not on the latents' device"
        return (0.5 + 0.5 * torch.tanh(self.vae.v * latents[:, :1])).expand(-1, 3, -1, -1)

    def decoder_modules(self):
        return [self.vae]


def _rollout(ad, rb, db, P=3, G=2, T=4, seed=0):
    sched = ad.make_schedule(T, eta=0.5)
    g = torch.Generator().manual_seed(seed)
    keep = grpo.subsample_timesteps(T, 0.5, P * G, g)
    cond = {"c": torch.linspace(-1, 1, P)}
    return sched, rollout(ad, sched, [f"p{i}" for i in range(P)], cond, G, keep, g, rollout_batch_size=rb,
                          decode_batch_size=db)


FIELDS = ("latents_BK", "next_latents_BK", "log_probs_BK", "final_latents", "decoded")


@pytest.mark.numerics
@pytest.mark.parametrize("rb,db", [(1, 1), (2, 4), (4, 5), (5, 0), (7, 2)])
def test_chunked_rollout_is_bit_identical_to_the_whole_batch(rb, db):
    ad = Elementwise()
    _, ref = _rollout(ad, 0, 0)
    assert ad.predict_sizes == [6] * 4 and ad.decode_sizes == [6]
    ad.predict_sizes.clear(), ad.decode_sizes.clear()
    sched, got = _rollout(ad, rb, db)
    per_step = [min(rb, 6 - s) for s in range(0, 6, rb)] if rb < 6 else [6]
    assert ad.predict_sizes == per_step * 4  # the chunking really happened
    assert ad.decode_sizes == ([min(db, 6 - s) for s in range(0, 6, db)] if 0 < db < 6 else [6])
    for f in FIELDS:
        assert torch.equal(getattr(ref, f), getattr(got, f)), f
    # the PPO ratio before any update is exactly 1 on the chunked rollout, micro-batched or not
    for mb in (0, 2):
        ratios = []
        opt = torch.optim.SGD(ad.trainable_module().parameters(), lr=0.0)
        stats = grpo_update(ad, sched, got, torch.randn(6), opt, clip_range=1e-4, micro_batch_size=mb,
                            on_first_ratio=ratios.append)
        assert torch.equal(ratios[0], torch.ones_like(ratios[0])) and stats["train/first_ratio_dev"] == 0.0


def test_noise_of_a_sample_does_not_depend_on_the_chunking():
    """Groups share their initial noise whatever the chunk size, and every step's noise is the
    whole batch's draw (one draw per step, not one per chunk)."""
    from fastvideo_grpo.utils import rng

    draws = {}
    for rb in (0, 1, 4):
        seen = []
        orig = rng.randn

        def spy(shape, generator, device=None, dtype=torch.float32):
            out = orig(shape, generator, device=device, dtype=dtype)
            seen.append(out.clone())
            return out

        rng.randn = spy
        try:
            _, traj = _rollout(Elementwise(), rb, 0)
        finally:
            rng.randn = orig
        draws[rb] = seen
        assert traj.batch_size == 6
    assert len(draws[0]) == 1 + 4  # initial noise (one per group) + one whole-batch draw per step
    for rb in (1, 4):
        assert len(draws[rb]) == len(draws[0])
        assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[rb]))
    assert draws[0][0].shape[0] == 3  # per group, repeated G times


@pytest.mark.numerics
def test_sample_ode_and_decode_chunks_are_bit_identical():
    ad = Elementwise()
    sched = ad.make_schedule(5)
    z0 = ad.initial_noise(7, torch.Generator().manual_seed(1))
    cond = {"c": torch.linspace(-1, 1, 7)}
    ref = sample_ode(ad, sched, cond, z0)
    for b in (1, 2, 3, 6, 7, 9):
        assert torch.equal(sample_ode(ad, sched, cond, z0, rollout_batch_size=b), ref)
        assert torch.equal(decode_latents(ad, ref, b), decode_latents(ad, ref, 0))


@pytest.mark.numerics
def test_evaluate_policy_chunks_do_not_change_scores():
    from fastvideo_grpo.training.evaluate import evaluate_policy

    ad = Elementwise()
    encode = lambda ps: {"c": torch.tensor([float(len(p)) / 10 for p in ps])}  # noqa: E731
    fns = {"mean": lambda im, pr, **_: (im.flatten(1).mean(1), {})}
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    ref = evaluate_policy(ad, prompts, fns, 3, encode=encode, samples_per_prompt=2, batch_size=4)
    got = evaluate_policy(ad, prompts, fns, 3, encode=encode, samples_per_prompt=2, batch_size=4,
                          rollout_batch_size=3, decode_batch_size=1)
    assert got["per_sample"] == ref["per_sample"]
    assert 3 in ad.predict_sizes and 1 in ad.decode_sizes


# ----------------------------------------------------------------------------- residency


def _tensor_ids(m):
    return [id(t) for t in list(m.parameters()) + list(m.buffers())]


def test_on_device_moves_frozen_modules_in_and_puts_the_host_tensors_back():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).requires_grad_(False)
    m.tied = m[0]  # a module reachable twice: its tensors are swapped once
    host = _tensor_ids(m)
    values = {k: v.clone() for k, v in m.state_dict().items()}
    with residency.on_device([m], "meta"):
        assert all(t.device.type == "meta" for t in list(m.parameters()) + list(m.buffers()))
        assert m.tied.weight is m[0].weight and not m[0].weight.requires_grad
    assert _tensor_ids(m) == host  # the very same host tensors: nothing was copied back
    assert all(torch.equal(values[k], v) for k, v in m.state_dict().items())
    with residency.on_device([m], "cpu"):  # nothing to move: untouched
        assert _tensor_ids(m) == host
    residency.to_host([m])  # already on the host: untouched (the GPU -> host move needs a GPU to test)
    assert _tensor_ids(m) == host


def test_only_frozen_modules_can_be_offloaded():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        residency.to_host([m])
    with pytest.raises(ValueError, match="requires_grad"):
        with residency.on_device([m], "meta"):
            pass
    assert m.weight.device.type == "cpu"


def test_offloaded_vae_is_on_the_compute_device_only_during_the_decode():
    ad = Elementwise()
    ad.set_compute_device("meta")  # stands in for a GPU; the VAE lives on the host
    host = _tensor_ids(ad.vae)
    z = torch.zeros(4, 2, 3, 3, device="meta")
    out = decode_latents(ad, z, 2, offload=True)  # decode asserts the VAE is on the latents' device
    assert out.device.type == "meta" and ad.decode_sizes == [2, 2]
    assert _tensor_ids(ad.vae) == host and ad.vae.v.device.type == "cpu"


def test_trainer_offloads_the_vae_and_passes_the_chunk_sizes(monkeypatch):
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.training.trainer import GRPOTrainer

    offloaded = []
    real = residency.to_host
    monkeypatch.setattr(residency, "to_host", lambda mods, pin=False: (offloaded.append(list(mods)), real(mods, pin)))
    cfg = load_config(None, ["--sampling.num_steps=3", "--grpo.group_size=2", "--grpo.prompts_per_iteration=2",
                             "--sampling.offload_vae=true", "--sampling.rollout_batch_size=3",
                             "--sampling.decode_batch_size=1", "--rewards=[{name: toy_geneval}]"])
    ad = Elementwise()
    enc = lambda ps: {"c": torch.zeros(len(ps))}  # noqa: E731
    fns = {"mean": lambda im, pr, **_: (im.flatten(1).mean(1), {})}
    tr = GRPOTrainer(cfg, ad, fns, {"mean": 1.0}, PromptSource(["a", "b", "c"], enc))
    assert offloaded == [[ad.vae]]  # at start
    import fastvideo_grpo.training.trainer as trainer_mod

    seen = []
    real_update = trainer_mod.update
    monkeypatch.setattr(trainer_mod, "update", lambda objective, batch, *a, **k: (
        seen.append(batch.traj.decoded), real_update(objective, batch, *a, **k))[1])
    m = tr.train_iteration()
    assert seen == [None]  # the decoded pixels are freed before the update
    assert len(offloaded) == 2 and offloaded[1] == [ad.vae]  # and after the decode
    assert ad.predict_sizes[:3] == [3, 1, 3] and ad.decode_sizes == [1, 1, 1, 1]
    assert math.isfinite(m["train/loss"]) and m["time/decode"] >= 0


# ----------------------------------------------------------------------------- rewards


def _reward_with_model(device="cpu"):
    model = nn.Linear(3, 1).requires_grad_(False)
    calls = []

    def fn(images, prompts, **meta):
        calls.append((images.shape[0], model.weight.device.type, meta.get("ids")))
        s = images.flatten(2).mean(-1) @ torch.tensor([1.0, 2.0, 3.0])  # (B,)
        return s, {"per_sample": s.clone(), "names": list(prompts), "mean": float(s.mean()), "tag": "x"}

    fn.modules, fn.device = [model], torch.device(device)
    return fn, calls


@pytest.mark.numerics
def test_reward_chunks_give_the_whole_batch_scores_and_merged_infos():
    """Chunks of 2, 2, 1: the per-chunk scores and infos joined in order (bit for bit what the reward gives
    for those chunks: same shapes, same kernels), and the whole batch's scores up to the rounding of the
    sums. A (5, 3) @ (3,) product is not bitwise the concatenation of (2, 3) @ (3,) products: a BLAS
    kernel's blocking depends on the batch size (it differs on AVX-512 CPUs)."""
    fn, calls = _reward_with_model()
    imgs = torch.rand(5, 3, 4, 4)
    prompts = list("abcde")
    ref, ref_info = fn(imgs, prompts)
    per_chunk = [fn(imgs[i:i + 2], prompts[i:i + 2]) for i in range(0, 5, 2)]
    calls.clear()
    got, info = score_in_chunks(fn, imgs, prompts, 2, ids=torch.arange(5))
    assert [c[0] for c in calls] == [2, 2, 1]
    assert [c[2].tolist() for c in calls] == [[0, 1], [2, 3], [4]]  # per-sample metadata cut along
    assert torch.equal(got, torch.cat([s for s, _ in per_chunk]))
    assert torch.equal(info["per_sample"], torch.cat([i["per_sample"] for _, i in per_chunk]))
    # Against the whole batch: s_b = sum_k w_k * mean_j x_bkj, positive terms, a chain of 16 + 3 = 19
    # additions; two summation orders differ by at most 19 * eps * s_b (k * eps * the size of the terms).
    tol = 19 * torch.finfo(torch.float32).eps * ref.abs()
    assert ((got - ref).abs() <= tol).all(), (got - ref).abs().max()
    assert ((info["per_sample"] - ref_info["per_sample"]).abs() <= tol).all() and info["names"] == prompts
    # the batch mean adds a 5-term average (weighted by chunk size) to the chain: (19 + 5) * eps * max s_b
    mean_tol = 24 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    assert info["mean"] == pytest.approx(ref_info["mean"], abs=mean_tol) and info["tag"] == ["x", "x", "x"]
    assert merge_infos([{"a": 1}], [3]) == {"a": 1}


def test_configured_reward_offloads_its_models_between_calls():
    fn, calls = _reward_with_model(device="meta")  # computes on "meta" (a GPU stand-in), model on the host
    host = _tensor_ids(fn.modules[0])
    wrapped = ConfiguredReward(fn, batch_size=3, offload=True)
    scores, _ = wrapped(torch.rand(4, 3, 2, 2), list("abcd"))
    assert [c[:2] for c in calls] == [(3, "meta"), (1, "meta")]  # on the device while scoring
    assert _tensor_ids(fn.modules[0]) == host and scores.shape == (4,)
    kept = ConfiguredReward(fn, batch_size=0, offload=False)  # without offload: nothing moves
    kept(torch.rand(2, 3, 2, 2), list("ab"))
    assert calls[-1][:2] == (2, "cpu")


def test_reward_config_batch_size_and_offload_reach_the_reward():
    cfg = load_config(None, ["--rewards=[{name: toy_geneval, batch_size: 3}, {name: toy_colour_fidelity}]",
                             "--sampling.offload_rewards=true"])
    assert [rc.offload for rc in cfg.rewards] == [True, True]
    fns, _ = build_reward_fns(cfg.rewards)
    assert isinstance(fns["toy_geneval"], ConfiguredReward) and fns["toy_geneval"].batch_size == 3
    imgs = torch.rand(5, 3, 32, 32)
    prompts = ["two red circles"] * 5
    plain, _ = build_reward_fns(load_config(None, ["--rewards=[{name: toy_geneval}]"]).rewards)
    assert not isinstance(plain["toy_geneval"], ConfiguredReward)
    a, _ = compute_rewards(fns, imgs, prompts)
    b, _ = compute_rewards(plain, imgs, prompts)
    assert torch.equal(a["toy_geneval"], b["toy_geneval"])
    cfg = load_config(None, ["--rewards=[{name: toy_geneval, offload: false}]", "--sampling.offload_rewards=true"])
    assert cfg.rewards[0].offload is False


@pytest.mark.parametrize("override,match", [
    ("--sampling.rollout_batch_size=-1", "rollout_batch_size"),
    ("--sampling.decode_batch_size=-2", "decode_batch_size"),
    ("--rewards=[{name: toy_geneval, batch_size: -1}]", r"rewards\[0\].batch_size"),
])
def test_negative_chunk_sizes_are_value_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])
