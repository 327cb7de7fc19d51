#!/usr/bin/env bash
# Stable Diffusion v1.4 GRPO (configs/sd_hps.yaml: 8 GPUs, 4 prompts per GPU = 32 per iteration).
# Usage (paths in the config are relative to the working directory, normally the repository root):
#   bash train_scripts/run_sd.sh                                   # one node, 8 GPUs
#   CONFIG=configs/sd_hps_clip.yaml bash train_scripts/run_sd.sh   # HPS & CLIP recipe
#   NNODES=2 MASTER_ADDR=node0 bash train_scripts/run_sd.sh        # on every node
#   bash train_scripts/run_sd.sh --resume latest --train.num_iterations=400   # extra args passed through
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/sd_hps.yaml}
SCRIPT=${SCRIPT:-$HERE/train_sd_grpo.py}
# one node: --standalone lets the rendezvous bind a free port (a fixed 29500 collides with other jobs)
RDZV=(--standalone)
if [ -n "${MASTER_ADDR:-}" ]; then RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"); fi
exec torchrun --nnodes=${NNODES:-1} --nproc_per_node=${NGPU:-8} "${RDZV[@]}" \
    "$SCRIPT" --config "$CONFIG" "$@"
