#!/usr/bin/env bash
# FLUX.1-dev GRPO (configs/flux_hps.yaml: 32 GPUs = 4 nodes x 8, 1 prompt per GPU = 32 per iteration):
# run.sh with this default recipe; the same usage, e.g.
#   NNODES=4 MASTER_ADDR=node0 bash train_scripts/run_flux.sh                  # on every node
#   CONFIG=configs/flux_hps_clip.yaml bash train_scripts/run_flux.sh          # HPS & CLIP recipe
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/flux_hps.yaml} exec bash "$HERE/run.sh" "$@"
