"""The reward-hacking watchdog's rule on synthetic metric series (fires / does not fire / N consecutive), the
choice of the best evaluation by the gold reward, the diversity statistics against a brute-force reference,
and the config keys' errors."""

import itertools
import math

import pytest
import torch

from fastvideo_grpo.config import load_config
from fastvideo_grpo.rewards.diversity import distance_matrix, pairwise_diversity, pixel_features, sample_diversity
from fastvideo_grpo.training.watchdog import AlarmRule, AlarmTracker, BestTracker, Watchdog


def _run(rule, trained, gold):
    """Feed the series evaluation by evaluation; returns (the step the alarm fired at or None, the tracker)."""
    t = AlarmTracker(rule)
    for step, (r, g) in enumerate(zip(trained, gold)):
        t.update(step * 10, r, {"gold/g": g})
    return (t.fired["step"] if t.fired else None), t


HACK_TRAINED = [0.50, 0.60, 0.70, 0.80, 0.85, 0.90]
HACK_GOLD = [0.70, 0.75, 0.72, 0.69, 0.66, 0.60]  # best at 10; drops 0.03, 0.06, 0.09, 0.15 after it


def test_alarm_fires_after_n_consecutive_evaluations_of_a_falling_gold_under_a_rising_reward():
    # drop > 0.05 first at step 30 (0.06), again at 40: with patience 2 the alarm fires at 40, not before
    step, t = _run(AlarmRule(threshold=0.05, patience=2), HACK_TRAINED, HACK_GOLD)
    assert step == 40 and t.fired["signals"] == ["gold/g"]
    assert _run(AlarmRule(threshold=0.05, patience=1), HACK_TRAINED, HACK_GOLD)[0] == 30
    assert _run(AlarmRule(threshold=0.05, patience=3), HACK_TRAINED, HACK_GOLD)[0] == 50
    assert _run(AlarmRule(threshold=0.05, patience=4), HACK_TRAINED, HACK_GOLD)[0] is None  # only 3 in a row
    # the largest drop is 0.15 (at 50): a threshold just above it never fires, just below fires there
    assert _run(AlarmRule(threshold=0.1501, patience=1), HACK_TRAINED, HACK_GOLD)[0] is None
    assert _run(AlarmRule(threshold=0.1499, patience=1), HACK_TRAINED, HACK_GOLD)[0] == 50
    # relative: 0.06 / 0.75 = 0.08 at step 30
    assert _run(AlarmRule(threshold=0.07, relative=True, patience=1), HACK_TRAINED, HACK_GOLD)[0] == 30
    assert _run(AlarmRule(threshold=0.09, relative=True, patience=1), HACK_TRAINED, HACK_GOLD)[0] == 40


def test_no_alarm_when_both_fall_or_the_gold_only_wobbles_or_a_streak_breaks():
    falling_trained = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65]  # everything falls: a bad run, not a hacked one
    assert _run(AlarmRule(threshold=0.05, patience=2), falling_trained, HACK_GOLD)[0] is None
    wobble = [0.70, 0.75, 0.72, 0.74, 0.71, 0.73]  # never more than 0.04 below its best
    assert _run(AlarmRule(threshold=0.05, patience=1), HACK_TRAINED, wobble)[0] is None
    # met at 20 and 40 but not at 30 (gold back near its best): no two in a row
    broken = [0.70, 0.80, 0.70, 0.79, 0.70, 0.79]
    assert _run(AlarmRule(threshold=0.05, patience=2), HACK_TRAINED, broken)[0] is None
    # min_rise: the trained reward must rise by more than it since the gold's best (at 10: 0.60), i.e. by
    # 0.20 / 0.25 / 0.30 at 30 / 40 / 50
    assert _run(AlarmRule(threshold=0.05, patience=1, min_rise=0.31), HACK_TRAINED, HACK_GOLD)[0] is None
    assert _run(AlarmRule(threshold=0.05, patience=1, min_rise=0.26), HACK_TRAINED, HACK_GOLD)[0] == 50
    # missing values (a diversity not measured) neither meet nor break anything by themselves
    assert _run(AlarmRule(threshold=0.05, patience=1), HACK_TRAINED, [None] * 6)[0] is None


