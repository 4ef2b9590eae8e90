#!/usr/bin/env bash
# NPROC=2 launch/accelerate.sh --config configs/accelerate.yaml [key=value ...]
# accelerate launch (DDP). Several nodes: on each node run
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 launch/accelerate.sh ...
# On CPU this sets ACCELERATE_USE_CPU=1 and keeps --multi_gpu: that pair gives gloo ranks
# that talk to each other (--cpu or a MULTI_CPU config would not; see README).
. "$(dirname "$0")/common.sh"
require_fixed_nodes
exec accelerate launch --multi_gpu --num_processes "$((NPROC * NNODES))" \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    --mixed_precision no --dynamo_backend no launch/train.py "$@"
