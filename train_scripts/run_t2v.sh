#!/usr/bin/env bash
# HunyuanVideo T2V GRPO (configs/hunyuan_t2v_videoalign.yaml: 32 GPUs = 4 nodes x 8, 1 prompt per GPU):
# run.sh with this default recipe; the same usage, e.g.
#   NNODES=4 NGPU=8 MASTER_ADDR=node0 bash train_scripts/run_t2v.sh            # on every node
#   CONFIG=configs/wan_t2v.yaml bash train_scripts/run_t2v.sh                 # Wan 2.1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/hunyuan_t2v_videoalign.yaml} exec bash "$HERE/run.sh" "$@"
