"""Precompute prompt embeddings (and I2V reference-image latents) for one model family.

Single process:
    python data_prep/prep_embeddings.py --family flux --model-path models/FLUX.1-dev \
        --prompts data_prep/prompts/toy_shapes.txt --out data/flux_toy
Several processes (each rank encodes every N-th shard; rank 0 writes manifest.json):
    torchrun --nproc_per_node=8 data_prep/prep_embeddings.py --family flux ...
Rerunning the same command resumes: finished, verified shards are skipped. See docs/data_prep.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvideo_grpo.cli.common import cli_entry  # noqa: E402
from fastvideo_grpo.data.prep import main  # noqa: E402

if __name__ == "__main__":  # a user error: one error line, exit status 2
    cli_entry(main, sys.argv[1:])
