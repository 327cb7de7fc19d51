#!/usr/bin/env bash
# FLUX.1-dev GRPO (configs/flux_hps.yaml: 32 GPUs = 4 nodes x 8, 1 prompt per GPU = 32 per iteration).
# Usage (paths in the config are relative to the working directory, normally the repository root):
#   bash train_scripts/run_flux.sh                                   # one node, 8 GPUs
#   CONFIG=configs/flux_hps_clip.yaml bash train_scripts/run_flux.sh   # HPS & CLIP recipe
#   NNODES=4 MASTER_ADDR=node0 bash train_scripts/run_flux.sh        # on every node
#   bash train_scripts/run_flux.sh --resume latest --train.num_iterations=400   # extra args passed through
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/flux_hps.yaml}
SCRIPT=${SCRIPT:-$HERE/train_flux_grpo.py}
# one node: --standalone lets the rendezvous bind a free port (a fixed 29500 collides with other jobs)
RDZV=(--standalone)
if [ -n "${MASTER_ADDR:-}" ]; then RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"); fi
exec torchrun --nnodes=${NNODES:-1} --nproc_per_node=${NGPU:-8} "${RDZV[@]}" \
    "$SCRIPT" --config "$CONFIG" "$@"
