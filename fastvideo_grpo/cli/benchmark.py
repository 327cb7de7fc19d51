"""``python -m fastvideo_grpo.cli.evaluate --suite NAME``: a benchmark suite over checkpoints, data-parallel over ranks.

    python -m fastvideo_grpo.cli.evaluate --suite toy outputs/demo                      # the toy task, on the CPU
    torchrun --nproc_per_node=8 -m fastvideo_grpo.cli.evaluate --suite geneval outputs/flux_hps/export \\
        --prompts geneval/prompts/evaluation_metadata.jsonl --embeddings data/geneval_emb \\
        --suite-args '{detector: {name: mask2former, model_path: ckpts/mask2former-swin-s-coco}, clip_path: ckpts/clip-vit-l-14}'

A checkpoint is what ``python -m fastvideo_grpo.cli.evaluate`` takes (``base``, an export folder such as
``<run>/export`` or ``<run>/best``, a ``checkpoints/step_N`` folder, a run folder). The model comes from the
run's ``config.yaml`` (or ``--config``; ``--section.field=value`` overrides it). Prompts are read from
``--prompts`` in the suite's published format; a real model reads their conditioning from ``--embeddings``, a
data_prep manifest of those prompts (``--write-prompts FILE`` writes them, one per line, for data_prep).
Under torchrun every rank holds the whole policy and samples its share of the fixed batches (sampling.py);
rank 0 writes ``<out>/<suite>.md`` and ``<out>/<suite>.json`` (tables.py) and, with ``--save-images``, the
images in GenEval's layout under ``<out>/images/``. docs/benchmarks.md lists the suites and their options.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from ..benchmarks import SUITES
from . import demo  # noqa: F401  (registers the toy demo's policy builder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastvideo_grpo.cli.evaluate",
                                description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --section.field=value arguments override the run config. Suites: "
                                       + ", ".join(SUITES.names()) + " (docs/benchmarks.md).")
    p.add_argument("checkpoints", nargs="*", help="checkpoints ('base', export, best, step folder, run folder)")
    p.add_argument("--suite", required=True, choices=SUITES.names(), help="the benchmark suite")
    p.add_argument("--prompts", help="the suite's prompt file or folder, in its published format")
    p.add_argument("--suite-args", default="{}", help="the suite's options, a YAML mapping (docs/benchmarks.md)")
    p.add_argument("--policy-args", default="{}", help="options of the model's policy builder, a YAML mapping "
                   "(the toy model: {cache_dir: outputs/toy_pretrained})")
    p.add_argument("--embeddings", help="data_prep manifest holding the suite's prompts (real models)")
    p.add_argument("--write-prompts", metavar="FILE", help="write the suite's prompts (one per line) and exit")
    p.add_argument("--names", nargs="+", help="row labels (default: the folder names)")
    p.add_argument("--config", help="run config (default: config.yaml of the first checkpoint's run folder)")
    p.add_argument("--out", help="output folder (default: <run>/benchmarks or ./benchmarks_out)")
    p.add_argument("--num-prompts", type=int, default=0, help="first N prompts only (0 = all)")
    p.add_argument("--samples-per-prompt", type=int, default=None, help="default: the suite's protocol")
    p.add_argument("--num-steps", type=int, default=None, help="ODE steps (default: sampling.eval_num_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward per rank (default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: eval.seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--save-images", action="store_true", help="also write the images (GenEval's folder layout)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    return p


def _suite_args(text: str, flag: str = "--suite-args") -> Dict:
    try:
        args = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} is not valid YAML: {e}") from None
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise ValueError(f"{flag} must be a YAML mapping, e.g. '{{key: value}}', got {text!r}")
    return args


def main(argv=None) -> Dict:
    from ..config import load_config
    from ..distributed.init import barrier, init_distributed, shutdown
    from .evaluate import BASE, _run_dir_of, resolve_checkpoint

    args, overrides = build_parser().parse_known_args(argv)
    for flag, v in (("--samples-per-prompt", args.samples_per_prompt), ("--num-steps", args.num_steps),
                    ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.num_prompts < 0:
        raise ValueError(f"--num-prompts must be >= 0 (0 = all), got {args.num_prompts}")
    resolved = [resolve_checkpoint(s) for s in args.checkpoints]
    run_dir = next((_run_dir_of(p) for _, p in resolved if p is not None and _run_dir_of(p)), None)
    config = args.config or (str(run_dir / "config.yaml") if run_dir else None)
    if config is None:
        raise FileNotFoundError("no --config given and no config.yaml found next to the checkpoint(s); pass the "
                                "run's config.yaml (or the recipe) with --config")
    cfg = load_config(config, overrides)
    cfg.train.resume = None
    suite = SUITES.get(args.suite)(args.prompts, _suite_args(args.suite_args), cfg)
    items = suite.items()
    items = items[: args.num_prompts] if args.num_prompts else items
    if not items:
        raise ValueError(f"--suite {suite.name}: no prompts read from {args.prompts}")
    if args.write_prompts:
        from ..utils.io import atomic_write_text

        atomic_write_text(args.write_prompts, "".join(p + "\n" for p in dict.fromkeys(it.prompt for it in items)))
        print(f"wrote {len(set(it.prompt for it in items))} prompts to {args.write_prompts}", flush=True)
        return {"prompts": args.write_prompts}
    if not resolved:
        raise ValueError("give at least one checkpoint ('base' = the untrained model of the config)")
    names = args.names or [BASE if k == BASE else p.name for k, p in resolved]
    if len(names) != len(resolved):
        raise ValueError(f"--names has {len(names)} labels for {len(resolved)} checkpoints")
    out = Path(args.out) if args.out else ((run_dir / "benchmarks") if run_dir else Path("benchmarks_out"))

    env = init_distributed(args.device if args.device != "auto" else cfg.train.device, timeout_s=cfg.parallel.init_timeout_s)
    try:
        result = _run(args, cfg, config, suite, items, resolved, names, out, env)
        barrier()
    except BaseException:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown()
    return result


def _run(args, cfg, config, suite, items, resolved, names, out, env) -> Dict:
    from ..utils.dtypes import autocast_dtype
    from ..algorithms.rollout import sampling_memory
    from ..benchmarks.base import build_policy
    from ..benchmarks.sampling import generate_and_score
    from ..benchmarks.tables import build_payload, markdown, write_tables

    device = env.device
    spp = args.samples_per_prompt or suite.default_samples_per_prompt
    steps = args.num_steps or cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    batch = args.batch_size or cfg.eval.batch_size
    seed = cfg.eval.seed if args.seed is None else args.seed
    metrics = suite.metrics()
    scorer = suite.scorer(device)
    rows: List[Dict] = []
    t0 = time.perf_counter()
    for (kind, path), name in zip(resolved, names):
        adapter = build_policy(cfg, device, _suite_args(args.policy_args, "--policy-args"))
        load_weights(adapter, kind, path, cfg)
        encode = _encoder(adapter, items, args.embeddings, device)
        per_sample = generate_and_score(
            adapter, items, encode, scorer, num_steps=steps, samples_per_prompt=spp, batch_size=max(batch, spp),
            seed=seed, dp_rank=env.rank, dp_size=env.world_size, autocast_dtype=autocast_dtype(cfg.train.autocast),
            memory=sampling_memory(cfg.sampling), progress=args.progress,
            save_images=(out / "images" / name) if args.save_images and env.is_main else None)
        rows.append({"name": name, "checkpoint": str(path) if path else "base", "per_sample": per_sample})
        del adapter
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {"samples_per_prompt": spp, "num_steps": steps, "batch_size": batch, "seed": seed,
                "world_size": env.world_size, "config": str(config), "prompts": args.prompts,
                "suite_args": suite.args, "num_prompts": len(items), "wall_time_s": time.perf_counter() - t0}
    payload = build_payload(suite, items, metrics, rows, settings, notes=getattr(suite, "notes", ()))
    if env.is_main:
        paths = write_tables(out, payload)
        print(markdown(payload), flush=True)
        print(f"wrote {paths['md']}, {paths['json']}", flush=True)
        payload["out"] = paths
    return payload


def load_weights(adapter, kind: str, path: Optional[Path], cfg) -> None:
    """A checkpoint's weights into the policy (as ``python -m fastvideo_grpo.cli.evaluate`` loads them)."""
    from .evaluate import load_exported

    if kind == "export":
        load_exported(adapter, path)
    elif kind == "dcp":
        from ..training.checkpoint import load_checkpoint, load_ema_weights

        load_checkpoint(path, adapter.trainable_module(), optimizer=None)
        if cfg.train.ema_decay > 0:
            load_ema_weights(path, adapter.trainable_module())


