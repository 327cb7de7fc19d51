"""Group-level rewards (rewards/base.py) and Pref-GRPO's win rate (rewards/win_rate.py) against the win rate counted
pair by pair here, with a pointwise and a pairwise judge; the reward path hands the group structure over (scoring in
chunks of whole groups), evaluation leaves group-level rewards out, and the trainer's advantages are the group
normalisation of the win rates."""

import itertools

import pytest
import torch

from fastvideo_grpo.config import load_config
from fastvideo_grpo.rewards.base import REWARDS, ConfiguredReward, compute_rewards
from fastvideo_grpo.rewards.build import build_eval_reward_fns, build_reward_fns


def _scores(images, prompts, **_):
    return images.float().mean(dim=(1, 2, 3)), {"n": images.shape[0]}


if "test_mean_pixel" not in REWARDS.names():
    REWARDS.register("test_mean_pixel")(lambda: _scores)


def _counted(scores, G):
    """The win rate by counting: over the other G - 1 samples of the group, 1 per lower score, 1/2 per tie."""
    out = []
    for i, si in enumerate(scores):
        g = i // G
        others = [scores[j] for j in range(g * G, g * G + G) if j != i]
        out.append(sum(1.0 if si > sj else 0.5 if si == sj else 0.0 for sj in others) / (G - 1))
    return out


def _images(levels):
    return torch.tensor(levels, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


def test_win_rate_of_a_pointwise_judge_counts_wins_and_half_ties():
    levels = [0.2, 0.9, 0.5, 0.5, 0.1, 0.3, 0.3, 0.8]  # two groups of 4, ties inside both
    prompts = ["a"] * 4 + ["b"] * 4
    fns, _ = build_reward_fns(load_config(None, ["--rewards=[{name: win_rate, kwargs: {judge: test_mean_pixel}}]"]).rewards)
    fn = fns["win_rate"]
    assert fn.group_level
    scores, info = compute_rewards(fns, _images(levels), prompts, group_size=4)
    assert scores["win_rate"].tolist() == pytest.approx(_counted(levels, 4))
    assert info["win_rate"]["judge_scores"] == pytest.approx(levels)
    # the group mean of win rates is always 1/2 (each comparison hands out exactly one win)
    assert scores["win_rate"].reshape(2, 4).mean(dim=1).tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="group-level.*no group structure"):
        compute_rewards(fns, _images(levels), prompts)
    with pytest.raises(ValueError, match="not a whole number of groups of 3"):
        compute_rewards(fns, _images(levels), prompts, group_size=3)
    with pytest.raises(ValueError, match="different prompts"):
        compute_rewards(fns, _images(levels), ["a"] * 3 + ["b"] * 5, group_size=4)


def test_win_rate_of_a_pairwise_judge_uses_its_preference_per_pair():
    calls = []

    def judge(images, prompts, **_):
        raise AssertionError("a pairwise judge is asked to compare, not to score")

    def compare(a, b, prompts):  # a soft preference from the brightness difference
        calls.append(a.shape[0])
        return torch.sigmoid(10 * (a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3))))

    judge.compare = compare
    if "test_pairwise_judge" not in REWARDS.names():
        REWARDS.register("test_pairwise_judge")(lambda: judge)
    levels = [0.1, 0.4, 0.35, 0.7, 0.6, 0.2]
    fn = REWARDS.build("win_rate", judge="test_pairwise_judge")
    scores, info = fn(_images(levels), ["p"] * 3 + ["q"] * 3, group_size=3)
    want = [0.0] * 6
    for g in range(2):
        for i, j in itertools.combinations(range(3), 2):
            p = torch.sigmoid(torch.tensor(10 * (levels[3 * g + i] - levels[3 * g + j]))).item()
            want[3 * g + i] += p / 2
            want[3 * g + j] += (1 - p) / 2
    torch.testing.assert_close(scores, torch.tensor(want))
    assert calls == [3, 3] and len(info["preference"]) == 6  # one call per group with its 3 pairs


