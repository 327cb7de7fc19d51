"""GRPO on the toy task with the distributed entry point (FSDP2 / sequence parallel / DCP checkpoints).

Single process (same code path, no FSDP):
    python train_scripts/train_toy_distributed.py --config configs/toy_cpu.yaml --train.num_iterations=20
Two CPU processes (gloo), FSDP over 2 ranks, checkpoint every 10 iterations:
    torchrun --nproc_per_node=2 train_scripts/train_toy_distributed.py --config configs/toy_cpu.yaml \
        --train.save_every=10 --train.output_dir=outputs/toy_dist
Resume after a kill (same or different number of processes):
    torchrun --nproc_per_node=2 train_scripts/train_toy_distributed.py --config configs/toy_cpu.yaml \
        --train.output_dir=outputs/toy_dist --resume latest
Sequence parallel (both ranks share each sample's tokens):
    torchrun --nproc_per_node=2 train_scripts/train_toy_distributed.py --config configs/toy_cpu.yaml --parallel.sp=2

grpo.prompts_per_iteration is per data-parallel rank. Writes metrics.jsonl, config.yaml,
checkpoints/step_N/ + checkpoints/latest and export/model.safetensors under train.output_dir.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from fastvideo_grpo.config import load_config  # noqa: E402
from fastvideo_grpo.distributed.init import barrier, get_rank  # noqa: E402
from fastvideo_grpo.distributed.launch import run_distributed  # noqa: E402
from fastvideo_grpo.models.toy import ToyAdapter  # noqa: E402
from fastvideo_grpo.rewards import rules  # noqa: E402,F401  (registers the toy rewards)
from fastvideo_grpo.toy.pretrain import pretrained_toy_model  # noqa: E402
from fastvideo_grpo.toy.shapes import split_prompts  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_cpu.yaml", help="YAML recipe")
    parser.add_argument("--resume", default=None, help="checkpoint folder, 'latest' or 'auto' (sets train.resume)")
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides = list(overrides) + [f"--train.resume={args.resume}"]
    cfg = load_config(args.config, overrides)
    train_prompts, _ = split_prompts(seed=0)

    def build_adapter(device):
        pre = dict(cfg.extra.get("pretrain", {}))
        if get_rank() == 0:  # rank 0 pretrains (or loads) the cached base model first, the others then load it
            model, _, _ = pretrained_toy_model(train_prompts, pre, progress=True)
        barrier()
        if get_rank() != 0:
            model, _, _ = pretrained_toy_model(train_prompts, pre, progress=False)
        return ToyAdapter(model.to(device), shift=float(cfg.model.kwargs.get("shift", 1.0)))

    run_distributed(cfg, build_adapter, train_prompts, progress=True)


if __name__ == "__main__":
    main()
