"""Wan 2.1 text-to-video (1.3B, CFG) with GRPO on VideoAlign VQ + MQ.

Single process (one GPU; the config's per-rank counts then are the global ones):
    python train_scripts/train_wan_grpo.py --config configs/wan_t2v.yaml
One node, 8 GPUs:
    torchrun --nproc_per_node=8 train_scripts/train_wan_grpo.py
Several nodes (the recipe assumes 8 GPUs; run on every node): see train_scripts/run_t2v.sh (CONFIG=configs/wan_t2v.yaml SCRIPT=train_scripts/train_wan_grpo.py)
    torchrun --nnodes=$NNODES --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 \
        train_scripts/train_wan_grpo.py --config configs/wan_t2v.yaml
Resume after an interruption (same or another number of GPUs):
    torchrun --nproc_per_node=8 train_scripts/train_wan_grpo.py --resume latest
Override any config field, e.g. a quick check on fewer resources:
    python train_scripts/train_wan_grpo.py --train.num_iterations=2 --grpo.group_size=4 \
        --train.output_dir=outputs/try
Check paths only (no model loading):
    python train_scripts/train_wan_grpo.py --check

Needs (default config paths, relative to the working directory; see docs/recipes.md):
ckpts/Wan2.1-T2V-1.3B-Diffusers, data/wan_embeddings/manifest.json (python data_prep/prep_wan.py ...),
ckpts/VideoReward.
A missing piece stops the run at start-up with a message naming it. Outputs go to train.output_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.train import cli, main as train_main, recipe_path  # noqa: E402

DEFAULT_CONFIG = recipe_path("configs/wan_t2v.yaml")


def main(argv=None):
    """Train (raises on errors); returns the run summary."""
    return train_main(argv, default_config=DEFAULT_CONFIG, description=__doc__)


if __name__ == "__main__":
    cli(default_config=DEFAULT_CONFIG, description=__doc__)