def test_chunked_scoring_keeps_groups_and_evaluation_leaves_group_rewards_out():
    levels = torch.rand(12, generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [p for p in "abc" for _ in range(4)]
    fn = REWARDS.build("win_rate", judge="test_mean_pixel")
    whole = fn(_images(levels), prompts, group_size=4)[0]
    chunked = ConfiguredReward(fn, batch_size=8)  # 8 = two whole groups per call
    assert chunked.group_level
    torch.testing.assert_close(compute_rewards({"w": chunked}, _images(levels), prompts, group_size=4)[0]["w"], whole)
    # the pointwise judge may score fewer samples per call than the groups it compares
    judged_in_fives = REWARDS.build("win_rate", judge="test_mean_pixel", judge_batch_size=5)
    torch.testing.assert_close(judged_in_fives(_images(levels), prompts, group_size=4)[0], whole)
    with pytest.raises(ValueError, match="batch_size 6.*multiple of grpo.group_size = 4"):
        compute_rewards({"w": ConfiguredReward(fn, batch_size=6)}, _images(levels), prompts, group_size=4)
    # held-out evaluation: group-level rewards are left out of the default and refused in eval.rewards
    cfg = load_config(None, ["--rewards=[{name: win_rate, kwargs: {judge: test_mean_pixel}}, "
                             "{name: test_mean_pixel, threshold: 0.5}]"])
    train_fns, _ = build_reward_fns(cfg.rewards)
    assert set(build_eval_reward_fns(cfg, train_fns)) == {"test_mean_pixel"}
    only = load_config(None, ["--rewards=[{name: win_rate, kwargs: {judge: test_mean_pixel}}]"])
    with pytest.raises(ValueError, match="set eval.rewards"):
        build_eval_reward_fns(only, build_reward_fns(only.rewards)[0])
    explicit = load_config(None, ["--rewards=[{name: test_mean_pixel}]",
                                  "--eval.rewards=[{name: win_rate, kwargs: {judge: test_mean_pixel}}]"])
    with pytest.raises(ValueError, match=r"eval.rewards \['win_rate'\] score whole groups"):
        build_eval_reward_fns(explicit, {})


def test_the_planner_finds_the_judge_behind_the_wrappers():
    from fastvideo_grpo.cli.plan import REWARD_PARAMS, _reward_bytes
    from fastvideo_grpo.config import RewardConfig

    kwargs = {"judge": "binary", "judge_batch_size": 2, "reward": "hps", "threshold": 0.3, "model_path": "m"}
    assert REWARDS.resolve_wrapped("win_rate", kwargs) == ("hps", {"model_path": "m"})
    assert _reward_bytes(RewardConfig(name="win_rate", kwargs=kwargs)) == REWARD_PARAMS["hps"][0] * REWARD_PARAMS["hps"][1]


def test_the_trainer_normalises_the_win_rates_within_groups():
    from fastvideo_grpo.algorithms.grpo import group_advantages
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.trainer import Trainer
    from support.tiny_models import tiny_toy_adapter
    import fastvideo_grpo.training.trainer as trainer_mod

    cfg = load_config(None, ["--sampling.num_steps=3", "--sampling.eta=0.7", "--grpo.group_size=4",
                             "--grpo.prompts_per_iteration=2",
                             "--rewards=[{name: win_rate, kwargs: {judge: test_mean_pixel}}]"])
    ad = tiny_toy_adapter()
    fns, weights = build_reward_fns(cfg.rewards)
    trainer = Trainer(cfg, ad, fns, weights, PromptSource(split_prompts(seed=0)[0], ad.encode_prompts, seed=1))
    seen = {}
    real = trainer_mod.update

    def spy(objective, batch, *a, **k):
        seen["batch"] = batch
        return real(objective, batch, *a, **k)

    trainer_mod.update = spy
    try:
        m = trainer.train_iteration()
    finally:
        trainer_mod.update = real
    batch = seen["batch"]
    levels = _scores(ad.decode(batch.traj.final_latents), None)[0].tolist()
    rates = torch.tensor(_counted(levels, 4))
    torch.testing.assert_close(batch.advantages_B, group_advantages(rates, 4))
    assert m["reward/win_rate/mean"] == pytest.approx(0.5)
