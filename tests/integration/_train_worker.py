"""torchrun worker for test_train_scripts.py: registers the cheap test reward, then runs the generic entry point."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support.*
from support.threads import TEST_THREADS  # noqa: E402  (1, or FVG_TEST_THREADS: docs/reproducibility.md)

torch.set_num_threads(TEST_THREADS)

from fastvideo_grpo.rewards.base import REWARDS  # noqa: E402
from fastvideo_grpo.cli.train import cli  # noqa: E402


def _brightness(images, prompts, **meta):
    x = images.float()
    return x.mean(tuple(range(1, x.ndim))), {}


REWARDS.register("test_brightness")(lambda **kw: _brightness)

if __name__ == "__main__":
    cli(sys.argv[1:])