def test_the_alarm_fires_once_and_names_the_signal():
    rule = AlarmRule(threshold=0.05, patience=1)
    dog = Watchdog(rule, "/nonexistent", gold_keys=["g"], best_by="g", stop=False, samples_per_prompt=1)
    messages = []
    for step, (r, g) in enumerate(zip(HACK_TRAINED, HACK_GOLD)):
        d = dog._decide({"step": step * 10, "trained": r, "gold": {"g": g}, "diversity": {}})
        messages.append(d["message"])
        assert d["metrics"]["eval/gold/g"] == g and d["metrics"]["watchdog/alarm"] == int(step * 10 >= 30)
    assert [m is not None for m in messages] == [False, False, False, True, False, False]
    assert messages[3].startswith("WATCHDOG ALARM at iteration 30") and "gold/g" in messages[3]
    assert "0.7500 (iteration 10)" in messages[3] and "0.6900" in messages[3]


def test_best_is_chosen_by_the_gold_reward_not_the_trained_one():
    best = BestTracker()
    improved = [best.update(s * 10, g) for s, g in enumerate(HACK_GOLD)]
    assert improved == [True, True, False, False, False, False] and (best.step, best.value) == (10, 0.75)
    assert max(range(6), key=lambda i: HACK_TRAINED[i]) * 10 == 50  # the trained reward would pick the last
    assert not best.update(60, 0.75) and best.step == 10  # ties keep the earlier evaluation
    assert not best.update(70, None)
    # through the component: the export callback is asked at the improving evaluations only
    exported = []
    dog = Watchdog(AlarmRule(), "/nonexistent", gold_keys=["a", "b"], best_by="b", stop=False, samples_per_prompt=1,
                   export_best=lambda step, rec: exported.append((step, rec["gold"]["b"])))

    class State:
        stop_requested = None

    dog.is_main = True
    dog._write = lambda: None
    for s, (g, r) in enumerate(zip(HACK_GOLD, HACK_TRAINED)):
        dog.pending = {"trained": r, "gold": {"a": 1.0 - g, "b": g}, "diversity": {}}
        dog._process(State(), s * 10)
    assert exported == [(0, 0.70), (10, 0.75)]


def test_stop_requests_a_stop_only_when_the_alarm_fires():
    dog = Watchdog(AlarmRule(threshold=0.05, patience=2), "/nonexistent", gold_keys=["g"], best_by="off", stop=True,
                   samples_per_prompt=1)
    dog._write = lambda: None

    class State:
        stop_requested = None

    state = State()
    for s, (r, g) in enumerate(zip(HACK_TRAINED, HACK_GOLD)):
        dog.pending = {"trained": r, "gold": {"g": g}, "diversity": {}}
        dog._process(state, s * 10)
        assert (state.stop_requested is not None) == (s * 10 >= 40)
        if s * 10 == 40:
            assert "WATCHDOG ALARM at iteration 40" in state.stop_requested
            break


def test_pairwise_diversity_equals_a_brute_force_mean_over_pairs():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)
    groups = [0, 0, 0, 1, 1, 2]
    d = sample_diversity(images, groups, "pixel", size=64)
    flat = images.double().flatten(1)
    rms = {(i, j): float((flat[i] - flat[j]).square().mean().sqrt()) for i, j in itertools.combinations(range(6), 2)}
    within = [v for (i, j), v in rms.items() if groups[i] == groups[j]]
    across = [v for (i, j), v in rms.items() if groups[i] != groups[j]]
    assert math.isclose(d["within_group"], sum(within) / len(within), rel_tol=1e-12)
    assert math.isclose(d["across_prompts"], sum(across) / len(across), rel_tol=1e-12)
    # identical samples in a group: zero within; no pair across -> None
    same = images[:1].repeat(3, 1, 1, 1)
    assert sample_diversity(same, [0, 0, 0], "pixel") == {"within_group": 0.0, "across_prompts": None}
    # cosine distances of normalised features
    f = torch.nn.functional.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=-1)
    dm = distance_matrix(f, "cosine")
    assert math.isclose(float(dm[0, 1]), 1 - float(f[0] @ f[1]), rel_tol=1e-12)
    assert pairwise_diversity(dm, [0, 0, 1, 1])["within_group"] == pytest.approx((float(dm[0, 1]) + float(dm[2, 3])) / 2)


