"""SkyReels-V1 image-to-video (HunyuanVideo I2V, CFG) with GRPO on VideoAlign motion quality.

``train_scripts/train.py`` with ``configs/hunyuan_i2v_mq.yaml`` as its default recipe: the same flags,
launchers and outputs (its docstring; docs/recipes.md for what the recipe needs on disk), e.g.
    torchrun --nproc_per_node=8 train_scripts/train_i2v_grpo.py --resume latest --train.num_iterations=400
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.train import recipe_entry  # noqa: E402

main, cli = recipe_entry("configs/hunyuan_i2v_mq.yaml", __doc__)

if __name__ == "__main__":
    cli()
