"""The trainer on the toy model: ratio == 1 before the first update at batch > 1, a short demo end to end."""

import json
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.config import load_config
from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
from fastvideo_grpo.algorithms.rollout import rollout, sample_ode
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update

TINY = dict(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)


def _adapter(seed=0):
    torch.manual_seed(seed)
    m = TinyDiT(TinyDiTConfig(**TINY))
    # zero-initialised output layers would make the velocity 0; give them weights
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return ToyAdapter(m)


@pytest.mark.numerics
@pytest.mark.parametrize("prompts_n,group", [(1, 4), (3, 2)])
def test_rollout_then_update_ratio_is_exactly_one(prompts_n, group):
    ad = _adapter()
    sched = ad.make_schedule(5, 0.3)
    prompts = ["two red circles", "one blue square", "a red square left of a green circle"][:prompts_n]
    B = prompts_n * group
    g = torch.Generator().manual_seed(0)
    keep = grpo.subsample_timesteps(5, 0.6, B, g)
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), group, keep, g)
    assert traj.latents_BK.shape == (B, 3, 3, 16, 16)
    before = [p.detach().clone() for p in ad.model.parameters()]
    ratios = []
    opt = torch.optim.AdamW(ad.model.parameters(), lr=1e-3)
    adv = torch.randn(B)
    stats = grpo_update(ad, sched, traj, adv, opt, clip_range=1e-3, num_updates=2,
                        on_first_ratio=ratios.append)
    # exact by construction: rollout and re-scoring both run the whole batch of B rows (same shapes, same
    # kernels, same thread count, one process) and the model mixes no rows, so every row's output is the same
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])) and stats["train/first_ratio_dev"] == 0.0
    assert stats["train/num_updates"] == 2 and torch.isfinite(torch.tensor(stats["train/loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, ad.model.parameters()))


@pytest.mark.numerics
def test_shared_noise_within_groups_and_different_across_groups():
    ad = _adapter()
    sched = ad.make_schedule(3, 0.0)  # eta 0: identical noise -> identical samples inside a group
    prompts = ["one red square", "one red square"]
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(4, 1, dtype=torch.int64)
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, g)
    z0 = traj.latents_BK[:, 0]
    assert torch.equal(z0[0], z0[1]) and torch.equal(z0[2], z0[3]) and not torch.equal(z0[0], z0[2])
    traj2 = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, g, shared_noise=False)
    assert not torch.equal(traj2.latents_BK[0, 0], traj2.latents_BK[1, 0])
    # eta = 0 rollout equals the ODE sampler
    z = sample_ode(ad, sched, ad.encode_prompts(prompts[:1]), z0[:1])
    torch.testing.assert_close(traj.final_latents[0:1], z)


@pytest.mark.numerics
def test_micro_batching_gives_the_same_update_as_one_batch():
    prompts = ["two red circles", "one blue square"]
    results = []
    for mb in (0, 2):
        ad = _adapter(3)
        sched = ad.make_schedule(4, 0.3)
        g = torch.Generator().manual_seed(5)
        keep = grpo.subsample_timesteps(4, 0.5, 4, g)
        traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, g)
        opt = torch.optim.SGD(ad.model.parameters(), lr=0.1)
        grpo_update(ad, sched, traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), opt, clip_range=0.2,
                    micro_batch_size=mb)
        results.append(torch.cat([p.detach().flatten() for p in ad.model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("rb", [1, 3])
def test_chunked_rollout_same_noise_close_samples_and_ratio_one(rb):
    """sampling.rollout_batch_size on the toy model: the same noise per sample as the whole batch (one
    draw per step, sliced), samples equal up to the CPU GEMM's batch-size-dependent rounding, and the
    PPO ratio exactly 1 when the training micro-batch equals the rollout chunk."""
    from fastvideo_grpo.utils import rng

    prompts = ["two red circles", "one blue square", "a red square left of a green circle"]
    results = []
    for chunk in (0, rb):
        ad = _adapter(4)
        sched = ad.make_schedule(4, 0.3)
        g = torch.Generator().manual_seed(2)
        keep = grpo.subsample_timesteps(4, 0.5, 6, g)
        draws, orig = [], rng.randn
        rng.randn = lambda *a, **k: draws.append(orig(*a, **k)) or draws[-1]
        try:
            traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, g, rollout_batch_size=chunk,
                           decode_batch_size=chunk)
        finally:
            rng.randn = orig
        results.append((ad, sched, traj, draws))
    (_, _, ref, ref_draws), (ad, sched, got, got_draws) = results
    assert len(ref_draws) == len(got_draws) == 5 and all(torch.equal(a, b) for a, b in zip(ref_draws, got_draws))
    for f in ("latents_BK", "next_latents_BK", "final_latents", "decoded"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-5)
    ratios = []
    opt = torch.optim.SGD(ad.model.parameters(), lr=0.0)
    grpo_update(ad, sched, got, torch.randn(6), opt, clip_range=1e-4, micro_batch_size=rb if 6 % rb == 0 else 0,
                on_first_ratio=ratios.append)
    if 6 % rb == 0:
        assert torch.equal(ratios[0], torch.ones_like(ratios[0]))
    else:  # re-scored at another batch size than sampled: equal up to rounding only
        torch.testing.assert_close(ratios[0], torch.ones_like(ratios[0]), rtol=0, atol=1e-5)


def test_short_demo_runs_end_to_end(tmp_path):
    from fastvideo_grpo.cli.demo import run_demo

    cfg = load_config("configs/toy_cpu.yaml", [
        f"--train.output_dir={tmp_path / 'demo'}", "--train.num_iterations=2", "--train.eval_every=0",
        "--train.num_eval_prompts=4", "--grpo.prompts_per_iteration=2", "--grpo.group_size=4",
        "--sampling.num_steps=3", "--sampling.eval_num_steps=3",
        "--sampling.eta_schedule=[1.0, 1.0, 0.0]", "--grpo.timestep_window=[0, 2]",  # the demo's layout, shortened
        # a continuous reward too: the barely-pretrained model's geneval ties within groups (zero advantage)
        "--rewards=[{name: toy_geneval}, {name: toy_geneval, threshold: 0.99}, {name: toy_colour_fidelity, weight: 0.5}]",
        "--extra.pretrain.steps=3", "--extra.pretrain.num_images=64", "--extra.pretrain.batch_size=8",
        "--extra.pretrain.model={hidden: 32, depth: 1, heads: 2}",
        "--extra.pretrain.autoencoder={image_size: 16, hidden: 16, steps: 3}",
    ])
    summary = run_demo(cfg, progress=False, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "demo"
    for f in ("summary.json", "reward_curve.png", "samples_before_after.png", "metrics.jsonl", "config.yaml", "policy.pt"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert set(s["per_reward_after"]) == {"toy_geneval", "toy_colour_fidelity"}  # continuous forms only
    assert "toy_geneval/all_correct" in s["extras_after"]
    # the headline numbers: GenEval's success rate and the background's brightness, before and after
    assert s["success_rate_before"] == s["extras_before"]["toy_geneval/all_correct"]
    assert s["success_rate_after"] == s["extras_after"]["toy_geneval/all_correct"]
    assert s["background_after"] == s["extras_after"]["toy_geneval/background"] >= 0.0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert all("reward/toy_geneval_bin/mean" in r for r in train_rows)  # the binary form is aggregated too
    assert len(train_rows) == 2
    # the loss path ran: gradients flowed and were clipped/applied
    assert all(r["train/grad_norm"] > 0 for r in train_rows)
    assert summary["reward_before"] == s["reward_before"]
    # the export CLI rebuilds the demo's model from the run folder: its last checkpoint exports to the run's export
    from safetensors.torch import load_file

    from fastvideo_grpo.cli import export as export_cli

    res = export_cli.main(["--run", str(out), f"--extra.pretrain_cache={tmp_path / 'cache'}"])
    a, b = load_file(str(Path(res["out"]) / "model.safetensors")), load_file(str(out / "export" / "model.safetensors"))
    assert res["step"] == 2 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(res["out"]) / "README.md").is_file()
    # a second run reuses the cached pretrained model
    s2 = run_demo(cfg, progress=False, cache_dir=str(tmp_path / "cache"))
    assert s2["pretrain_time_s"] == 0.0


def test_grpo_increases_a_simple_reward():
    """The whole loop learns: GRPO raises mean brightness of a tiny model's samples within 40 iterations.

    (A reward with an obvious direction; the toy GenEval reward moves much more slowly, see README.)
    """
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.training.trainer import GRPOTrainer

    cfg = load_config("configs/toy_cpu.yaml", [
        "--grpo.prompts_per_iteration=2", "--grpo.group_size=8", "--sampling.num_steps=4",
        "--optim.lr=3e-3", "--grpo.clip_range=0.05", "--train.seed=1",
        # noise at every step, the paper's sampler (the demo's own schedule needs 10 steps)
        "--sampling.eta_schedule=null", "--sampling.eta=0.7", "--grpo.timestep_window=null", "--grpo.tau=0.6",
    ])
    ad = _adapter(7)

    def brightness(images, prompts, **_):
        return images.mean(dim=(1, 2, 3)), {}

    source = PromptSource(["one red square", "two blue circles", "a green circle left of a red square"],
                          ad.encode_prompts, seed=0)
    trainer = GRPOTrainer(cfg, ad, {"bright": brightness}, {"bright": 1.0}, source)
    curve = [trainer.train_iteration()["reward/bright/mean"] for _ in range(40)]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.04, (first, last, curve)


def test_non_finite_loss_stops_before_the_optimiser_step():
    ad = _adapter(2)
    sched = ad.make_schedule(3, 0.3)
    prompts = ["one red square"]
    g = torch.Generator().manual_seed(0)
    keep = grpo.subsample_timesteps(3, 1.0, 2, g)
    traj = rollout(ad, sched, prompts, ad.encode_prompts(prompts), 2, keep, g)
    before = [p.detach().clone() for p in ad.model.parameters()]
    opt = torch.optim.AdamW(ad.model.parameters(), lr=1e-2)
    with pytest.raises(FloatingPointError, match="non-finite GRPO loss"):
        grpo_update(ad, sched, traj, torch.tensor([float("nan"), 1.0]), opt, clip_range=0.1, adv_clip_max=None)
    assert all(torch.equal(a, b) for a, b in zip(before, ad.model.parameters()))


@pytest.mark.numerics
@pytest.mark.parametrize("kl_form", ["exact", "flow_grpo"])
def test_kl_coef_builds_a_frozen_reference_and_penalises_drift(kl_form):
    """grpo.kl_coef > 0 alone (no ref passed) gives a KL term: 0 while the policy equals the reference,
    then the closed-form KL of the moved policy's step means against the frozen start: the Gaussian KL of the
    step (exact), or Flow-GRPO's released form, divided by 2 eta^2 instead of 2 eta^2 |dt| (train_sd3.py 895).
    The reference is a copy of the trainable weights, swapped in by the same model."""
    from fastvideo_grpo.algorithms.policy_versions import WeightCopy
    from fastvideo_grpo.sde import FlowSchedule
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.training.trainer import GRPOTrainer

    cfg = load_config("configs/toy_cpu.yaml", [
        "--grpo.prompts_per_iteration=2", "--grpo.group_size=4", "--sampling.num_steps=3",
        "--sampling.eta_schedule=null", "--sampling.eta=0.7", "--grpo.timestep_window=null", "--grpo.tau=1.0",
        "--grpo.num_updates_per_iteration=1", "--optim.lr=1e-2", "--grpo.kl_coef=0.5", f"--grpo.kl_form={kl_form}",
    ])
    ad = _adapter(3)
    start = [p.detach().clone() for p in ad.model.parameters()]
    start_adapter = _adapter(3)  # the same initial weights, kept aside

    def brightness(images, prompts, **_):
        return images.mean(dim=(1, 2, 3)), {}

    source = PromptSource(["one red square", "two blue circles"], ad.encode_prompts, seed=0)
    trainer = GRPOTrainer(cfg, ad, {"bright": brightness}, {"bright": 1.0}, source)
    ref = trainer.reference
    assert isinstance(ref, WeightCopy) and ref.module is ad.model and trainer.ref_adapter is None
    assert not any(t.requires_grad for t in ref.copy.values())
    first = trainer.train_iteration()
    # one update per iteration: measured before the policy moved, when policy and reference hold the same
    # weights and run the same shapes through the same kernels: their step means are equal, the KL exactly 0
    assert first["train/kl"] == 0.0
    # the second iteration's KL, recomputed independently: the unfused SDE step's means of the policy as it
    # was before that iteration's update and of the start, on the transitions that iteration trained on
    import copy

    from fastvideo_grpo.training import trainer as trainer_mod
    from fastvideo_grpo.sde import flow_sde_step

    policy_before = copy.deepcopy(ad)
    seen = {}
    original = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["traj"], seen["schedule"] = batch.traj, batch.schedule
        return original(objective, batch, *a, **k)

    trainer_mod.update = spy
    try:
        second = trainer.train_iteration()
    finally:
        trainer_mod.update = original
    traj, sch = seen["traj"], seen["schedule"]
    kls = []
    with torch.no_grad():
        for k in range(traj.steps_BK.shape[1]):
            idx = traj.steps_BK[:, k]
            z, z_next = traj.latents_BK[:, k], traj.next_latents_BK[:, k]
            t = sch.sigmas[idx].float() * 1000.0
            s, s_next, e = sch.sigmas[idx], sch.sigmas[idx + 1], sch.eta[idx]
            m_pol = flow_sde_step(policy_before.predict(z, t, traj.cond), z, s, s_next, e, prev_sample=z_next)[2]
            m_ref = flow_sde_step(start_adapter.predict(z, t, traj.cond), z, s, s_next, e, prev_sample=z_next)[2]
            std = e * (s - s_next).sqrt() if kl_form == "exact" else e
            kl = ((m_pol - m_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
            kls.append(kl.mean())
    expected = float(torch.stack(kls).mean())
    assert expected > 1e-9 and second["train/kl"] == pytest.approx(expected, rel=1e-4)
    # the reference stayed at the starting weights while the policy moved
    for p0, (name, p) in zip(start, ad.model.named_parameters()):
        torch.testing.assert_close(ref.copy[name], p0, rtol=0, atol=0)
    assert any(not torch.equal(p0, p) for p0, p in zip(start, ad.model.parameters()))
    # independent check of the KL formula on one step: KL(N(m1, s^2) || N(m2, s^2)) = (m1 - m2)^2 / (2 s^2)
    sched = FlowSchedule.create(3, eta=0.7)
    z = torch.randn(2, 3, 16, 16)
    cond = ad.encode_prompts(["one red square", "two blue circles"])
    t = sched.model_timestep(0, z)
    with torch.no_grad():
        _, _, m1, std = sched.step(0, ad.predict(z, t, cond), z, prev_sample=z)
        _, _, m2, _ = sched.step(0, start_adapter.predict(z, t, cond), z, prev_sample=z)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std.view(-1, 1, 1, 1)),
                                             torch.distributions.Normal(m2, std.view(-1, 1, 1, 1))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(grpo.gaussian_kl_same_std(m1, m2, std), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["group", "selected"])
def test_best_of_n_trains_the_released_advantages(mode):
    """Best-of-N (released train_grpo_hunyuan.py): advantages over the whole group of N, then the top k and
    bottom k by advantage are kept with those advantages ("group", the default); "selected" normalises
    again over the 2k kept samples. Reference: the released formula on plain floats."""
    import statistics

    from fastvideo_grpo.training import trainer as trainer_mod
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.training.trainer import GRPOTrainer

    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    cfg = load_config("configs/toy_cpu.yaml", [
        "--grpo.prompts_per_iteration=1", "--grpo.group_size=6", "--grpo.best_of_n_k=2",
        f"--grpo.best_of_n_advantages={mode}", "--sampling.num_steps=3", "--sampling.eta_schedule=null",
        "--sampling.eta=0.7", "--grpo.timestep_window=null", "--grpo.tau=1.0", "--grpo.num_updates_per_iteration=1",
    ])
    ad = _adapter(4)

    shown = {}

    def fixed(images, prompts, **_):
        shown["images"] = images.clone()
        return torch.tensor(scores), {}

    trainer = GRPOTrainer(cfg, ad, {"r": fixed}, {"r": 1.0}, PromptSource(["one red square"], ad.encode_prompts, seed=0))
    seen = {}
    original = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["traj"], seen["adv"] = batch.traj, batch.advantages_B.clone()
        return original(objective, batch, *a, **k)

    original_decode = trainer_mod.decode_latents

    def decode_spy(adapter, z, *a, **k):
        shown["latents"] = z.clone()
        return original_decode(adapter, z, *a, **k)

    trainer_mod.update, trainer_mod.decode_latents = spy, decode_spy
    try:
        trainer.train_iteration()
    finally:
        trainer_mod.update, trainer_mod.decode_latents = original, original_decode

    def released_adv(xs):
        m, s = statistics.fmean(xs), statistics.stdev(xs)
        return [(x - m) / (s + 1e-8) for x in xs]

    full = released_adv(scores)
    order = sorted(range(6), key=lambda i: full[i])
    kept = sorted(order[-2:] + order[:2])
    assert kept == [0, 1, 4, 5]
    assert seen["traj"].batch_size == 4
    # which sample each trained row is: its final latent among the six decoded for the reward (the trainer
    # frees the pixels before the update)
    assert shown["images"].shape[0] == 6
    rows = [next(i for i in range(6) if torch.equal(z, shown["latents"][i])) for z in seen["traj"].final_latents]
    got = dict(zip(rows, seen["adv"].tolist()))
    want = dict(zip(kept, [full[i] for i in kept] if mode == "group" else released_adv([scores[i] for i in kept])))
    assert got.keys() == want.keys()
    for i in kept:
        assert got[i] == pytest.approx(want[i], rel=1e-5), (mode, i)


def test_ema_run_evaluates_exports_and_resumes_with_the_average(tmp_path):
    """train.ema_decay through the runner: the export and the evaluations hold the closed-form EMA of the
    weights after each iteration; a checkpoint holds it, and a resumed run ends bit-identical."""
    from safetensors.torch import load_file

    from fastvideo_grpo.training.checkpoint import has_ema, load_ema_weights
    from fastvideo_grpo.training.loop import Component
    from fastvideo_grpo.training.runner import PromptSets, run

    decay = 0.6
    built = {}

    def factory(device):
        built["adapter"] = _adapter(5)
        return built["adapter"]

    def flat():
        return torch.cat([p.detach().flatten().double() for p in built["adapter"].model.parameters()])

    seen_at_eval = []

    def bright(images, prompts, **_):
        return images.mean(dim=(1, 2, 3)), {}

    def spy(images, prompts, **_):  # an evaluation reward: records the weights the evaluation runs with
        seen_at_eval.append(flat())
        return images.mean(dim=(1, 2, 3)), {}

    hist = []

    class Record(Component):
        def on_start(self, state):
            hist.append(flat())
            return {}

        def on_iteration(self, state, it, m):
            hist.append(flat())

    def cfg_for(out, resume=None):
        over = [f"--train.output_dir={out}", "--train.num_iterations=3", "--train.save_every=1", "--train.eval_every=0",
                f"--train.ema_decay={decay}", "--train.device=cpu", "--grpo.prompts_per_iteration=2",
                "--grpo.group_size=2", "--sampling.num_steps=3", "--sampling.eval_num_steps=2", "--optim.lr=1e-2",
                "--grpo.clip_range=0.1", "--eval.samples_per_prompt=1", "--log.progress=false", "--train.seed=2"]
        return load_config(None, over + ([f"--train.resume={resume}"] if resume else []))

    prompts = PromptSets(["one red square", "two blue circles", "a green circle"], ["one blue square"])
    run(cfg_for(tmp_path / "A"), factory, prompts, reward_fns={"b": bright}, reward_weights={"b": 1.0},
        eval_fns={"b": spy}, extra_components=lambda parts: [Record()])
    assert len(hist) == 4  # initial weights + after each of 3 iterations

    def closed_form(n):
        out = decay ** n * hist[0]
        for i in range(1, n + 1):
            out = out + (1 - decay) * decay ** (n - i) * hist[i]
        return out

    assert not torch.allclose(closed_form(3), hist[3], atol=1e-4)  # the average is not the last weights
    # evaluation before training and after the last iteration ran with the average
    torch.testing.assert_close(seen_at_eval[0], hist[0])
    torch.testing.assert_close(seen_at_eval[-1], closed_form(3), rtol=1e-5, atol=1e-6)
    names = [n for n, _ in built["adapter"].model.named_parameters()]
    exported = load_file(str(tmp_path / "A" / "export" / "model.safetensors"))
    torch.testing.assert_close(torch.cat([exported[n].flatten().double() for n in names]), closed_form(3),
                               rtol=1e-5, atol=1e-6)
    # the checkpoint of iteration 2 holds the average of iteration 2; the evaluation CLI's loader reads it
    ck = tmp_path / "A" / "checkpoints" / "step_00000002"
    assert has_ema(ck)
    fresh = _adapter(5)
    assert load_ema_weights(ck, fresh.model)
    torch.testing.assert_close(torch.cat([p.detach().flatten().double() for p in fresh.model.parameters()]),
                               closed_form(2), rtol=1e-5, atol=1e-6)
    # resume from iteration 2: the same export, bit for bit (the resumed iteration runs in this process with
    # the same shapes and thread count as the uninterrupted one: the same kernels, the same rounding)
    (tmp_path / "B" / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ck, tmp_path / "B" / "checkpoints" / "step_00000002")
    (tmp_path / "B" / "checkpoints" / "latest").write_text("step_00000002\n")
    run(cfg_for(tmp_path / "B", resume="latest"), factory, prompts, reward_fns={"b": bright},
        reward_weights={"b": 1.0}, eval_fns={"b": spy})
    again = load_file(str(tmp_path / "B" / "export" / "model.safetensors"))
    assert all(torch.equal(again[n], exported[n]) for n in names)


def test_frozen_toy_modules_keep_their_weights_through_training():
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.training.trainer import GRPOTrainer

    ad = _adapter(3)
    ad = ToyAdapter(ad.model, frozen=["patch_out", "ada_out"])
    frozen = {n for n, p in ad.model.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_out.weight", "patch_out.bias", "ada_out.weight", "ada_out.bias"}
    cfg = load_config(None, ["--model.name=toy", "--sampling.num_steps=3", "--sampling.eta=0.7", "--grpo.group_size=4",
                             "--grpo.prompts_per_iteration=2", "--grpo.tau=1.0", "--optim.lr=1e-2",
                             "--rewards=[{name: toy_colour_fidelity}]"])
    fns, weights = build_reward_fns(cfg.rewards)
    prompts = ["one red square", "two blue circles", "one green triangle"]
    trainer = GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=0))
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    trainer.train_iteration()
    for n, p in ad.model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
    with pytest.raises(ValueError, match="not submodules"):
        ToyAdapter(ad.model, frozen=["decoder"])


def test_frozen_below_denoises_low_timesteps_with_the_starting_weights():
    from fastvideo_grpo.models.toy import velocity_from_clean

    ad = _adapter(4)
    start = {k: v.clone() for k, v in ad.model.state_dict().items()}
    ad = ToyAdapter(ad.model, frozen_below=500)
    with torch.no_grad():
        for p in ad.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # training moved the weights
    ref = TinyDiT(TinyDiTConfig(**TINY))
    ref.load_state_dict(start)
    z = torch.randn(3, 3, 16, 16)
    tok = ad.encode_prompts(["one red square", "two blue circles", "one green triangle"])["tokens"]
    t = torch.tensor([900.0, 400.0, 600.0])
    with torch.no_grad():
        got = ad.predict(z, t, {"tokens": tok})
        old = velocity_from_clean(ref(z, t, tok), z, t)
        new = velocity_from_clean(ad.model(z, t, tok), z, t)
    torch.testing.assert_close(got[1], old[1])  # below 500: the starting weights
    torch.testing.assert_close(got[[0, 2]], new[[0, 2]])  # above: the trained ones
    assert not torch.allclose(old[0], new[0])
    assert not any(p.requires_grad for p in ad.low_noise_expert.parameters())
    with pytest.raises(ValueError, match="frozen_below"):
        ToyAdapter(ad.model, frozen_below=-1)
