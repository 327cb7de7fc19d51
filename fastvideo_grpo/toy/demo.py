"""The embedded demo: pretrain-if-needed -> evaluate -> GRPO -> evaluate, with plots and a summary.

Used by ``train_scripts/train_toy_grpo.py`` (``make demo``) and by the ablation script. Output
folder (``train.output_dir``): config.yaml, metrics.jsonl, reward_curve.png, eval_curve.png,
samples_before_after.png, summary.json, policy.pt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, save_config, to_dict
from ..evaluate import evaluate_policy
from ..io import atomic_write_json
from ..metrics import MetricsLogger, plot_reward_curves, save_image_grid
from ..models.toy import ToyAdapter, save_toy_model
from ..rewards import rules  # noqa: F401  (registers the toy rewards)
from ..rewards.base import REWARDS
from ..rollout import sampling_memory
from ..trainer import GRPOTrainer, PromptSource, build_reward_fns
from .pretrain import pretrained_toy_model
from .shapes import split_prompts


def _eval_reward_fns(cfg: RunConfig):
    """Held-out evaluation always reports the continuous form of every configured reward."""
    names = []
    for rc in cfg.rewards:
        if rc.name not in names:
            names.append(rc.name)
    return {n: REWARDS.build(n, **next(rc.kwargs for rc in cfg.rewards if rc.name == n)) for n in names}


def _headline(ev: Dict) -> float:
    """Mean over rewards of the held-out mean reward (all toy rewards live in [0, 1])."""
    return sum(ev["mean"].values()) / len(ev["mean"])


def run_demo(cfg: RunConfig, progress: bool = True, cache_dir: str = "outputs/toy_pretrained",
             write_images: bool = True) -> Dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")

    train_prompts, held_prompts = split_prompts(seed=0)
    pre = dict(cfg.extra.get("pretrain", {}))
    model, ckpt, pre_seconds = pretrained_toy_model(train_prompts, pre, cache_dir=cache_dir, progress=progress)
    unknown = set(cfg.model.kwargs) - {"shift", "balance_grad"}
    if unknown:
        raise ValueError(f"model.kwargs {sorted(unknown)} are not toy-demo settings (known: shift, balance_grad)")
    adapter = ToyAdapter(model, shift=float(cfg.model.kwargs.get("shift", 1.0)),
                         balance_grad=bool(cfg.model.kwargs.get("balance_grad", False)))

    reward_fns, weights = build_reward_fns(cfg.rewards)
    eval_fns = _eval_reward_fns(cfg)
    eval_steps = cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    held = held_prompts[: cfg.train.num_eval_prompts] if cfg.train.num_eval_prompts else held_prompts
    eval_kw = dict(samples_per_prompt=int(cfg.extra.get("eval_samples_per_prompt", 2)), seed=cfg.train.seed + 10_000,
                   **sampling_memory(cfg.sampling))

    t_eval = time.perf_counter()
    before = evaluate_policy(adapter, held, eval_fns, eval_steps, return_images=write_images, **eval_kw)
    eval_seconds = time.perf_counter() - t_eval

    logger = MetricsLogger(out, tensorboard=bool(cfg.extra.get("tensorboard", False)))
    logger.log({f"eval/{k}": v for k, v in before["mean"].items()} | {"eval/reward": _headline(before)}, step=0)
    source = PromptSource(train_prompts, adapter.encode_prompts, seed=cfg.train.seed)
    trainer = GRPOTrainer(cfg, adapter, reward_fns, weights, source)
    curve_keys = [f"reward/{k}/mean" for k in reward_fns]
    bar = tqdm(range(cfg.train.num_iterations), desc="GRPO", disable=not progress, dynamic_ncols=True)
    t_train = time.perf_counter()
    for it in bar:
        m = trainer.train_iteration()
        if cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0 and it + 1 < cfg.train.num_iterations:
            ev = evaluate_policy(adapter, held, eval_fns, eval_steps, **eval_kw)
            m.update({f"eval/{k}": v for k, v in ev["mean"].items()} | {"eval/reward": _headline(ev)})
        if (it + 1) % max(1, cfg.train.log_every) == 0:
            logger.log(m, step=trainer.iteration)
        bar.set_postfix({k.split("/")[1]: f"{m[k]:.3f}" for k in curve_keys} | {"clip": f"{m['train/clipfrac']:.2f}"})
        if write_images and ((it + 1) % 25 == 0 or it + 1 == cfg.train.num_iterations):
            plot_reward_curves(logger.history, curve_keys, out / "reward_curve.png",
                               window=int(cfg.extra.get("curve_window", 10)))
    train_seconds = time.perf_counter() - t_train

    after = evaluate_policy(adapter, held, eval_fns, eval_steps, return_images=write_images, **eval_kw)
    logger.log({f"eval/{k}": v for k, v in after["mean"].items()} | {"eval/reward": _headline(after)},
               step=trainer.iteration)
    logger.close()
    if write_images:
        save_toy_model(model, out / "policy.pt")
        _write_grids(before, after, out, eval_kw["samples_per_prompt"])
        eval_rows = [r for r in logger.history if "eval/reward" in r]
        keys = [f"eval/{k}" for k in eval_fns]
        keys = keys if len(keys) == 1 else ["eval/reward"] + keys  # the headline is their mean
        plot_reward_curves(eval_rows, keys, out / "eval_curve.png",
                           window=1, title="held-out reward (ODE sampler)")

    summary = {
        "reward_before": _headline(before),
        "reward_after": _headline(after),
        "improvement_abs": _headline(after) - _headline(before),
        "improvement_rel": (_headline(after) - _headline(before)) / max(_headline(before), 1e-8),
        "per_reward_before": before["mean"],
        "per_reward_after": after["mean"],
        "extras_before": before["extras_mean"],
        "extras_after": after["extras_mean"],
        "num_eval_samples": before["num_samples"],
        "wall_time_s": time.perf_counter() - t_start,
        "pretrain_time_s": pre_seconds,
        "grpo_time_s": train_seconds,
        "eval_time_s": eval_seconds,
        "pretrained_checkpoint": str(ckpt),
        "settings": to_dict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _write_grids(before: Dict, after: Dict, out: Path, samples_per_prompt: int, max_prompts: int = 12) -> None:
    """Rows alternate before / after for the same prompt and initial noise."""
    n = min(len(before["prompts"]) // samples_per_prompt, max_prompts)
    rows, labels = [], []
    for i in range(n):
        sl = slice(i * samples_per_prompt, (i + 1) * samples_per_prompt)
        rows += [before["images"][sl], after["images"][sl]]
        labels += [f"before: {before['prompts'][i * samples_per_prompt]}", "after GRPO"]
    save_image_grid(torch.cat(rows), out / "samples_before_after.png", nrow=samples_per_prompt, upscale=4,
                    row_labels=labels)
