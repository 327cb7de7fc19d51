"""FLUX.1-dev with GRPO on HPS-v2.1 (HPS & CLIP: --config configs/flux_hps_clip.yaml; Qwen-Image and
Qwen-Image-Edit: configs/qwen_image_hps.yaml, configs/qwen_image_edit_hps.yaml).

``train_scripts/train.py`` with ``configs/flux_hps.yaml`` as its default recipe: the same flags,
launchers and outputs (its docstring; docs/recipes.md for what the recipe needs on disk), e.g.
    torchrun --nproc_per_node=8 train_scripts/train_flux_grpo.py --resume latest --train.num_iterations=400
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.train import recipe_entry  # noqa: E402

main, cli = recipe_entry("configs/flux_hps.yaml", __doc__)

if __name__ == "__main__":
    cli()
