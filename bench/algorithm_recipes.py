"""The planner's projection of every algorithm recipe (configs/algorithms/) next to its DanceGRPO base recipe.

For each model (FLUX, HunyuanVideo, SD3.5 Medium) the base recipe is measured once under fake tensors by
``fastvideo_grpo.cli.plan`` and the measurement is reused for its algorithm recipes (they change the sampler and
the update, not the model or resolution; activations are rescaled to the batch). Every recipe is planned on the
GPU count its header assumes ("Assumes N GPUs": 32 for FLUX and HunyuanVideo, 8 for SD3.5), 80 GB each. Prints
JSON and, with ``--write``, replaces the table between the markers in docs/algorithms.md.

    python bench/algorithm_recipes.py [--write] [--gpus 32] [--gpu-mem-gib 80]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastvideo_grpo.config import load_config  # noqa: E402
from fastvideo_grpo.utils.io import atomic_write_text  # noqa: E402
from fastvideo_grpo.cli.plan import DEFAULT_MFU, assumed_gpus, plan  # noqa: E402

ALGORITHMS = ["mixgrpo", "mixgrpo_flash", "flow_grpo", "flow_grpo_fast", "diffusion_nft", "grpo_guard", "awm", "cps",
              "pref_grpo", "dgpo", "tree_grpo", "flow_dppo"]
# model -> (its DanceGRPO recipe, its algorithm recipes' suffixes)
MODELS = {"flux": ("configs/flux_hps.yaml", ALGORITHMS), "hunyuan": ("configs/hunyuan_t2v_videoalign.yaml", ALGORITHMS),
          "sd3": ("configs/sd3_hps.yaml", ["flow_grpo_pickscore", "flow_grpo_geneval", "flow_grpo_ocr"])}
DOC = ROOT / "docs" / "algorithms.md"
START, END = "<!-- recipe-table:start (bench/algorithm_recipes.py --write) -->", "<!-- recipe-table:end -->"


def rows(gpus: int, gpu_mem_gib: float, mfu: float):
    out = []
    for model, (base, algorithms) in MODELS.items():
        measured, base_s = None, None
        for path in [base] + [f"configs/algorithms/{model}_{a}.yaml" for a in algorithms]:
            cfg = load_config(str(ROOT / path))
            n = (assumed_gpus(ROOT / path) or gpus) if gpus is None else gpus
            p = plan(cfg, n, gpu_mem_gib, mfu=mfu, measured=measured, recipe=Path(path).name)
            measured = measured or p._measured
            ps = p.settings["passes"]
            s = p.seconds["H100"]
            base_s = base_s or s
            out.append({"recipe": path, "model": model, "gpus": n, "steps": cfg.sampling.num_steps,
                        "eval_steps": cfg.sampling.eval_num_steps, "samples_per_rank": p.settings["rank_batch"],
                        "trained_steps": ps["trained_steps"], "forward_rollout": ps["forward_rollout"],
                        "forward_update": ps["forward_update"], "backward": ps["backward"],
                        "peak_gib": p.memory_gib["peak"], "fits": p.fits, "s_per_iteration_h100": s,
                        "s_per_iteration_h200": p.seconds["H200"], "relative_to_base": s / base_s,
                        "flops_pflop": p.flops["total"] / 1e15})
    return out


def table(rs, gpus: int, gpu_mem_gib: float, mfu: float) -> str:
    lines = ["| recipe | GPUs | steps (train / eval) | samples per GPU | trained steps K | passes per GPU and iteration "
             "(rollout fwd + update fwd + bwd) | per-GPU peak (GiB) | projected s / iteration (H100) | vs DanceGRPO |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rs:
        lines.append(f"| `{r['recipe']}` | {r['gpus']} | {r['steps']} / {r['eval_steps']} | {r['samples_per_rank']} | "
                     f"{r['trained_steps']} | {r['forward_rollout']} + {r['forward_update']} + {r['backward']} | "
                     f"{r['peak_gib']:.1f}{'' if r['fits'] else ' (does not fit)'} | {r['s_per_iteration_h100']:.0f} | "
                     f"{r['relative_to_base']:.2f}x |")
    lines.append("")
    where = f"{gpus} GPUs" if gpus else "the GPUs each recipe's header assumes"
    lines.append(f"Planned by `fastvideo_grpo.cli.plan` on {where} x {gpu_mem_gib:.0f} GB at MFU {mfu} "
                 "(FLOPs / (790 TFLOP/s x MFU); a backward is priced at 2 forwards plus the recomputation of "
                 "activation checkpointing; reward models, evaluation and communication not modelled; vs DanceGRPO: "
                 "the model's DanceGRPO recipe, the first row of its group).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="default: each recipe's assumed GPU count")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    ap.add_argument("--write", action="store_true", help="replace the table in docs/algorithms.md")
    args = ap.parse_args(argv)
    rs = rows(args.gpus, args.gpu_mem_gib, args.mfu)
    print(json.dumps(rs, indent=1))
    text = table(rs, args.gpus, args.gpu_mem_gib, args.mfu)
    print(text)
    if args.write:
        doc = DOC.read_text()
        if START not in doc or END not in doc:
            raise ValueError(f"{DOC} has no table markers {START!r} ... {END!r}")
        head, rest = doc.split(START, 1)
        atomic_write_text(DOC, head + START + "\n" + text + END + rest.split(END, 1)[1])
    return rs


if __name__ == "__main__":
    main()
