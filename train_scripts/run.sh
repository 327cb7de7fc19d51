#!/usr/bin/env bash
# Launch train_scripts/train.py under torchrun on this node; CONFIG is the recipe.
# Usage (paths in the config are relative to the working directory, normally the repository root):
#   CONFIG=configs/flux_hps.yaml bash train_scripts/run.sh                          # one node, 8 GPUs
#   CONFIG=configs/flux_hps.yaml NNODES=4 MASTER_ADDR=node0 bash train_scripts/run.sh   # on every node
#   CONFIG=configs/sd_hps.yaml bash train_scripts/run.sh --resume latest --train.num_iterations=400  # args passed on
# NGPU: processes per node (default 8); SCRIPT: another entry point (default train_scripts/train.py).
# Several nodes: MASTER_ADDR (the first node's address) and MASTER_PORT (29500) are where every node meets;
# RDZV_TIMEOUT (600 s, torchrun's default) is how long the nodes wait for each other: a launch whose nodes do
# not all arrive ends after it with one line saying what is missing (exit status 8). PYTHON: the interpreter.
# The named launchers (run_flux.sh, run_sd.sh, run_t2v.sh, run_i2v.sh) are this one with a default CONFIG.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${CONFIG:?set CONFIG to a recipe, e.g. CONFIG=configs/flux_hps.yaml}"
SCRIPT=${SCRIPT:-$HERE/train.py}
# one node: --standalone lets the rendezvous bind a free port (a fixed 29500 collides with other jobs)
RDZV=(--standalone)
if [ -n "${MASTER_ADDR:-}" ]; then
    RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
          --rdzv-conf="join_timeout=${RDZV_TIMEOUT:-600}")
fi
# launch.py is torchrun plus a line saying what it waits for, and one line when the rendezvous fails
exec "${PYTHON:-python}" "$HERE/launch.py" --nnodes=${NNODES:-1} --nproc_per_node=${NGPU:-8} "${RDZV[@]}" \
    "$SCRIPT" --config "$CONFIG" "$@"
