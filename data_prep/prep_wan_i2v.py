"""Prompt-embedding preprocessing for the wan_i2v family: `prep_embeddings.py --family wan_i2v` (see its docstring).

    python data_prep/prep_wan_i2v.py --model-path <folder> --prompts <file> --out <dir> [flags]
    torchrun --nproc_per_node=N data_prep/prep_wan_i2v.py --model-path <folder> --prompts <file> --out <dir>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvideo_grpo.cli.common import cli_entry  # noqa: E402
from fastvideo_grpo.data.prep import main  # noqa: E402

if __name__ == "__main__":  # a user error: one error line, exit status 2
    cli_entry(main, sys.argv[1:], "wan_i2v")
