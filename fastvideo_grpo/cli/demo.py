"""The embedded demo: pretrain-if-needed -> evaluate -> GRPO -> evaluate, with plots and a summary.

It is an ordinary run of the one loop (``runner.run``) on the toy model, plus ``DemoReport``: the
before / after sample grid, ``policy.pt`` and the before / after numbers in summary.json. Used by
``train_scripts/train_toy_grpo.py`` (``make demo``) and by the ablation script; ``toy_adapter_factory``
also serves ``train_scripts/train_toy_distributed.py``. Output folder (``train.output_dir``):
config.yaml, metrics.jsonl, reward_curve.png, eval_curve.png, eval/, samples_before_after.png (each
sample framed green / red: every check passed or not), summary.json (with the success rate, GenEval's
all-checks-passed share, and the background brightness before / after), policy.pt, checkpoints/, export/.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..benchmarks.base import POLICIES
from ..config import RunConfig, to_dict
from ..distributed.init import barrier, get_rank
from ..training.loop import Component
from ..training.metrics import save_image_grid
from ..models.toy import ToyAdapter, save_toy_model
from ..rewards import rules  # noqa: F401  (registers the toy rewards)
from ..training.runner import PromptSets, RunParts, run
from .pretrain import pretrained_toy_model
from ..toy.shapes import split_prompts

_TOY_MODEL_KWARGS = {"shift", "balance_grad", "frozen", "frozen_below"}


def pretrain_cache(cfg: RunConfig, cache_dir: Optional[str] = None) -> Path:
    """Where the pretrained toy model is cached: ``cache_dir``, else ``extra.pretrain_cache``, else
    ``toy_pretrained/`` beside the run's output folder (``outputs/demo`` -> ``outputs/toy_pretrained``), so runs
    side by side share it whatever folder they are started from."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if cfg.extra.get("pretrain_cache"):
        return Path(str(cfg.extra["pretrain_cache"])).expanduser()
    return Path(cfg.train.output_dir).expanduser().parent / "toy_pretrained"


def check_toy_run(cfg: RunConfig, cache_dir: Optional[str] = None) -> str:
    """The toy entry points' ``--check``: the start-up checks of a toy run without pretraining or training
    (objective, estimator, sampler, rewards, watchdog, toy and pretraining settings, the output folder and
    ``--resume``); returns a line saying what the run would do."""
    from ..algorithms.advantages import build_estimator
    from ..algorithms.objectives import build_objective
    from ..algorithms.samplers import ROLLOUTS
    from ..rewards.build import build_reward_fns
    from ..training.checkpoint import resolve_resume
    from ..training.run_folder import check_fresh_start
    from ..training.watchdog import check_watchdog
    from .pretrain import checkpoint_path, pretrain_settings

    _check_toy_kwargs(cfg)
    build_objective(cfg)
    build_estimator(cfg)
    ROLLOUTS.get(cfg.sampling.rollout)
    check_watchdog(cfg)
    build_reward_fns(cfg.rewards)
    out = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg.train.resume, out / "checkpoints")
    check_fresh_start(out, resuming=resume is not None, overwrite=cfg.train.overwrite)
    ckpt = checkpoint_path(pretrain_cache(cfg, cache_dir), pretrain_settings(dict(cfg.extra.get("pretrain", {}))))
    cached = "cached" if ckpt.is_file() else "not cached yet: pretrained first"
    start = f"resumes from {resume}" if resume is not None else "starts fresh"
    return f"config OK: the run {start} in {out}; pretrained toy model {ckpt} ({cached})"


def _check_toy_kwargs(cfg: RunConfig) -> None:
    unknown = set(cfg.model.kwargs) - _TOY_MODEL_KWARGS
    if unknown:
        raise ValueError(f"model.kwargs {sorted(unknown)} are not toy settings (known: {sorted(_TOY_MODEL_KWARGS)})")


