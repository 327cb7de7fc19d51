"""``--suite`` under torchrun (2 gloo processes) computes what one process computes: every batch keeps its noise
seed and shapes whatever rank samples it, and the per-sample values are gathered back in prompt order."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from _launch import python, torchrun  # noqa: E402


def test_two_ranks_score_the_same_samples_as_one(tmp_path):
    from common import PROMPTS, tiny_adapter

    from fastvideo_grpo.models.toy import save_toy_model

    torch.manual_seed(0)
    ckpt = tmp_path / "toy.pt"
    save_toy_model(tiny_adapter().model, ckpt)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{name: toy, kwargs: {{checkpoint: {ckpt}}}}}\nsampling: {{num_steps: 3}}\n"
                   "rewards: [{name: toy_geneval}]\ntrain: {device: cpu}\n")
    csv = tmp_path / "prompts.csv"
    csv.write_text("Prompts,Category\n" + "".join(f"{p},{'A' if i % 3 else 'B'}\n" for i, p in enumerate(PROMPTS[:5])))
    python("w_benchmark.py", cfg, csv, tmp_path / "one")
    torchrun("w_benchmark.py", cfg, csv, tmp_path / "two")
    one = json.loads((tmp_path / "one" / "drawbench.json").read_text())
    two = json.loads((tmp_path / "two" / "drawbench.json").read_text())
    assert one["settings"]["world_size"] == 1 and two["settings"]["world_size"] == 2
    a = [s["bench_brightness"] for s in one["per_sample"]["base"]]
    b = [s["bench_brightness"] for s in two["per_sample"]["base"]]
    assert len(a) == len(b) == 10 and len(set(a)) > 5  # 5 prompts x 2 samples, not all alike
    # each batch (1 prompt x 2 samples) is sampled by one rank with the shapes and threads of the 1-process run:
    # equal up to float32 rounding of a mean over 3 x 16 x 16 values
    assert b == pytest.approx(a, rel=0, abs=1e-6)
    assert two["metrics"][0]["rows"][0]["overall"] == pytest.approx(one["metrics"][0]["rows"][0]["overall"], abs=1e-6)

