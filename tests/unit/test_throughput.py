"""Throughput metrics (training/throughput.py): the FLOP count against torch's own FLOP counter, the metrics of a
real toy iteration, the peak's configuration errors and the run summary's averages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastvideo_grpo.training import throughput as tp


class _Block(nn.Module):
    """A single-stream block whose weights all multiply every token (no biases, no per-sample layers): the
    case in which ``6 N S`` is exact. Attention is spelled as its two matrix products: torch's FLOP counter does
    not count the CPU's fused attention kernel."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).reshape(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, D))
        return x + self.down(F.gelu(self.up(x)))


def test_count_equals_torch_flop_counter_for_a_single_stream_transformer():
    torch.manual_seed(0)
    d, heads, layers, img, txt, batch = 32, 4, 3, 24, 8, 2
    model = nn.Sequential(*(_Block(d, heads) for _ in range(layers)))
    x = torch.randn(batch, img + txt, d, requires_grad=True)  # input with grad: every layer's input gradient runs
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            model(x)  # a rollout forward
        model(x).sum().backward()  # a trained forward + backward
    shape = tp.ModelShape(sum(p.numel() for p in model.parameters()), img, txt, heads, d // heads, layers)
    counted = tp.model_flops(shape, rollout_forwards=1, update_forwards=1, backwards=1)
    # one pass of one sample; the counter saw a batch: same integer arithmetic, exact
    assert batch * counted["total"] == counter.get_total_flops()
    # the parts: 2 N S per forward (1 + 3 units), 4 L H d S^2 per attention forward (1 + 3 units)
    n, s = shape.params, img + txt
    assert counted["dense"] == 4 * 2 * n * s and counted["attention"] == 4 * 4 * layers * d * s * s
    with pytest.raises(ValueError, match="backwards <= update forwards"):
        tp.model_flops(shape, 1, 1, 2)


def test_peak_from_config_name_and_nominal():
    assert tp.peak_tflops("cpu", 400.0) == (400.0, False)
    assert tp.peak_tflops("cpu") == (tp.NOMINAL_TFLOPS, True)
    with pytest.raises(ValueError, match="log.peak_tflops"):
        tp.ThroughputMeter(-1.0)


def test_toy_iteration_logs_throughput_from_its_own_passes():
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.trainer import Trainer

    cfg = load_config(None, [
        "--model.name=toy", "--sampling.num_steps=5", "--sampling.eta=0.7", "--grpo.group_size=4",
        "--grpo.prompts_per_iteration=2", "--grpo.tau=0.8", "--grpo.num_updates_per_iteration=2",
        "--grpo.micro_batch_size=4", "--sampling.rollout_batch_size=4", "--rewards=[{name: toy_colour_fidelity}]",
        "--log.peak_tflops=2.5"])
    torch.manual_seed(0)
    model = TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=2, heads=2))
    adapter = ToyAdapter(model)
    fns, weights = build_reward_fns(cfg.rewards)
    trainer = Trainer(cfg, adapter, fns, weights, PromptSource(split_prompts(seed=0)[0], adapter.encode_prompts, seed=1))
    counter = FlopCounterMode(display=False)
    with counter:
        m = trainer.train_iteration()
    B = 8
    seconds = B / m["samples_per_s"]  # the same clock interval as the throughput metrics
    assert m["throughput/frames_per_gpu_s"] == pytest.approx(m["samples_per_s"], rel=1e-12)  # images, one GPU
    assert m["throughput/peak_tflops"] == 2.5 and m["throughput/peak_nominal"] == 0
    flops = m["throughput/model_tflops_per_gpu_s"] * 1e12 * seconds
    # the count from the toy's own shape: 16 patches + its prompt length, all parameters, the passes it ran
    text = trainer._measured[3]["tokens"].shape[1]
    shape = tp.ModelShape(sum(p.numel() for p in model.parameters()), 16, text, 2, 16, 2)
    assert tp.model_shape(adapter, trainer._measured[3]) == shape
    want = tp.model_flops(shape, m["passes/forward_rollout"], m["passes/forward_update"],
                              m["passes/backward"])["total"]
    assert flops == pytest.approx(want, rel=1e-9)
    assert m["throughput/mfu"] == pytest.approx(m["throughput/model_tflops_per_gpu_s"] / 2.5, rel=1e-12)
    # torch's counter over the whole iteration (model, decode, rewards): the toy's per-sample layers (timestep
    # MLP, adaLN) and embeddings do not multiply every token, so 2 N S is an upper bound here -- but the same
    # order: the rest of the iteration is not where the FLOPs are
    measured = counter.get_total_flops()
    assert 0.5 * want < measured < want, (measured, want)
    # the rollout / training log-prob gap: one value per trained sampling step
    steps = [k for k in m if k.startswith("train/logp_gap/step_")]
    assert steps and all(m[k] >= 0 for k in steps)
    assert m["train/logp_gap/before_update"] == 0.0  # same weights, same shapes as the rollout: identical maths


def test_summary_averages_the_warm_iterations():
    rows = [{"throughput/mfu": 0.1, "throughput/frames_per_gpu_s": 1.0},
            {"throughput/mfu": 0.3, "throughput/frames_per_gpu_s": 3.0},
            {"throughput/mfu": 0.5, "throughput/frames_per_gpu_s": 5.0, "loss": 9.0}]
    assert tp.summarise(rows) == {"mfu": pytest.approx(0.4), "frames_per_gpu_s": pytest.approx(4.0),
                                  "iterations_averaged": 2}
    assert tp.summarise(rows[:1])["mfu"] == 0.1 and tp.summarise([]) == {}