def _encoder(adapter, items, embeddings: Optional[str], device):
    """Conditioning for the suite's prompts: from ``--embeddings`` (every prompt must be there), else the
    adapter's own text encoding (the toy model)."""
    prompts = list(dict.fromkeys(it.prompt for it in items))
    if embeddings:
        from ..data.dataset import PromptEmbeddingDataset
        from ..data.embedding_lookup import EmbeddingLookup

        spec = adapter.cond_spec() if hasattr(adapter, "cond_spec") else None
        ds = PromptEmbeddingDataset(embeddings, split="all", names=list(spec) if spec else None, expected=spec)
        lookup = EmbeddingLookup([ds], device)
        missing = [p for p in prompts if p not in lookup.where]
        if missing:
            raise ValueError(f"--embeddings {embeddings} lacks {len(missing)} of the suite's {len(prompts)} prompts "
                             f"(e.g. {missing[0]!r}); write them with --write-prompts FILE and run data_prep on FILE")
        return lookup
    try:
        adapter.encode_prompts(prompts[:1])
    except NotImplementedError:
        raise ValueError("this model reads precomputed prompt embeddings: write the suite's prompts with "
                         "--write-prompts prompts.txt, embed them with data_prep (docs/data_prep.md) and pass the "
                         "manifest with --embeddings") from None
    return adapter.encode_prompts


def cli(argv=None) -> None:
    from ..training.loop import run_cli

    run_cli(main, argv)