def test_pixel_features_downsample_by_area_and_flatten_videos():
    img = torch.zeros(1, 3, 128, 128)
    img[..., :64, :] = 1.0  # top half white
    f = pixel_features(img, size=64)  # 128 -> 64 by area: still exactly half white
    assert f.shape == (1, 3 * 64 * 64) and math.isclose(float(f.square().sum()), 0.5, rel_tol=1e-12)
    video = torch.rand(2, 3, 3, 8, 8)
    assert pixel_features(video, size=64).shape == (2, 3 * 3 * 64)


@pytest.mark.parametrize("override, message", [
    ("{gold: [{name: toy_geneval}], diversity: pixels}", "train.watchdog.diversity must be"),
    ("{gold: [{name: toy_geneval}], patience: 0}", "train.watchdog.patience"),
    ("{gold: [{name: toy_geneval}], threshold: -0.1}", "train.watchdog.threshold"),
    ("{gold: [{name: toy_geneval, threshold: 0.5}]}", "train.watchdog.gold[0].threshold"),
    ("{gold: [{name: toy_geneval}, {name: toy_geneval}]}", "listed twice"),
    ("{gold: [{name: toy_geneval}], best_by: clip}", "train.watchdog.best_by"),
    ("{diversity: embedding}", "train.watchdog.diversity_model.model_path"),
    ("{stop: true}", "watches nothing"),
    ("{gold: [{name: toy_geneval}], colour: 1}", "unknown config key"),
])
def test_watchdog_config_errors_name_the_key(override, message):
    base = ["--rewards=[{name: toy_colour_fidelity}]", "--train.eval_every=5"]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("configs/toy_cpu.yaml", base + [f"--train.watchdog={override}"])


def test_watchdog_config_needs_evaluations_and_groups():
    """The checks against other sections are the builder's (run by preflight before anything heavy loads)."""
    from fastvideo_grpo.training.watchdog import check_watchdog

    ok = ["--rewards=[{name: toy_colour_fidelity}]", "--train.eval_every=5",
          "--train.watchdog={gold: [{name: toy_geneval}], diversity: pixel}"]
    cfg = load_config("configs/toy_cpu.yaml", ok)
    assert cfg.train.watchdog.gold[0].name == "toy_geneval" and cfg.train.watchdog.diversity == "pixel"
    check_watchdog(cfg)
    with pytest.raises(ValueError, match="train.eval_every"):
        check_watchdog(load_config("configs/toy_cpu.yaml", ok + ["--train.eval_every=0"]))
    with pytest.raises(ValueError, match="eval.samples_per_prompt"):
        check_watchdog(load_config("configs/toy_cpu.yaml", ok + ["--eval.samples_per_prompt=1"]))
    with pytest.raises(ValueError, match="trains on"):  # the run's own reward as a gold one
        check_watchdog(load_config("configs/toy_cpu.yaml", ok[:2] + ["--train.watchdog={gold: [{name: toy_colour_fidelity}]}"]))


def test_toy_checks_is_toy_geneval_restricted_to_the_chosen_checks():
    import random

    from fastvideo_grpo.rewards.base import REWARDS
    from fastvideo_grpo.toy.shapes import parse_prompt, render

    prompts = ["two red circles", "a blue square left of a green triangle"]
    good = torch.stack([render(parse_prompt(p), 32, random.Random(i)) for i, p in enumerate(prompts)])
    extra = good.clone()
    extra[1] += render(parse_prompt("three green triangles"), 32, random.Random(5))  # duplicates of the prompt's
    extra = extra.clamp(0, 1)
    every = REWARDS.build("toy_checks", checks=["colour", "count", "shape", "position", "background"])
    gold = REWARDS.build("toy_geneval")
    for imgs in (good, extra):
        torch.testing.assert_close(every(imgs, prompts)[0], gold(imgs, prompts)[0], rtol=0, atol=1e-6)
    shape = REWARDS.build("toy_checks", checks=["shape"])
    # extra green triangles (overlapping cells merge into bigger components): shapes may still pass, counts do not
    assert float(gold(extra, prompts)[0][1]) < 1.0 and float(gold(good, prompts)[0][1]) == 1.0
    assert float(shape(good, prompts)[0].min()) == 1.0
    position = REWARDS.build("toy_checks", checks=["position"])
    assert float(position(good, prompts)[0][0]) == 1.0  # a counting prompt has no position check
    with pytest.raises(ValueError, match="subset of"):
        REWARDS.build("toy_checks", checks=["size"])


