"""SkyReels-V1 image-to-video (HunyuanVideo I2V, CFG) with GRPO on VideoAlign motion quality only.

Single process (one GPU; the config's per-rank counts then are the global ones):
    python train_scripts/train_i2v_grpo.py --config configs/hunyuan_i2v_mq.yaml
One node, 8 GPUs:
    torchrun --nproc_per_node=8 train_scripts/train_i2v_grpo.py
Several nodes (the recipe assumes 32 GPUs; run on every node): see train_scripts/run_i2v.sh
    torchrun --nnodes=$NNODES --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 \
        train_scripts/train_i2v_grpo.py --config configs/hunyuan_i2v_mq.yaml
Resume after an interruption (same or another number of GPUs):
    torchrun --nproc_per_node=8 train_scripts/train_i2v_grpo.py --resume latest
Override any config field, e.g. a quick check on fewer resources:
    python train_scripts/train_i2v_grpo.py --train.num_iterations=2 --grpo.group_size=4 \
        --train.output_dir=outputs/try
Check paths only (no model loading):
    python train_scripts/train_i2v_grpo.py --check

Needs (default config paths, relative to the working directory; see docs/recipes.md):
ckpts/SkyReels-V1-Hunyuan-I2V (transformer/ + vae/), data/hunyuan_i2v_embeddings/manifest.json
(python data_prep/prep_hunyuan_i2v.py --height 400 --width 640 ...), ckpts/VideoReward.
A missing piece stops the run at start-up with a message naming it. Outputs go to train.output_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.train import cli, main as train_main, recipe_path  # noqa: E402

DEFAULT_CONFIG = recipe_path("configs/hunyuan_i2v_mq.yaml")


def main(argv=None):
    """Train (raises on errors); returns the run summary."""
    return train_main(argv, default_config=DEFAULT_CONFIG, description=__doc__)


if __name__ == "__main__":
    cli(default_config=DEFAULT_CONFIG, description=__doc__)
