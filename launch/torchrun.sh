#!/usr/bin/env bash
# NPROC=2 launch/torchrun.sh [--config configs/default.yaml] [key=value ...]
# torchrun, one node or several. Several nodes: on each node run
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 launch/torchrun.sh ...
# (c10d rendezvous at MASTER_ADDR:MASTER_PORT; set RDZV_ID to tell concurrent jobs apart.)
# MAX_RESTARTS=N: when a worker dies, restart all of them up to N times; with resume=auto
# they continue from the last checkpoint.
# Elastic: NNODES=MIN:MAX (e.g. 1:2) with MAX_RESTARTS >= 1 and global_batch_size=N
# resume=auto: when a node is lost the others re-form with fewer ranks and continue from
# the last checkpoint (README "Elastic training"). RDZV_CONF passes torchrun's
# --rdzv-conf, e.g. last_call_timeout=5 (how long a re-forming job waits for more nodes).
. "$(dirname "$0")/common.sh"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} \
    --rdzv-id="${RDZV_ID:-dist_ohem}" launch/train.py "$@"
