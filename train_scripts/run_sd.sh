#!/usr/bin/env bash
# Stable Diffusion v1.4 GRPO (configs/sd_hps.yaml: 8 GPUs, 4 prompts per GPU = 32 per iteration):
# run.sh with this default recipe; the same usage, e.g.
#   bash train_scripts/run_sd.sh                                               # one node, 8 GPUs
#   CONFIG=configs/sd_hps_clip.yaml bash train_scripts/run_sd.sh              # HPS & CLIP recipe
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=${CONFIG:-$HERE/../configs/sd_hps.yaml} exec bash "$HERE/run.sh" "$@"
