"""The reward-hacking watchdog in a real (tiny) toy run: the alarm fires, is logged and stops the run after a
checkpoint; the best export is the evaluation the gold reward liked best; the toy scripts exit with status 5.

The held-out rewards are scripted (each evaluation call returns the next value of a fixed series) so that the
run is a few seconds and its outcome does not depend on how a barely-pretrained model learns: what is tested
is the wiring from the evaluation to the alarm, the log, the metrics, the stop and the exports. The rule itself
is tested on synthetic series in tests/unit/test_watchdog.py, and the hacking it catches by
configs/toy_watchdog.yaml (docs/watchdog.md)."""

import json

import pytest
import torch

from fastvideo_grpo.config import load_config
from fastvideo_grpo.training.loop import EXIT_WATCHDOG, TrainingStopped, run_cli
from fastvideo_grpo.rewards.base import REWARDS


def _scripted(start, step):
    def factory():
        calls = []

        def reward(images, prompts, **_):
            value = start + step * len(calls)
            calls.append(1)
            return torch.full((images.shape[0],), value), {}

        return reward

    return factory


if "wd_test_rising" not in REWARDS.names():
    REWARDS.register("wd_test_rising")(_scripted(0.5, 0.1))   # the held-out trained reward: 0.5, 0.6, 0.7, ...
    REWARDS.register("wd_test_falling")(_scripted(0.9, -0.1))  # the gold reward: 0.9, 0.8, 0.7, ...


def test_alarm_logs_stops_after_saving_and_keeps_the_best_by_gold(tmp_path, capsys):
    from fastvideo_grpo.cli.demo import run_demo

    out = tmp_path / "run"
    cfg = load_config("configs/toy_cpu.yaml", [
        f"--train.output_dir={out}", "--train.num_iterations=5", "--train.eval_every=1", "--train.save_every=0",
        "--train.num_eval_prompts=2", "--grpo.prompts_per_iteration=1", "--grpo.group_size=2",
        "--sampling.num_steps=2", "--sampling.eval_num_steps=2", "--sampling.eta_schedule=[1.0, 0.0]",
        "--grpo.timestep_window=[0, 1]", "--eval.samples_per_prompt=2", "--eval.batch_size=4",
        "--rewards=[{name: toy_colour_fidelity}]", "--eval.rewards=[{name: wd_test_rising}]",
        "--train.watchdog={gold: [{name: wd_test_falling, key: gold}], diversity: pixel, threshold: 0.15, "
        "patience: 2, stop: true}",
        "--extra.pretrain.steps=2", "--extra.pretrain.num_images=32", "--extra.pretrain.batch_size=8",
        "--extra.pretrain.model={hidden: 32, depth: 1, heads: 2}",
        "--extra.pretrain.autoencoder={image_size: 16, hidden: 16, steps: 2}",
    ])
    with pytest.raises(TrainingStopped) as stopped:
        run_demo(cfg, progress=False, cache_dir=str(tmp_path / "cache"))
    # evaluations at 0, 1, 2, 3: gold 0.9, 0.8, 0.7, 0.6 (best at 0); the drop exceeds 0.15 first at 2 (0.2), again
    # at 3, while the trained reward rose (0.5 -> 0.7, 0.8): patience 2 fires at iteration 3
    assert stopped.value.exit_code == EXIT_WATCHDOG
    message = str(stopped.value)
    assert message.startswith("WATCHDOG ALARM at iteration 3") and "gold/gold 0.9000 (iteration 0)" in message
    assert message.count("WATCHDOG ALARM") == 1 and "train.watchdog.stop" in message
    assert capsys.readouterr().out.count("WATCHDOG ALARM at iteration 3") == 1  # the one line in the log

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3  # stopped after iteration 3 of 5
    by_step = {r["step"]: r for r in rows if "eval/gold/gold" in r}
    assert sorted(by_step) == [0, 1, 2, 3]
    assert [round(by_step[s]["eval/gold/gold"], 6) for s in range(4)] == [0.9, 0.8, 0.7, 0.6]
    assert [by_step[s]["watchdog/alarm"] for s in range(4)] == [0, 0, 0, 1]
    assert [r for r in rows if "watchdog/alarm_message" in r][0]["step"] == 3
    assert all(by_step[s]["eval/diversity/within_group"] >= 0 for s in range(4))  # measured at every evaluation
    assert "eval/gold" not in json.dumps({k: v for k, v in by_step[0].items() if k == "eval/reward"})
    assert by_step[1]["eval/reward"] == pytest.approx(0.6)  # the evaluator's reward: the trained one only

    # saved before stopping: a checkpoint of iteration 3; the best export is the gold's best (iteration 0)
    assert (out / "checkpoints" / "step_00000003").is_dir()
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["iteration"] == 0 and best["gold"]["gold"] == pytest.approx(0.9) and best["best_by"] == "gold"
    assert (out / "best" / "model.safetensors").is_file() and not (out / "best.tmp").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == message and summary["watchdog"]["alarm"]["step"] == 3
    assert summary["watchdog"]["best"]["step"] == 0
    record = json.loads((out / "watchdog.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [0, 1, 2, 3] and record["alarm"]["signals"] == ["gold/gold"]
    assert (out / "watchdog_curve.png").stat().st_size > 0


def test_a_watchdog_stop_exits_with_its_documented_status(capsys):
    def stopped():
        raise TrainingStopped("WATCHDOG ALARM at iteration 7: ...", EXIT_WATCHDOG)

    with pytest.raises(SystemExit) as e:
        run_cli(stopped)
    assert e.value.code == 5 and "WATCHDOG ALARM at iteration 7" in capsys.readouterr().err
