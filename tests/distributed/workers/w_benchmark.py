"""A benchmark suite (DrawBench format, a brightness reward) over a toy checkpoint, in one process or under
torchrun: argv = config.yaml, prompts.csv, output folder."""

from __future__ import annotations

import sys

import common  # noqa: F401  (sys.path, one thread)

from fastvideo_grpo.cli.benchmark import main  # noqa: E402
from fastvideo_grpo.rewards.base import REWARDS  # noqa: E402


def brightness(images, prompts, **_):
    return images.float().flatten(1).mean(1), {}


if "bench_brightness" not in REWARDS.names():
    REWARDS.register("bench_brightness")(lambda: brightness)

config, prompts, out = sys.argv[1:4]
main(["--suite", "drawbench", "base", "--config", config, "--prompts", prompts, "--suite-args",
      "{rewards: [{name: bench_brightness}]}", "--samples-per-prompt", "2", "--batch-size", "2", "--out", out,
      "--device", "cpu"])
