#!/usr/bin/env bash
# SkyReels I2V GRPO, motion quality (configs/hunyuan_i2v_mq.yaml: 32 GPUs = 4 nodes x 8, 1 pair per GPU):
# run.sh with this default recipe; the same usage, e.g.
#   bash train_scripts/run_i2v.sh                                              # one node, 8 GPUs
#   bash train_scripts/run_i2v.sh --resume latest --train.num_iterations=400  # extra args passed through
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/hunyuan_i2v_mq.yaml} exec bash "$HERE/run.sh" "$@"
