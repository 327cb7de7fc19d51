"""torchrun with a start-up line (nodes expected, rendezvous address) and a one-line end for a rendezvous that
does not complete (fastvideo_grpo/cli/launch.py); what train_scripts/run*.sh run.

    python train_scripts/launch.py --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=node0:29500 --rdzv-conf=join_timeout=300 train_scripts/train.py --config ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
