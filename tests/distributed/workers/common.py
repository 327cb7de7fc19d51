"""Shared pieces of the distributed test workers: the tiny toy DiT, a cheap reward, a run config."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the shared tiny builders (support.*)
from support.threads import TEST_THREADS  # noqa: E402  (1, or FVG_TEST_THREADS: docs/reproducibility.md)

torch.set_num_threads(TEST_THREADS)

from fastvideo_grpo.config import RunConfig  # noqa: E402
from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter  # noqa: E402

TINY = dict(image_size=16, patch_size=4, hidden=32, depth=2, heads=2)
PROMPTS = ["one red square", "two blue circles", "a green triangle", "three red circles", "one blue square",
           "two green squares", "a red circle", "one green circle"]


def tiny_adapter(device=None) -> ToyAdapter:
    """TinyDiT with small random weights everywhere (the zero-initialised output layers would make
    every velocity 0); uses the global RNG, so seed it first for identical copies."""
    m = TinyDiT(TinyDiTConfig(**TINY))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
    return ToyAdapter(m.to(device or "cpu"))


def redness(images, prompts, **meta):
    """Cheap deterministic reward: mean red minus mean blue."""
    r = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
    return r.float(), {}


def run_config(out_dir, num_iterations=4, save_every=2, resume=None, prompts_per_rank=2) -> RunConfig:
    cfg = RunConfig()
    cfg.train.output_dir = str(out_dir)
    cfg.train.num_iterations = num_iterations
    cfg.train.save_every = save_every
    cfg.train.resume = resume
    cfg.train.device = "cpu"
    cfg.train.seed = 3
    cfg.sampling.num_steps = 4
    cfg.grpo.group_size = 2
    cfg.grpo.prompts_per_iteration = prompts_per_rank
    cfg.grpo.num_updates_per_iteration = 2
    cfg.grpo.clip_range = 1e-2
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_iterations = 2
    return cfg.validate()


def check(cond: bool, msg: str) -> None:
    """Fail the worker with a message (non-zero exit via the exception)."""
    if not cond:
        raise AssertionError(msg)


def check_sharded_matches(ad, ref, o, r, name: str, atol: float = 1e-5, rtol: float = 1e-4) -> int:
    """The sharded adapter's prediction ``o`` equals the one-process ``r``, and after ``(o ** 2).sum().backward()``
    on both sides every gradient the reference got equals the (gathered) sharded one; returns how many were
    compared (callers check it is not trivially small)."""
    from torch.distributed.tensor import DTensor

    (o.float() ** 2).sum().backward()
    torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{name} predict: {m}")
    n = 0
    for (pn, p), q in zip(ad.model.named_parameters(), ref.model.parameters()):
        if q.grad is None:
            continue
        gp = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(gp, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name} grad {pn}: {m}")
        n += 1
    check(n > 10, f"{name}: only {n} gradients compared")
    return n
