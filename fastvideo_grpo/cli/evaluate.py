"""``python -m fastvideo_grpo.cli.evaluate``: ODE-sampler evaluation of checkpoints on held-out prompts.

    python -m fastvideo_grpo.cli.evaluate outputs/sd_hps/export --out outputs/sd_hps/eval_final
    python -m fastvideo_grpo.cli.evaluate --compare base outputs/sd_hps/export           # side by side
    python -m fastvideo_grpo.cli.evaluate outputs/sd_hps/checkpoints/step_00000100 \\
        --rewards='[{name: hps, kwargs: {model_path: ckpts/hps_v2.1_hf}}, {key: clip, name: clip_score,
                    kwargs: {model_path: ckpts/clip-vit-h-14}}, {name: pickscore, kwargs: {model_path: ckpts/pickscore}}]'

A checkpoint is: ``base`` (the untrained model of the config), an exported folder (``<run>/export``:
diffusers ``save_pretrained`` weights, ``model.safetensors``, or LoRA ``pytorch_lora_weights.safetensors``),
a DCP checkpoint folder (``<run>/checkpoints/step_N``; its EMA weights when the config sets
``train.ema_decay``), a checkpoint root holding ``latest``, or a run folder (its ``export/`` if present,
else its latest checkpoint). The model / data / reward settings
come from ``--config`` (default: the ``config.yaml`` of the first checkpoint's run folder); any config
field can be overridden with ``--section.field=value`` (e.g. ``--rewards=[...]`` for another reward set,
``--data.eval_manifest=...`` for another prompt set).

Every checkpoint sees the same prompts and the same initial noise (fixed seed per batch), so rows are
comparable sample by sample. Writes to ``--out``: ``eval.json`` (per-checkpoint mean and per-sample
scores), ``eval.md`` (a table laid out like the paper's Tables 2-3: one row per checkpoint, one column
per reward, plus the difference row for ``--compare``) and ``eval_grid.png`` (rows = prompt x checkpoint;
videos as frame strips). Single process (one GPU or the CPU).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..config import RunConfig, load_config
from .common import add_shared_flags, check_unknown_flags, print_config
from ..utils.dtypes import autocast_dtype

BASE = "base"


# ----------------------------------------------------------------------------- checkpoints


def _run_dir_of(path: Path) -> Optional[Path]:
    for p in [path] + list(path.parents)[:3]:
        if (p / "config.yaml").is_file():
            return p
    return None


def resolve_checkpoint(spec: str) -> "tuple[str, Optional[Path]]":
    """('base' | 'export' | 'dcp', path) for a checkpoint argument; FileNotFoundError when unusable."""
    if spec == BASE:
        return BASE, None
    from ..training.checkpoint import LATEST, resolve_resume

    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist (an export folder, a checkpoints/step_N "
                                f"folder, a run folder, or 'base')")
    from ..training.export import export_kind

    if (p / ".metadata").is_file():
        return "dcp", p
    if (p / LATEST).is_file():
        return "dcp", resolve_resume(str(p), p)
    if export_kind(p):
        return "export", p
    if (p / "config.yaml").is_file():  # a run folder
        if export_kind(p / "export"):
            return "export", p / "export"
        if (p / "checkpoints" / LATEST).is_file():
            return "dcp", resolve_resume("latest", p / "checkpoints")
    raise FileNotFoundError(f"{spec!r} holds no weights: expected an export (a pipeline folder, LoRA weights or "
                            f"*.safetensors), a DCP .metadata file, a 'latest' pointer, or a run folder with export/ "
                            f"or checkpoints/")


def _check_lora_metadata(lora_file: Path, module) -> None:
    """The adapter metadata an export stores (rank, alpha) against the LoRA layers the config built."""
    import json

    from safetensors import safe_open

    from ..training.export import lora_config

    with safe_open(str(lora_file), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    own = lora_config(module)
    if not raw or own is None:
        return
    meta = {k.split(".", 1)[-1]: v for k, v in json.loads(raw).items()}
    for key, name in (("r", "lora_rank"), ("lora_alpha", "lora_alpha")):
        if key in meta and float(meta[key]) != float(getattr(own, key)):
            raise ValueError(f"{lora_file} was trained with {key} = {meta[key]}, but the config builds {key} = "
                             f"{getattr(own, key)}: set model.kwargs.{name} as in training (the run's config.yaml)")


def load_exported(adapter, folder: Path) -> None:
    """Load weights written by ``checkpoint.export_weights`` / ``save_pretrained`` into the trainable module:
    LoRA weights (their rank / alpha checked against the config's), a pipeline folder's denoiser subfolder,
    or a folder of *.safetensors."""
    from safetensors.torch import load_file

    from ..models.lora import LORA_FILE, from_file_keys

    module = adapter.trainable_module()
    lora_file = folder / LORA_FILE
    if lora_file.is_file():
        own = dict(module.named_parameters())
        sd = from_file_keys(load_file(str(lora_file)), getattr(adapter, "model_subfolder", None), own)
        missing = [k for k in sd if k not in own]
        if missing or not any("lora_" in n for n in own):
            raise ValueError(f"{lora_file} does not match the model's LoRA layers (set model.kwargs.lora_rank / "
                             f"lora_target_modules as in training); unmatched keys: {missing[:3]}")
        _check_lora_metadata(lora_file, module)
        module.load_state_dict(sd, strict=False)
        return
    sub = getattr(adapter, "model_subfolder", None)
    if not any(folder.glob("*.safetensors")) and sub and (folder / sub).is_dir():
        folder = folder / sub  # a pipeline export: the trained denoiser's folder
    if any("lora_" in n for n, _ in module.named_parameters()):
        raise ValueError(f"{folder} holds a full model (a fused LoRA or a full fine-tune) but the config adds LoRA "
                         "layers: evaluate it with model.kwargs.lora_rank=0")
    files = sorted(folder.glob("*.safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{folder} does not match the model of the config: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]} (evaluate with the run's own config.yaml)")


def load_policy(cfg: RunConfig, kind: str, path: Optional[Path], device):
    from ..models import build_policy

    adapter = build_policy(cfg, device)
    if kind == "export":
        load_exported(adapter, path)
    elif kind == "dcp":
        from ..training.checkpoint import load_checkpoint, load_ema_weights

        load_checkpoint(path, adapter.trainable_module(), optimizer=None)
        if cfg.train.ema_decay > 0:  # a run that kept an EMA is evaluated with it, as during training
            load_ema_weights(path, adapter.trainable_module())
    return adapter


# ----------------------------------------------------------------------------- tables


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def markdown_table(rows: Sequence[Dict], keys: Sequence[str], compare: bool = False) -> str:
    """Rows = checkpoints, columns = rewards (the paper's Tables 2-3 layout)."""
    lines = ["| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(r["mean"].get(k)) for k in keys) + " |")
    if compare and len(rows) == 2:
        a, b = rows
        cells = []
        for k in keys:
            va, vb = a["mean"].get(k), b["mean"].get(k)
            if va is None or vb is None:
                cells.append("-")
            else:
                rel = f" ({(vb - va) / abs(va) * 100:+.1f}%)" if va else ""
                cells.append(f"{vb - va:+.4f}{rel}")
        lines.append(f"| {b['name']} - {a['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastvideo_grpo.cli.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --section.field=value arguments override the config. Benchmark "
                                       "suites (GenEval, HPDv2, T2I-CompBench, DrawBench, VBench, VideoAlign, toy): "
                                       "--suite NAME (docs/benchmarks.md; --suite NAME --help).")
    p.add_argument("checkpoints", nargs="*", help="checkpoints to evaluate ('base', export, step folder, run folder)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two checkpoints side by side, with a B - A row")
    p.add_argument("--names", nargs="+", help="row labels (default: the folder names)")
    p.add_argument("--config", help="run config (default: config.yaml of the first checkpoint's run folder)")
    p.add_argument("--out", "--output-dir", dest="out", help="output folder (default: <run>/eval or ./eval_out)")
    p.add_argument("--split", default="eval", choices=["eval", "train", "all"],
                   help="prompts: the held-out split of data.* (default), the training split, or all")
    p.add_argument("--num-prompts", type=int, default=0, help="first N prompts of the split (0 = all)")
    p.add_argument("--samples-per-prompt", type=int, default=None, help="default: eval.samples_per_prompt")
    p.add_argument("--num-steps", type=int, default=None, help="ODE steps (default: sampling.eval_num_steps)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: eval.seed)")
    p.add_argument("--grid-prompts", type=int, default=4, help="prompts shown in eval_grid.png (0 = no grid)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_shared_flags(p, ("no_progress", "check"))
    return p


def main(argv=None) -> Dict:
    from ..data.dataset import PromptEmbeddingDataset
    from ..utils.io import atomic_write_json, atomic_write_text
    from ..training.metrics import save_image_grid
    from ..data.embedding_lookup import EmbeddingLookup
    from ..training.evaluate import distributed_evaluate, frames_for_grid
    from ..training.preflight import preflight
    from ..rewards.build import build_eval_reward_fns, build_reward_fns
    from ..algorithms.rollout import sampling_memory

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    check_unknown_flags(parser, overrides)
    for flag, v in (("--samples-per-prompt", args.samples_per_prompt), ("--num-steps", args.num_steps),
                    ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--num-prompts", args.num_prompts), ("--grid-prompts", args.grid_prompts)):
        if v < 0:
            raise ValueError(f"{flag} must be >= 0 (0 = all / no grid), got {v}")
    specs = list(args.compare) if args.compare else list(args.checkpoints)
    if not specs:
        raise ValueError("give at least one checkpoint (or --compare A B); 'base' = the untrained model")
    resolved = [resolve_checkpoint(s) for s in specs]
    config = args.config
    run_dir = None
    for _, path in resolved:
        if path is not None and run_dir is None:
            run_dir = _run_dir_of(path)
    if config is None:
        if run_dir is None:
            raise FileNotFoundError("no --config given and no config.yaml found next to the checkpoint(s); pass the "
                                    "run's config.yaml (or the recipe) with --config")
        config = str(run_dir / "config.yaml")
    cfg = load_config(config, overrides)
    cfg.train.resume = None
    if args.print_config:
        print_config(cfg, config, overrides)
        return {"printed": True}
    if cfg.data.prompts and not (cfg.data.manifest and Path(cfg.data.manifest).is_file()):
        from ..data.prompt_cache import prepare_prompt_embeddings  # prompts straight in: their cached embeddings

        prepare_prompt_embeddings(cfg, check_only=args.check, progress=not args.no_progress)
    manifest = preflight(cfg)  # missing model / embeddings / reward weights: fail before loading anything
    if args.check:
        print("config, checkpoints and files OK", flush=True)
        return {"checked": True}
    names = args.names or [BASE if k == BASE else p.name for k, p in resolved]
    if len(names) != len(specs):
        raise ValueError(f"--names has {len(names)} labels for {len(specs)} checkpoints")
    out = Path(args.out) if args.out else ((run_dir / "eval") if run_dir else Path("eval_out"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    spp = args.samples_per_prompt or cfg.eval.samples_per_prompt
    steps = args.num_steps or cfg.sampling.eval_num_steps or cfg.sampling.num_steps
    kw = dict(samples_per_prompt=spp, batch_size=args.batch_size or cfg.eval.batch_size,
              seed=cfg.eval.seed if args.seed is None else args.seed, dp_rank=0, dp_size=1,
              autocast_dtype=autocast_dtype(cfg.train.autocast), **sampling_memory(cfg.sampling))

    reward_fns = build_eval_reward_fns(cfg, build_reward_fns(cfg.rewards)[0] if not cfg.eval.rewards else {})
    rows: List[Dict] = []
    grid, nrow = [], 1
    prompts: List[str] = []
    for (kind, path), name in zip(resolved, names):
        adapter = load_policy(cfg, kind, path, device)
        if not prompts:
            spec = adapter.cond_spec() if hasattr(adapter, "cond_spec") else None
            d = cfg.data
            own_eval_set = bool(d.eval_manifest and args.split == "eval")
            src, split = (d.eval_manifest, "all") if own_eval_set else (manifest, args.split)
            ds = PromptEmbeddingDataset(src, split=split, eval_fraction=d.eval_fraction, split_salt=d.split_salt,
                                        names=list(spec) if spec else None, expected=spec, dedupe=d.dedupe,
                                        verify_on_read=d.verify_on_read)
            prompts = ds.prompts[: args.num_prompts] if args.num_prompts else ds.prompts
            if not prompts:
                raise ValueError(f"the {args.split!r} split has no prompts (data.eval_fraction={d.eval_fraction}); "
                                 "use --split all or set data.eval_manifest")
            encode = EmbeddingLookup([ds], device)
        encode.device = device
        ev = distributed_evaluate(adapter, prompts, reward_fns, steps, encode, progress=not args.no_progress, **kw)
        rows.append({"name": name, "checkpoint": str(path) if path else BASE, "kind": kind, **ev})
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev["mean"].items()), flush=True)
        if args.grid_prompts:
            g = distributed_evaluate(adapter, prompts[: args.grid_prompts], {}, steps, encode, return_images=True,
                                     max_frames=cfg.eval.max_frames_in_grid, **dict(kw, samples_per_prompt=1))
            imgs, nrow = frames_for_grid(g["images"], cfg.eval.max_frames_in_grid)
            grid.append((imgs, nrow, g["prompts"], name))
        del adapter
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    keys = list(rows[0]["mean"])
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": [{k: r[k] for k in ("name", "checkpoint", "kind", "num_samples", "mean", "per_sample")}
                       for r in rows],
              "rewards": keys, "num_prompts": len(prompts), "samples_per_prompt": spp, "num_steps": steps,
              "seed": kw["seed"], "config": str(config), "prompts": prompts}
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "eval.md", markdown_table(rows, keys, compare=bool(args.compare)))
    if grid:
        n = grid[0][2]
        per_prompt = grid[0][0].shape[0] // len(n)
        tiles, labels = [], []
        for i, p in enumerate(n):  # rows: prompt i under each checkpoint
            for imgs, _, _, name in grid:
                tiles.append(imgs[i * per_prompt:(i + 1) * per_prompt])
                labels.append(f"{name}: {p[:32]}")
        row_len = per_prompt if per_prompt > 1 else 1
        save_image_grid(torch.cat(tiles), out / "eval_grid.png", nrow=row_len, upscale=1, row_labels=labels)
    print(markdown_table(rows, keys, compare=bool(args.compare)), flush=True)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}" + (f", {out / 'eval_grid.png'}" if grid else ""), flush=True)
    result["out"] = str(out)
    return result


def cli(argv=None) -> None:
    from ..training.loop import run_cli

    run_cli(main, argv)


if __name__ == "__main__":
    import sys

    if any(a == "--suite" or a.startswith("--suite=") for a in sys.argv[1:]):  # a benchmark suite (cli/benchmark.py)
        from .benchmark import cli as benchmark_cli

        benchmark_cli()
    else:
        cli()
