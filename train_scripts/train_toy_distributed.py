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

grpo.prompts_per_iteration is per data-parallel rank. The same loop as every other entry point
(fastvideo_grpo/training/runner.py): metrics.jsonl, config.yaml, held-out evaluations, checkpoints/step_N/ +
checkpoints/latest and export/ under train.output_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.common import cli_entry, config_parser, parse_config  # noqa: E402
from fastvideo_grpo.cli.train import recipe_path  # noqa: E402
from fastvideo_grpo.training.runner import PromptSets, run  # noqa: E402
from fastvideo_grpo.cli.demo import check_toy_run, toy_adapter_factory  # noqa: E402
from fastvideo_grpo.toy.shapes import split_prompts  # noqa: E402


def main(argv=None):
    args, cfg, _ = parse_config(config_parser(None, __doc__, recipe_path("configs/toy_cpu.yaml")), argv)
    if args.print_config:
        return {"printed": True}
    if args.check:
        print(check_toy_run(cfg), flush=True)
        return {"checked": True}
    train_prompts, held_prompts = split_prompts(seed=0)
    return run(cfg, toy_adapter_factory(cfg, train_prompts, progress=cfg.log.progress),
               PromptSets(train_prompts, held_prompts))


if __name__ == "__main__":  # a user error exits 2, a stop 3 / 6 (a stalled rank) / 7 (a full disk), a graceful
    cli_entry(main)           # stop (SIGTERM...) 0: one line each, no traceback