def test_a_resumed_run_replays_its_earlier_evaluations(tmp_path):
    import json

    from fastvideo_grpo.training.watchdog import prior_evaluations

    evals = [{"step": s * 10, "trained": r, "gold": {"g": g}, "diversity": {}, "alarm_message": None}
             for s, (r, g) in enumerate(zip(HACK_TRAINED, HACK_GOLD))]
    (tmp_path / "watchdog.json").write_text(json.dumps({"evaluations": evals}))
    prior = prior_evaluations(tmp_path, resumed_at=30)
    assert [p["step"] for p in prior] == [0, 10, 20, 30] and prior_evaluations(tmp_path, None) == []
    # resumed at the run's last iteration (30 of 30): its end, the final evaluation included, is redone
    assert [p["step"] for p in prior_evaluations(tmp_path, resumed_at=30, total=30)] == [0, 10, 20]
    assert [p["step"] for p in prior_evaluations(tmp_path, resumed_at=30, total=40)] == [0, 10, 20, 30]
    dog = Watchdog(AlarmRule(threshold=0.05, patience=2), tmp_path, gold_keys=["g"], best_by="g", stop=False,
                   samples_per_prompt=1, prior=prior)
    assert dog.best.step == 10 and dog.tracker.fired is None
    d = dog._decide({"step": 40, "trained": 0.85, "gold": {"g": 0.66}, "diversity": {}})
    assert d["message"] is not None and "iteration 40" in d["message"]  # as in the uninterrupted series


def test_embedding_diversity_is_one_minus_cosine_of_clip_image_embeddings(tmp_path):
    from fastvideo_grpo.rewards.diversity import EmbeddingFeatures
    from support.tiny_benchmarks import clip_dir

    embed = EmbeddingFeatures(clip_dir(tmp_path / "clip"), device="cpu")
    g = torch.Generator().manual_seed(4)
    images = torch.rand(4, 3, 32, 32, generator=g)
    f = embed(images)
    assert f.shape[0] == 4 and torch.allclose(f.norm(dim=-1), torch.ones(4, dtype=f.dtype))
    d = sample_diversity(images, [0, 0, 1, 1], "embedding", embed=embed)
    cos = f @ f.T
    assert d["within_group"] == pytest.approx(float(2 - cos[0, 1] - cos[2, 3]) / 2, rel=1e-9)
    assert d["across_prompts"] == pytest.approx(float(4 - cos[0, 2] - cos[0, 3] - cos[1, 2] - cos[1, 3]) / 4, rel=1e-9)
    video = images.view(2, 2, 3, 32, 32)  # 2 videos of 2 frames: the mean of the frames' embeddings
    fv = embed(video)
    ref = torch.nn.functional.normalize(f.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(fv, ref, rtol=1e-5, atol=1e-6)


def test_the_demonstration_recipe_trains_one_check_and_watches_toy_geneval():
    cfg = load_config("configs/toy_watchdog.yaml")
    assert [(r.name, r.kwargs) for r in cfg.rewards] == [("toy_checks", {"checks": ["shape"]})]
    w = cfg.train.watchdog
    assert [g.name for g in w.gold] == ["toy_geneval"] and w.diversity == "pixel" and not w.stop
    assert (w.threshold, w.patience, cfg.train.eval_every) == (0.02, 2, 5)
    assert cfg.model.kwargs["frozen_below"] == 550  # the demo's model and sampler (base: toy_cpu.yaml)


def test_start_up_checks_name_missing_gold_reward_weights_and_diversity_model(tmp_path):
    from fastvideo_grpo.training.preflight import preflight

    cfg = load_config("configs/toy_cpu.yaml", [
        "--rewards=[{name: toy_colour_fidelity}]", "--train.eval_every=5",
        f"--train.watchdog={{gold: [{{name: pickscore, kwargs: {{model_path: {tmp_path / 'nope'}}}}}], "
        f"diversity: embedding, diversity_model: {{model_path: {tmp_path / 'noclip'}}}}}"])
    with pytest.raises(FileNotFoundError) as e:
        preflight(cfg)
    assert "train.watchdog.gold[0].kwargs.model_path" in str(e.value)
    assert "train.watchdog.diversity_model.model_path" in str(e.value)
