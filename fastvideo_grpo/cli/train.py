"""The one training entry point for every model family: ``main(argv)`` used by all train scripts.

``python train_scripts/train.py --config configs/<recipe>.yaml [--section.field=value ...]`` (or a named script,
``train_scripts/train_<model>_grpo.py``, whose only difference is its default recipe), or the same under
``torchrun``. In order:

1. config: YAML + ``--section.field=value`` overrides, validated (unknown keys / wrong types rejected);
2. preflight, BEFORE any heavy work: every path in ``model.kwargs`` / reward kwargs exists, the
   embeddings manifest (``data.manifest``) and its shard files exist; a missing piece is a
   FileNotFoundError naming it and what to do;
3. ``runner.run``: the process group, the policy from ``model.name`` / ``model.kwargs`` (LoRA via
   ``lora_rank``) identical on every rank, the prompt sets read from the manifest and checked against
   the adapter's ``cond_spec()`` (data/embedding_lookup.py), parallelisation, rewards, the ``Trainer``,
   ``--resume`` (a checkpoint folder, ``latest`` = error when none, ``auto``);
4. the one loop (``loop.fit``): metrics averaged over ranks; rank 0 logs (tqdm bar, metrics.jsonl,
   TensorBoard, wandb when configured, reward_curve.png); DCP checkpoints every ``train.save_every``
   iterations and at the end; held-out ODE evaluation every ``train.eval_every`` iterations (and before /
   after); sample grids every ``train.sample_every`` iterations; the final export.

Guard rails: a non-finite loss / gradient (FloatingPointError) or non-finite rewards (ValueError from
the reward checks) stop the run before anything new is saved, naming the last good checkpoint
(``TrainingStopped``; the scripts exit with status 3). CUDA out-of-memory is re-raised as
``TrainingStopped`` listing the config knobs that lower memory (exit status 4). Configuration and
missing-file errors exit with status 2 and the message (no traceback) when run through ``cli``.

Output folder (``train.output_dir``): config.yaml (fully resolved), metrics.jsonl, tensorboard/,
reward_curve.png, eval_curve.png, eval/iter_N.json, samples/iter_N.png, checkpoints/step_N/ +
checkpoints/latest, export/ (what diffusers loads as it is: a pipeline folder, or LoRA weights with their
adapter metadata, and a model card; docs/export.md). ``--print-config`` prints the resolved config with each
value's source and exits; ``data.prompts`` (a prompt file) is embedded first, once, into a cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..config import RunConfig
from ..training.loop import EXIT_DIVERGED, EXIT_OOM, EXIT_USER_ERROR, TrainingStopped, run_cli  # noqa: F401  (the scripts' API)
from ..training.preflight import preflight
from .common import config_parser, parse_config

OOM_HINT = (
    "CUDA ran out of memory. Lower memory with (any of): parallel.sp=<2|4|8> (Ulysses sequence parallel: "
    "splits the tokens of each sample over GPUs), parallel.activation_checkpointing=1.0 (recompute all "
    "transformer blocks in backward), parallel.cpu_offload=true (sharded params/grads/optimizer in CPU "
    "memory), fewer frames or a lower resolution (model.kwargs.num_frames / resolution, with matching "
    "embeddings for I2V), grpo.micro_batch_size=1 (samples per forward/backward in training), eval.batch_size=1, "
    "or LoRA (model.kwargs.lora_rank=64: no optimizer state for the base weights)."
)


# ----------------------------------------------------------------------------- arguments


def recipe_path(name: str) -> str:
    """A recipe path relative to the working directory when it exists there, else to the repository."""
    if Path(name).is_file():
        return name
    return str(Path(__file__).resolve().parents[2] / name)


def build_parser(default_config: Optional[str] = None, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The shared recipe parser (cli/common.py) with every flag: --config, --resume, --output-dir, --overwrite,
    --no-progress, --check, --print-config."""
    return config_parser(None, description or __doc__.split("\n")[0], default_config)


def parse_args(argv=None, default_config: Optional[str] = None, description: Optional[str] = None
               ) -> Tuple[argparse.Namespace, RunConfig]:
    args, cfg, _ = parse_config(build_parser(default_config, description), argv)
    return args, cfg


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig, manifest: Optional[dict] = None, *, stop_after: Optional[int] = None) -> Dict:
    """Train per ``cfg`` (after ``preflight``) through ``runner.run``; returns the summary on every rank."""
    from ..data.embedding_lookup import build_prompt_sets
    from ..models import build_policy
    from ..training.runner import PromptSets, run as run_training

    if manifest is None:
        manifest = preflight(cfg)

    def prompt_sets(adapter):
        train, held, encode = build_prompt_sets(cfg, adapter, manifest, adapter.device)
        return PromptSets(train, held, encode)

    return run_training(cfg, lambda device: build_policy(cfg, device), prompt_sets, stop_after=stop_after)


# ----------------------------------------------------------------------------- entry points


def main(argv=None, default_config: Optional[str] = None, description: Optional[str] = None) -> Dict:
    """Parse, check, train. Raises on errors (see ``cli`` for exit codes)."""
    args, cfg = parse_args(argv, default_config, description)
    if args.print_config:
        return {"printed": True}
    if cfg.data.prompts:  # prompts straight in: their embeddings, computed on first use and cached
        from ..data.prompt_cache import prepare_prompt_embeddings

        prepare_prompt_embeddings(cfg, check_only=args.check)
    manifest = preflight(cfg)
    if args.check:
        print("config and files OK", flush=True)
        return {"checked": True}
    try:
        return run(cfg, manifest)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingStopped(f"{OOM_HINT}\n(original error: {str(e).splitlines()[0] if str(e) else e!r})",
                              EXIT_OOM) from e


def cli(argv=None, default_config: Optional[str] = None, description: Optional[str] = None) -> None:
    """``main`` for scripts: user errors print one clear message and exit non-zero (no traceback)."""
    run_cli(main, argv, default_config, description)


def recipe_entry(default_config: Optional[str], description: Optional[str] = None):
    """(main, cli) of a named train script: ``main`` / ``cli`` above with ``default_config`` (a recipe path,
    relative to the working directory or the repository) as the ``--config`` default. ``None``: required."""
    config = recipe_path(default_config) if default_config else None

    def script_main(argv=None) -> Dict:
        """Train (raises on errors); returns the run summary."""
        return main(argv, default_config=config, description=description)

    def script_cli(argv=None) -> None:
        cli(argv, default_config=config, description=description)

    return script_main, script_cli


if __name__ == "__main__":
    cli()
