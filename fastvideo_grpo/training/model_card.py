"""The model card (README.md) of an export, as diffusers' training scripts write one: YAML front matter (base
model, library, tags, license) and what a user needs: how to load it into diffusers, the recipe it was
trained with, its reward curve and its held-out evaluation.

``write_model_card(folder, run_dir, cfg, step=..., weights=..., kind=...)`` reads the run folder (metrics.jsonl,
eval/iter_N.json) and writes README.md, reward_curve.png (drawn from the run's metrics) and
training_config.yaml (the run's resolved config) into the export folder ``folder``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..config import RunConfig, to_dict
from ..utils.io import atomic_write_text


def _base_license(root: Optional[Path]) -> Optional[str]:
    """The ``license:`` of the base model's own model card front matter, when it has one."""
    card = root / "README.md" if root is not None else None
    if card is None or not card.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", card.read_text(errors="ignore"), re.S)
    if not m:
        return None
    import yaml

    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = front.get("license") if isinstance(front, dict) else None
    return str(lic) if lic else None


def _evaluations(run_dir: Path, step: int) -> List[Dict]:
    """The held-out evaluations of the run up to ``step``, in order (eval/iter_N.json)."""
    rows = []
    for f in sorted((run_dir / "eval").glob("iter_*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if int(rec.get("iteration", -1)) <= step and rec.get("mean"):
            rows.append(rec)
    return sorted(rows, key=lambda r: r["iteration"])


def held_out_table(evals: List[Dict]) -> str:
    """Markdown: one row per reward, its held-out mean at the first evaluation and at the export's."""
    if not evals:
        return "No held-out evaluation was recorded up to this step (train.num_eval_prompts / data.eval_fraction).\n"
    first, last = evals[0], evals[-1]
    lines = [f"| reward | iteration {first['iteration']} | iteration {last['iteration']} | change |",
             "| --- | --- | --- | --- |"]
    for k in last["mean"]:
        a, b = first["mean"].get(k), last["mean"][k]
        change = "-" if a is None else f"{b - a:+.4f}" + (f" ({(b - a) / abs(a) * 100:+.1f}%)" if a else "")
        lines.append(f"| {k} | {'-' if a is None else f'{a:.4f}'} | {b:.4f} | {change} |")
    n = last.get("num_samples")
    return "\n".join(lines) + "\n" + (f"\n{n} samples (held-out prompts, deterministic ODE sampler, fixed noise).\n"
                                      if n else "")


def _recipe_rows(cfg: RunConfig) -> List[tuple]:
    g, s, o = cfg.grpo, cfg.sampling, cfg.optim
    rewards = ", ".join(f"{r.key or r.name} (x{r.weight:g}{'' if r.threshold is None else f', >= {r.threshold:g}'})"
                        for r in cfg.rewards)
    return [("objective", g.objective), ("rewards", rewards), ("group size (G)", g.group_size),
            ("prompts per iteration, per GPU", g.prompts_per_iteration), ("sampling steps", s.num_steps),
            ("SDE noise (eta)", s.eta_schedule if s.eta_schedule is not None else s.eta),
            ("trained fraction of steps (tau)", g.tau), ("PPO clip range", g.clip_range),
            ("optimiser steps per iteration", g.num_updates_per_iteration), ("learning rate", o.lr),
            ("iterations", cfg.train.num_iterations), ("weight EMA decay", cfg.train.ema_decay),
            ("seed", cfg.train.seed)]


def _usage(kind: str, base: str, subfolder: Optional[str]) -> str:
    if kind == "lora":
        return ("```python\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained({base!r})\n"
                "pipe.load_lora_weights(\"path/to/this/folder\")  # the adapter's rank, alpha and targets are in the file\n"
                "image = pipe(\"a prompt\").images[0]\n```\n\n"
                "`pipe.fuse_lora()` then merges it into the weights.")
    if kind == "pipeline":
        return ("```python\nfrom diffusers import DiffusionPipeline\n\n"
                "pipe = DiffusionPipeline.from_pretrained(\"path/to/this/folder\")\n"
                "image = pipe(\"a prompt\").images[0]\n```\n\n"
                f"The trained denoiser alone: `<ModelClass>.from_pretrained(\"path/to/this/folder\", subfolder={subfolder!r})`.")
    return "The weights are in `model.safetensors` (a model without a diffusers class; fastvideo-grpo loads them)."


def write_model_card(folder, run_dir, cfg: RunConfig, *, step: int, weights: str, kind: str,
                     subfolder: Optional[str] = None, base_root: Optional[Path] = None,
                     extra: Optional[str] = None) -> None:
    """README.md (+ reward_curve.png, training_config.yaml) of the export ``folder`` (see the module docstring).
    ``weights``: "ema" or "raw"; ``kind``: "lora", "pipeline" or "model" (training/export.py's ``export_kind``)."""
    import yaml

    from .metrics import plot_reward_curves, read_jsonl

    folder, run_dir = Path(folder), Path(run_dir)
    base = str(cfg.model.kwargs.get("model_path") or cfg.model.name)
    kw = cfg.model.kwargs
    lora = int(kw.get("lora_rank") or 0)
    tags = ["text-to-image", "diffusers", "diffusers-training", "fastvideo-grpo", cfg.grpo.objective, cfg.model.name]
    if lora:
        tags.append("lora")
    front = {"base_model": base, "library_name": "diffusers", "tags": tags}
    lic = _base_license(base_root)
    if lic:
        front["license"] = lic
    what = (f"a LoRA (rank {lora}, alpha {kw.get('lora_alpha') or lora}, on "
            f"{', '.join(kw.get('lora_target_modules') or ['to_q', 'to_k', 'to_v', 'to_out.0'])})"
            + (", merged into the base weights" if lora and kind != "lora" else "")) if lora else "a full fine-tune"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    reward_keys = [f"reward/{r.key or r.name}/mean" for r in cfg.rewards]
    curve = ""
    if any(k in r for r in rows for k in reward_keys):
        plot_reward_curves([r for r in rows if r.get("step", 0) <= step], reward_keys, folder / "reward_curve.png",
                           window=cfg.log.curve_window)
        curve = "![training reward](reward_curve.png)\n\nMean reward of the rollouts per iteration (faint) and its " \
                f"moving average over {cfg.log.curve_window} iterations.\n"
    atomic_write_text(folder / "training_config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    recipe = "\n".join(["| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in _recipe_rows(cfg)])
    text = (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {run_dir.resolve().name}: {cfg.model.name} trained with {cfg.grpo.objective} (fastvideo-grpo)\n\n"
        f"{what} of `{base}`, trained with group-relative policy optimisation on "
        f"{', '.join(r.key or r.name for r in cfg.rewards)}; the weights of iteration {step} "
        f"({'the exponential moving average of the weights' if weights == 'ema' else 'the trained weights'}).\n\n"
        "## Use it with diffusers\n\n" + _usage(kind, base, subfolder) + "\n\n"
        "Training sampled with its own scheduler settings (`training_config.yaml`: `sampling`, `model.kwargs`); "
        "the pipeline's default scheduler may differ (e.g. FLUX's resolution-dependent shift).\n\n"
        "## Training recipe\n\n" + recipe + "\n\nThe whole resolved configuration is in `training_config.yaml`.\n\n"
        "## Reward curve\n\n" + (curve or "No training metrics were recorded.\n") + "\n"
        "## Held-out evaluation\n\n" + held_out_table(_evaluations(run_dir, step))
        + (f"\n{extra}\n" if extra else "")
    )
    atomic_write_text(folder / "README.md", text)
