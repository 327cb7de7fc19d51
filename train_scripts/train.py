"""Train any recipe with GRPO (or any registered objective): the one training entry point.

Single process (one GPU; the config's per-rank counts then are the global ones):
    python train_scripts/train.py --config configs/flux_hps.yaml
One node, 8 GPUs:
    torchrun --nproc_per_node=8 train_scripts/train.py --config configs/flux_hps.yaml
Several nodes (run on every node; see train_scripts/run.sh):
    torchrun --nnodes=$NNODES --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 \
        train_scripts/train.py --config configs/hunyuan_t2v_videoalign.yaml
Resume after an interruption (same or another number of GPUs):
    torchrun --nproc_per_node=8 train_scripts/train.py --config configs/flux_hps.yaml --resume latest
Override any config field, e.g. a quick check on fewer resources:
    python train_scripts/train.py --config configs/sd_hps.yaml --train.num_iterations=2 --grpo.group_size=4 \
        --train.output_dir=outputs/try
Check paths and settings only (no model loading):
    python train_scripts/train.py --config configs/wan_t2v.yaml --check

Every recipe in configs/ (and configs/algorithms/) names its model, rewards, data and settings; what each
needs on disk (model folder, embeddings manifest from data_prep, reward weights) is in docs/recipes.md and
is checked at start-up, naming what is missing. Outputs go to train.output_dir. The named scripts beside
this one (train_flux_grpo.py, train_hunyuan_grpo.py, train_i2v_grpo.py, train_sd_grpo.py, train_wan_grpo.py)
are this entry with a default recipe.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.train import recipe_entry  # noqa: E402

main, cli = recipe_entry(None, __doc__)

if __name__ == "__main__":
    cli()
