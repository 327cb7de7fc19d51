#!/usr/bin/env bash
# HunyuanVideo T2V GRPO (configs/hunyuan_t2v_videoalign.yaml: 32 GPUs = 4 nodes x 8, 1 prompt per GPU = 32 per iteration).
# Usage (paths in the config are relative to the working directory, normally the repository root):
#   bash train_scripts/run_t2v.sh                                   # one node, 8 GPUs
#   CONFIG=configs/wan_t2v.yaml SCRIPT=train_scripts/train_wan_grpo.py bash train_scripts/run_t2v.sh  # Wan 2.1
#   NNODES=4 MASTER_ADDR=node0 bash train_scripts/run_t2v.sh        # on every node
#   bash train_scripts/run_t2v.sh --resume latest --train.num_iterations=400   # extra args passed through
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/hunyuan_t2v_videoalign.yaml}
SCRIPT=${SCRIPT:-$HERE/train_hunyuan_grpo.py}
# one node: --standalone lets the rendezvous bind a free port (a fixed 29500 collides with other jobs)
RDZV=(--standalone)
if [ -n "${MASTER_ADDR:-}" ]; then RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"); fi
exec torchrun --nnodes=${NNODES:-1} --nproc_per_node=${NGPU:-8} "${RDZV[@]}" \
    "$SCRIPT" --config "$CONFIG" "$@"
