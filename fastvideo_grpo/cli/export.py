"""Export any checkpoint of a run into diffusers' formats: ``python -m fastvideo_grpo.cli.export --run DIR``.

    python -m fastvideo_grpo.cli.export --run outputs/flux_hps                       # the latest checkpoint
    python -m fastvideo_grpo.cli.export --run outputs/flux_hps --step 100 --weights raw
    python -m fastvideo_grpo.cli.export --run outputs/flux_lora --lora-fused --output-dir exports/flux_fused

The run's own config.yaml says what the model is (``--section.field=value`` overrides it, e.g.
``--model.kwargs.model_path=...`` when the base model moved); the checkpoint is ``checkpoints/step_N``
(``--step N``) or the latest one. ``--weights``: ``ema`` (the weight average, when the run kept one:
the default then) or ``raw`` (the trained weights). The export is what the end of a run writes
(training/export.py): LoRA weights with their adapter metadata for ``pipe.load_lora_weights``, or with
``--lora-fused`` / a full fine-tune a pipeline folder for ``DiffusionPipeline.from_pretrained``, with its model
card (README.md). Default output: ``<run>/exports/step_<N>[_ema][_fused]``; written atomically; an existing
folder only with ``--overwrite``. The model is built on the CPU (``--device`` to change), in one process.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Dict

import torch

from ..config import load_config
from .common import add_shared_flags, check_unknown_flags, print_config


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastvideo_grpo.cli.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --section.field=value arguments override the run's config.yaml.")
    p.add_argument("--run", required=True, help="the run's output folder (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of iteration N (default: the latest)")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="the weight average (default when the run kept one) or the trained weights")
    p.add_argument("--lora-fused", action="store_true",
                   help="merge a LoRA into the base weights and export a whole pipeline folder")
    p.add_argument("--components", choices=["link", "copy", "symlink"], default=None,
                   help="how a pipeline export holds the base model's other components (default: "
                        "train.export_components of the run)")
    p.add_argument("--device", default="cpu", help="where the model is built: cpu, cuda or cuda:N")
    add_shared_flags(p, ("output_dir", "overwrite", "check"))
    return p


def _checkpoint(run: Path, step):
    from ..training.checkpoint import resolve_resume, step_dirname

    root = run / "checkpoints"
    if step is None:
        if not (root / "latest").is_file():
            raise FileNotFoundError(f"{run} has no checkpoint ({root / 'latest'} does not exist); a run writes them "
                                    "every train.save_every iterations and at its end")
        return resolve_resume("latest", root)
    path = root / step_dirname(step)
    if not path.is_dir():
        have = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        raise FileNotFoundError(f"{path} does not exist; checkpoints of this run: {have or 'none'}")
    return resolve_resume(str(path), root)


def main(argv=None) -> Dict:
    from ..benchmarks.base import build_policy  # the registry's adapter, or the toy demo's own (POLICIES)
    from ..models import ADAPTERS
    from . import demo  # noqa: F401  (registers the toy demo's policy builder)
    from ..training.checkpoint import has_ema, load_checkpoint, load_ema_weights
    from ..training.export import export_options, export_weights

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    check_unknown_flags(parser, overrides)
    run = Path(args.run).expanduser()
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {args.run}: no config.yaml there (the output folder of a training run)")
    cfg = load_config(str(run / "config.yaml"), overrides)
    if args.components:
        cfg.train.export_components = args.components
    if args.print_config:
        print_config(cfg, str(run / "config.yaml"), overrides)
        return {"printed": True}
    ckpt = _checkpoint(run, args.step)
    step = int(ckpt.name.split("_")[1])
    ema = has_ema(ckpt)
    weights = args.weights or ("ema" if ema else "raw")
    if weights == "ema" and not ema:
        raise ValueError(f"--weights ema: {ckpt} holds no weight average (the run had train.ema_decay: 0); use "
                         "--weights raw")
    lora = int(cfg.model.kwargs.get("lora_rank") or 0)
    if args.lora_fused and not lora:
        raise ValueError("--lora-fused: this run trained the full model (model.kwargs.lora_rank is 0); drop the flag")
    name = f"step_{step:08d}" + ("_ema" if weights == "ema" else "") + ("_fused" if args.lora_fused else "")
    out = Path(args.output_dir).expanduser() if args.output_dir else run / "exports" / name
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another --output-dir")
    cls = ADAPTERS.signature_of(cfg.model.name)
    problems = cls.missing_model_files(cfg.model.kwargs) if inspect.isclass(cls) else []
    if problems:
        raise FileNotFoundError("cannot build the run's model: " + "; ".join(problems)
                                + " (the base model moved? --model.kwargs.model_path=<folder>)")
    if args.check:
        print(f"would export {ckpt} ({weights} weights) to {out}", flush=True)
        return {"checked": True, "checkpoint": str(ckpt), "out": str(out), "weights": weights}
    device = torch.device(args.device)
    adapter = build_policy(cfg, device)
    module = adapter.trainable_module()
    load_checkpoint(ckpt, module, optimizer=None)
    if weights == "ema":
        load_ema_weights(ckpt, module)
    written = export_weights(adapter, out, **export_options(cfg, adapter, run, step, weights,
                                                            lora_fused=args.lora_fused))
    print(f"exported {ckpt} ({weights} weights) to {written}", flush=True)
    return {"out": str(written), "checkpoint": str(ckpt), "step": step, "weights": weights}


def cli(argv=None) -> None:
    from .common import cli_entry

    cli_entry(main, argv)


if __name__ == "__main__":
    cli()