def toy_adapter_factory(cfg: RunConfig, train_prompts, cache_dir: Optional[str] = None,
                        progress: bool = True, record: Dict = None) -> Callable[[torch.device], ToyAdapter]:
    """``device -> ToyAdapter`` over the cached pretrained toy model (``extra.pretrain`` settings; cached under
    ``pretrain_cache(cfg, cache_dir)``): rank 0 pretrains (or loads) it first, the other ranks then load it.
    ``record`` receives the checkpoint path and the seconds spent pretraining."""
    _check_toy_kwargs(cfg)
    cache_dir = str(pretrain_cache(cfg, cache_dir))
    pre = dict(cfg.extra.get("pretrain", {}))

    def build(device) -> ToyAdapter:
        if get_rank() == 0:
            model, ae, ckpt, seconds = pretrained_toy_model(train_prompts, pre, cache_dir=cache_dir, progress=progress)
        barrier()
        if get_rank() != 0:
            model, ae, ckpt, seconds = pretrained_toy_model(train_prompts, pre, cache_dir=cache_dir, progress=False)
        if record is not None:
            record.update(checkpoint=str(ckpt), pretrain_time_s=seconds)
        return ToyAdapter(model.to(device), shift=float(cfg.model.kwargs.get("shift", 1.0)),
                          balance_grad=bool(cfg.model.kwargs.get("balance_grad", False)),
                          frozen=cfg.model.kwargs.get("frozen", ()),
                          frozen_below=float(cfg.model.kwargs.get("frozen_below", 0.0)), autoencoder=ae)

    return build


def _headline(ev: Dict) -> float:
    """Mean over rewards of the held-out mean reward (all toy rewards live in [0, 1])."""
    return sum(ev["mean"].values()) / len(ev["mean"])


