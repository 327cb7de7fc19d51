"""The update and the rollout ask the device for nothing per micro-step or per sampling step (bench/host_syncs.py).

On a GPU every scalar read of a device tensor and every blocking copy from pageable host memory makes the host
wait for the queued work; the project promises one such wait per optimiser step. The audit records what the
package's own code requests, by region, on the CPU: a real toy iteration must show none inside a micro-step,
a model forward or an SDE step, and exactly the driver's one read per optimiser step (plus one for the
update's statistics). Before this was fixed each micro-step asked for four copies of host indices (the rows,
their conditioning, the step indices for the model's timestep), which the audit lists."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from host_syncs import HostSyncAudit, audit  # noqa: E402


def _toy_trainer():
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
        "--grpo.micro_batch_size=4", "--sampling.rollout_batch_size=4", "--rewards=[{name: toy_colour_fidelity}]"])
    torch.manual_seed(0)
    adapter = ToyAdapter(TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)))
    fns, weights = build_reward_fns(cfg.rewards)
    return Trainer(cfg, adapter, fns, weights, PromptSource(split_prompts(seed=0)[0], adapter.encode_prompts, seed=1))


def test_no_host_request_per_micro_step_or_sampling_step():
    trainer = _toy_trainer()
    trainer.train_iteration()  # warm: nothing is set up lazily inside the audited iteration
    hot = ("micro_step", "forward", "sde_step")
    metrics, events = audit(trainer.train_iteration, [
        (trainer.objective, "loss", "micro_step"), (trainer.adapter, "predict", "forward"),
        (trainer.schedule, "step", "sde_step"), (trainer.schedule, "model_timestep", "sde_step")])
    assert [e for e in events if e["region"] in hot] == [], events
    # 3 kept steps x 2 micro-batches = 6 micro-steps in 2 optimiser steps: one read each, one for the statistics
    assert metrics["train/num_updates"] == 2 and metrics["passes/backward"] == 24
    update_reads = {}
    for e in events:
        if "algorithms/update.py" in e["site"]:
            fn = e["site"].split(" ")[1]
            update_reads[fn] = update_reads.get(fn, 0) + e["count"]
    # LogProbGap.__init__ counts the host step indices per sampling step (a CPU tensor on any machine: no wait)
    assert update_reads == {"(_clip_and_check)": 2, "(update)": 1, "(__init__)": 2}, events
    assert "loss" not in trainer.objective.__dict__  # the audit put the methods back


def test_the_audit_sees_the_package_reads_by_region():
    from fastvideo_grpo.algorithms import grpo

    a = HostSyncAudit()
    with a:
        with a.region("probe"):
            grpo.summarize_rewards({"r": torch.tensor([0.5, 1.5])})  # two float() of tensors, in the package
        float(torch.ones(()))  # this file's own read: not the package's, not recorded
        torch.ones(3).to(torch.float64)  # a dtype conversion: not a copy
    sites = {}
    for e in a.events():
        key = (e["region"], e["op"], e["site"].split(":")[0])
        sites[key] = sites.get(key, 0) + e["count"]
    assert sites == {("probe", "__float__", "fastvideo_grpo/algorithms/grpo.py"): 2}, a.events()
