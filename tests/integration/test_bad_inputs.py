"""Bad inputs met during a run (issue 39): a non-finite reward is caught on its raw scores, before a threshold
hides it; a full disk ends the run with one line and keeps the last whole checkpoint; a killed run's temporary
files are removed by the rerun. Through the real loop (runner.run) on the tiny toy DiT."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.config import RewardConfig
from fastvideo_grpo.rewards.base import REWARDS
from fastvideo_grpo.training.loop import EXIT_DIVERGED, TrainingStopped
from fastvideo_grpo.training.runner import PromptSets, run

WORKERS = Path(__file__).resolve().parents[1] / "distributed" / "workers"
sys.path.insert(0, str(WORKERS))
from common import PROMPTS, redness, run_config, tiny_adapter  # noqa: E402

CALLS = {"n": 0, "prompts": None}


def _nan_on_second_call(**_):
    def score(images, prompts, **meta):
        CALLS["n"] += 1
        s, _ = redness(images, prompts)
        if CALLS["n"] == 2:  # iteration 2: one sample's score is NaN (NaN >= threshold is False: it would become 0)
            s = s.clone()
            s[2] = float("nan")
            CALLS["prompts"] = list(prompts)
        return s, {}

    return score


if "test_nan_second_call" not in REWARDS.names():
    REWARDS.register("test_nan_second_call")(_nan_on_second_call)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_a_nan_score_of_a_thresholded_reward_stops_the_run_naming_reward_sample_and_prompt(tmp_path):
    CALLS.update(n=0, prompts=None)
    out = tmp_path / "run"
    cfg = run_config(out, num_iterations=3, save_every=1)
    cfg.rewards = [RewardConfig(name="test_nan_second_call", threshold=0.99, weight=1.0)]
    with pytest.raises(TrainingStopped) as e:
        run(cfg.validate(), tiny_adapter, PromptSets(PROMPTS))
    msg = str(e.value)
    assert e.value.exit_code == EXIT_DIVERGED
    assert msg.startswith("iteration 2 stopped: reward 'test_nan_second_call_bin' returned a non-finite score for 1 "
                          "of 4 samples: sample 2 = nan"), msg
    assert f"(prompt {CALLS['prompts'][2]!r})" in msg and "before the threshold 0.99" in msg
    assert "the last good checkpoint is" in msg and "step_00000001" in msg
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (out / "checkpoints" / "step_00000002").exists()


def test_a_reward_that_checks_itself_still_names_the_prompts():
    from fastvideo_grpo.rewards.base import check_scores, compute_rewards

    def own_check(images, prompts, **_):  # as the built-in rewards do: check_scores without the prompts
        return check_scores("own", torch.tensor([0.1, float("inf"), 0.3]), 3), {}

    with pytest.raises(ValueError) as e:
        compute_rewards({"own": own_check}, torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    assert str(e.value).startswith("reward 'own' returned a non-finite score for 1 of 3 samples: sample 1 = inf "
                                   "(prompt 'b')"), str(e.value)


def test_a_non_finite_loss_names_the_possible_causes():
    from fastvideo_grpo.algorithms.update import NONFINITE_LOSS_CAUSES
    from fastvideo_grpo.training.loop import LoopState, NaNGuard

    state = LoopState(trainer=None, total=3, out=Path("."), last_checkpoint="ck/step_00000002")
    stop = NaNGuard().on_error(state, 3, FloatingPointError(f"non-finite GRPO loss at kept step 1; optimiser step "
                                                            f"skipped. {NONFINITE_LOSS_CAUSES}"))
    msg = str(stop)
    for cause in ("optim.lr", "sampling.eta", "train.autocast", "checkpoint", "embeddings"):
        assert cause in msg, msg
    assert "ck/step_00000002" in msg and stop.exit_code == EXIT_DIVERGED