class DemoReport(Component):
    """The demo's own outputs: before / after grid and policy.pt (``write_images``), and the before /
    after numbers, timings and settings in the summary. A resumed run gets the "before" evaluation (and its
    samples) back from the run folder (loop.Evaluator), so its outputs equal an uninterrupted run's."""

    def __init__(self, parts: RunParts, write_images: bool, t_start: float, pretrain: Dict):
        self.parts, self.write_images, self.t_start, self.pretrain = parts, write_images, t_start, pretrain
        self.grpo_seconds = 0.0

    def on_iteration(self, state, it, metrics):
        self.grpo_seconds += metrics.get("time/iteration", 0.0)

    def on_end(self, state):
        ev = self.parts.evaluator
        if self.write_images and ev.first and ev.last and "images" in ev.first:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from ..training.ema import weights_for_eval

            adapter = self.parts.trainer.adapter
            with weights_for_eval(self.parts.trainer.ema):  # the EMA weights when train.ema_decay is set
                # collective under FSDP2: every rank gathers, the main rank writes whole (not its shards) weights
                full = get_model_state_dict(adapter.model, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
            if state.is_main:
                save_toy_model(adapter.model, state.out / "policy.pt", adapter.autoencoder, state_dict=full)
                _write_grids(ev.first, ev.last, state.out, self.parts.cfg.eval.samples_per_prompt,
                             self.parts.eval_fns)
        return {}

    def summary(self) -> Dict:
        ev = self.parts.evaluator
        if not (ev.first and ev.last):
            return {}
        before, after = _headline(ev.first), _headline(ev.last)
        xb, xa = ev.first.get("extras_mean", {}), ev.last.get("extras_mean", {})
        return {
            # GenEval's own metric (every check passed) and the background's mean brightness (texture)
            "success_rate_before": _extra(xb, "all_correct"),
            "success_rate_after": _extra(xa, "all_correct"),
            "background_before": _extra(xb, "background"),
            "background_after": _extra(xa, "background"),
            "reward_before": before,
            "reward_after": after,
            "improvement_abs": after - before,
            "improvement_rel": (after - before) / max(before, 1e-8),
            "per_reward_before": ev.first["mean"],
            "per_reward_after": ev.last["mean"],
            "extras_before": ev.first.get("extras_mean", {}),
            "extras_after": ev.last.get("extras_mean", {}),
            "num_eval_samples": ev.first["num_samples"],
            "wall_time_s": time.perf_counter() - self.t_start,
            "pretrain_time_s": self.pretrain.get("pretrain_time_s", 0.0),
            "grpo_time_s": self.grpo_seconds,
            "eval_time_s": ev.seconds[0] if ev.seconds else 0.0,
            "pretrained_checkpoint": self.pretrain.get("checkpoint"),
            "settings": to_dict(self.parts.cfg),
        }


def run_demo(cfg: RunConfig, progress: bool = True, cache_dir: Optional[str] = None,
             write_images: bool = True) -> Dict:
    """The demo run; returns its summary (also in ``<output_dir>/summary.json``)."""
    t_start = time.perf_counter()
    if not progress:
        cfg = copy.deepcopy(cfg)
        cfg.log.progress = False
    train_prompts, held_prompts = split_prompts(seed=0)
    pretrain: Dict = {}
    factory = toy_adapter_factory(cfg, train_prompts, cache_dir, progress, record=pretrain)
    return run(cfg, factory, PromptSets(train_prompts, held_prompts), keep_eval_images=write_images,
               extra_components=lambda parts: [DemoReport(parts, write_images, t_start, pretrain)])


def _extra(extras: Dict, name: str):
    """The held-out mean of the first reward's per-sample ``name`` info (None when no reward reports it)."""
    return next((v for k, v in extras.items() if k.endswith("/" + name)), None)


def _all_correct(images: torch.Tensor, prompts, reward_fns: Dict):
    """Per-sample "every check passed" from the first evaluation reward that reports it, else None."""
    for fn in reward_fns.values():
        _, info = fn(images, prompts)
        if info and "all_correct" in info:
            return info["all_correct"].bool().tolist()
    return None


PASS, FAIL = (0.1, 0.75, 0.1), (0.85, 0.1, 0.1)


def _write_grids(before: Dict, after: Dict, out: Path, samples_per_prompt: int, reward_fns: Dict,
                 max_prompts: int = 12) -> None:
    """Rows alternate before / after for the same prompt and initial noise; each sample is framed green
    when it passes every check of the prompt (GenEval's success), red when it does not."""
    n = min(len(before["prompts"]) // samples_per_prompt, max_prompts)
    k = n * samples_per_prompt
    prompts = before["prompts"][:k]
    ok_before = _all_correct(before["images"][:k], prompts, reward_fns)
    ok_after = _all_correct(after["images"][:k], prompts, reward_fns)
    rows, labels, borders = [], [], []
    for i in range(n):
        sl = slice(i * samples_per_prompt, (i + 1) * samples_per_prompt)
        rows += [before["images"][sl], after["images"][sl]]
        for name, ok in (("before", ok_before), ("after GRPO", ok_after)):
            head = f"{name}: {prompts[sl.start]}" if name == "before" else name
            if ok is None:
                labels.append(head)
                borders += [None] * samples_per_prompt
            else:
                labels.append(f"{head} ({sum(ok[sl])}/{samples_per_prompt} pass)")
                borders += [PASS if o else FAIL for o in ok[sl]]
    save_image_grid(torch.cat(rows), out / "samples_before_after.png", nrow=samples_per_prompt, upscale=4,
                    pad=4, row_labels=labels, borders=borders if any(b is not None for b in borders) else None)


@POLICIES.register("toy")
def toy_policy(cfg, device, cache_dir: Optional[str] = None):
    """The toy demo's policy for ``--suite``: its pretrained model (cached under ``cache_dir``, default
    ``pretrain_cache(cfg)``, pretrained there if missing) with the run's model settings; any suite runs on it
    (``--policy-args '{cache_dir: ...}'``)."""
    if cfg.model.kwargs.get("checkpoint"):  # a toy model saved to a file (model.kwargs.checkpoint): the registry
        from ..models import build_policy

        return build_policy(cfg, device)
    return toy_adapter_factory(cfg, split_prompts(seed=0)[0], cache_dir, progress=False)(device)
